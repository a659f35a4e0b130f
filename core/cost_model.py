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
                  start: int, cap: int, budget: float, floor: int = 0) -> int:
    """Largest n in [0, cap] such that the batch plus a prefill chunk of n tokens starting at
    position `start` (attention work n * (start + n)) is predicted within `budget` seconds,
    or `floor` (<= cap) when that is larger: tokens the budget may not cut, which need no
    pricing (the scheduler's `min_prefill`; a fifth of the searches on the Azure trace).

    A model may answer this itself, exactly, by offering a method of the same name and
    signature (profiles' SlowestStage solves its fitted model in closed form, verified
    against its own predictions); otherwise `search_largest_chunk` searches."""
    solve = getattr(model, "largest_chunk", None)
    if solve is not None:
        return solve(prefill_tokens, decode_tokens, prefill_attention_work, decode_context, start, cap, budget, floor)
    return search_largest_chunk(model, prefill_tokens, decode_tokens, prefill_attention_work, decode_context,
                                start, cap, budget, floor)


def search_largest_chunk(model: StageTimeModel, prefill_tokens: float, decode_tokens: float,
                         prefill_attention_work: float, decode_context: float,
                         start: int, cap: int, budget: float, floor: int = 0) -> int:
    """`largest_chunk` by search, for any model.

    Predicted time grows with n (the fitted coefficients are non-negative; only below the
    weight-read knee can it dip slightly), so an integer bisection finds it: ~log2(cap)
    predictions, one when the whole cap fits (the common case), two when nothing does.
    Where it dips, the answer still fits and n + 1 does not. A model that declares
    `monotone = True` (its time never falls as n grows: profiles' SlowestStage checks its
    coefficients) has exactly one such n, which interpolation finds in a few predictions
    (the time is nearly linear in n) instead of ~11: the same answer, found faster."""
    def time_of(n: int) -> float:
        return model.predict(prefill_tokens + n, decode_tokens,
                             prefill_attention_work + n * (start + n), decode_context)
    if cap <= floor:
        return cap
    t_hi = time_of(cap)
    if t_hi <= budget:
        return cap
    first = floor + 1   # the smallest chunk the budget decides
    t_lo = time_of(first)
    if t_lo > budget:
        return floor
    lo, hi = first, cap  # fits(lo), not fits(hi)
    rounds = 3 if getattr(model, "monotone", False) is True else 0
    last = (cap, t_hi)  # the most recent prediction besides the bracket's ends
    while hi - lo > 1:
        if rounds:
            # Where the parabola through the bracket's ends and the latest prediction (the
            # chord at first) crosses the budget, and its neighbour: a prefill chunk's time
            # is a quadratic in n (attention) between knees, so this lands on both sides
            # of the answer at once, or close. Bisection takes over after 3 rounds.
            rounds -= 1
            mid = _crossing((lo, t_lo), (hi, t_hi), last, budget)
            mid = min(max(mid, lo + 1), hi - 1)
            probes = (mid, mid + 1) if mid + 1 < hi else (mid,)
        else:
            probes = ((lo + hi) // 2,)
        for mid in probes:
            if not lo < mid < hi:
                continue
            t = time_of(mid)
            if t <= budget:
                last, (lo, t_lo) = (lo, t_lo), (mid, t)
            else:
                last, (hi, t_hi) = (hi, t_hi), (mid, t)
                break  # the neighbour is above the new hi
    return lo


def _crossing(a: tuple[float, float], b: tuple[float, float], c: tuple[float, float], budget: float) -> int:
    """Floor of the n in [a, b] where the quadratic through points a, b, c (n, time) reaches
    `budget`; the chord through a and b when c is one of them or the quadratic gives none."""
    (x0, y0), (x1, y1), (x2, y2) = a, b, c
    chord = x0 + (budget - y0) * (x1 - x0) / (y1 - y0) if y1 > y0 else (x0 + x1) / 2
    if x2 in (x0, x1):
        return int(chord)
    # Newton form: y = y0 + d1 (x - x0) + d2 (x - x0)(x - x1)
    d1 = (y1 - y0) / (x1 - x0)
    d2 = ((y2 - y0) / (x2 - x0) - d1) / (x2 - x1)
    # solve d2 u^2 + (d1 - d2 (x1 - x0)) u + (y0 - budget) = 0 for u = x - x0 in [0, x1 - x0]
    qa, qb, qc = d2, d1 - d2 * (x1 - x0), y0 - budget
    if abs(qa) < 1e-30:
        return int(chord)
    disc = qb * qb - 4 * qa * qc
    if disc < 0:
        return int(chord)
    root = disc ** 0.5
    for u in ((-qb + root) / (2 * qa), (-qb - root) / (2 * qa)):
        if 0 <= u <= x1 - x0:
            return int(x0 + u)
    return int(chord)
