"""What a policy may know about time: the predicted stage time of a candidate micro-batch.

core/ does not fit latency models (profiles/ does, with numpy); it only names the interface
the simulator and the runtime hand in (`Scheduler(..., stage_time_model=...)`) so a policy
can price a batch before forming it. A micro-batch is described by the same four features
the latency tables are measured on.
"""
from __future__ import annotations

from typing import Protocol


class StageTimeModel(Protocol):
    """Predicted time of one micro-batch on the pipeline's slowest stage, in seconds."""

    def predict(self, prefill_tokens: float, decode_tokens: float,
                prefill_attention_work: float, decode_context: float) -> float:
        """max over stages of the stage's predicted time for a batch of this shape:
        `prefill_attention_work` = sum over chunks of chunk x context after it,
        `decode_context` = sum of the decodes' KV lengths."""
        ...


def largest_chunk(model: StageTimeModel, prefill_tokens: float, decode_tokens: float,
                  prefill_attention_work: float, decode_context: float,
                  start: int, cap: int, budget: float) -> int:
    """Largest n in [0, cap] such that the batch plus a prefill chunk of n tokens starting at
    position `start` (attention work n * (start + n)) is predicted within `budget` seconds.

    Predicted time grows with n (the fitted coefficients are non-negative; only below the
    weight-read knee can it dip slightly), so an integer bisection finds it: ~log2(cap)
    predictions, one when the whole cap fits (the common case), two when nothing does.
    Where it dips, the answer still fits and n + 1 does not."""
    def fits(n: int) -> bool:
        return model.predict(prefill_tokens + n, decode_tokens,
                             prefill_attention_work + n * (start + n), decode_context) <= budget
    if cap <= 0:
        return 0
    if fits(cap):
        return cap
    if not fits(1):
        return 0
    lo, hi = 1, cap  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
