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
    id: int
    scheduled_at: float
    items: list[BatchItem] = field(default_factory=list)
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_attention_work: int = 0   # sum over prefill chunks of chunk x context
    decode_context: int = 0           # sum of decode requests' context lengths

    def add(self, item: BatchItem) -> None:
        self.items.append(item)
        if item.is_prefill:
            self.prefill_tokens += item.num_tokens
            self.prefill_attention_work += item.num_tokens * item.context_len
        else:
            self.decode_tokens += item.num_tokens
            self.decode_context += item.context_len

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    @property
    def num_samples(self) -> int:
        return sum(1 for it in self.items if it.samples)

    def __len__(self) -> int:
        return len(self.items)
