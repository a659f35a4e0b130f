"""A micro-batch: what one pass through the pipeline computes."""
from __future__ import annotations

from dataclasses import dataclass, field

from core.request import Request


@dataclass(slots=True, eq=False)
class BatchItem:
    request: Request
    start: int          # position of the first token computed (= KV already held)
    num_tokens: int     # tokens computed in this pass
    is_prefill: bool    # from the waiting queue (prompt or recompute), else a decode
    samples: bool       # reaches the last known token, so the last stage samples one

    @property
    def context_len(self) -> int:
        """KV length after this pass (what attention reads)."""
        return self.start + self.num_tokens


@dataclass(slots=True, eq=False)
class MicroBatch:
    """Decodes are kept as bare requests (one token each, always sampling): a simulated
    trace has millions of them, and an object per decode token would dominate the cost.
    Their position is `request.num_scheduled - 1` while the batch is in flight (a request
    decodes in at most one in-flight batch). `items` lists decodes first, then chunks:
    that is also the order of `sampled` tokens in `Scheduler.complete`."""
    id: int
    scheduled_at: float
    decodes: list[Request] = field(default_factory=list)
    chunks: list[BatchItem] = field(default_factory=list)   # prefill chunks (or any item via add)
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_attention_work: int = 0   # sum over prefill chunks of chunk x context
    decode_context: int = 0           # sum of decode requests' context lengths
    num_samples: int = 0              # tokens the last stage samples
    # The scheduler's stage_time_model price of this batch, set once by whoever computes it
    # first: the simulator when it times the batch with that same model, else the policy
    # (time_balanced prices each in-flight batch once).
    predicted_time: float | None = None

    def add(self, item: BatchItem) -> None:
        self.chunks.append(item)
        if item.is_prefill:
            self.prefill_tokens += item.num_tokens
            self.prefill_attention_work += item.num_tokens * item.context_len
        else:
            self.decode_tokens += item.num_tokens
            self.decode_context += item.context_len
        self.num_samples += item.samples

    @property
    def items(self) -> list[BatchItem]:
        """Every item with its position (valid while the batch is in flight)."""
        return [BatchItem(r, r.num_scheduled - 1, 1, False, True) for r in self.decodes] + self.chunks

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    def __len__(self) -> int:
        return len(self.decodes) + len(self.chunks)
