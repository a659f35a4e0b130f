"""Request state shared by the simulator and the runtime.

A request's tokens are its prompt followed by what it has generated. The KV cache holds
`num_computed` of them; each micro-batch computes a run of the rest. When a run reaches
the last known token, the last stage samples one new token. After preemption the
request is recomputed from token 0 (prompt and generated tokens alike), as vLLM does.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from enum import Enum


class Status(str, Enum):
    WAITING = "waiting"      # prompt (or recompute) not fully scheduled
    RUNNING = "running"      # prompt scheduled; decoding or in flight
    FINISHED = "finished"
    REJECTED = "rejected"    # can never fit in the KV cache; reported, not dropped


@dataclass(slots=True, eq=False)
class Request:
    id: int
    prompt_len: int
    max_output: int                     # tokens to generate (fixed length when ignore_eos)
    arrival: float = 0.0
    prompt_ids: list[int] | None = None  # runtime only; the simulator needs lengths
    stop_token_ids: frozenset[int] = frozenset()
    # Sampled token ids, where a model samples them (the runtime). The simulator samples
    # none: `token_times` (one per generated token in both worlds) is what counts them.
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0               # tokens whose KV has come back from the last stage
    num_scheduled: int = 0              # tokens sent into the pipeline (>= num_computed)
    pages: list[int] = field(default_factory=list)   # the runtime's: array('i'), same operations
    status: Status = Status.WAITING
    in_flight: int = 0                  # in-flight micro-batches carrying this request
    first_scheduled: float | None = None
    token_times: array = field(default_factory=lambda: array("d"))  # compact: millions in a sweep
    finish_time: float | None = None
    finish_reason: str | None = None    # "length" | "stop" | "too_long" | "aborted"
    preemptions: int = 0
    tokens_recomputed: int = 0          # tokens scheduled before preemptions threw them away
    prefill_debt: int = 0               # pages its started prompt still needs (Scheduler.prefill_debt)

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ValueError(f"request {self.id}: prompt_len must be >= 1, got {self.prompt_len}")
        if self.max_output < 1:
            raise ValueError(f"request {self.id}: max_output must be >= 1, got {self.max_output}")
        if self.prompt_ids is not None and len(self.prompt_ids) != self.prompt_len:
            raise ValueError(f"request {self.id}: prompt_ids has {len(self.prompt_ids)} tokens, "
                             f"prompt_len is {self.prompt_len}")

    @property
    def num_output(self) -> int:
        """Tokens generated so far (each has a time; the runtime also keeps its id)."""
        return len(self.token_times)

    @property
    def num_tokens(self) -> int:
        """Known tokens: prompt plus generated."""
        return self.prompt_len + len(self.token_times)

    @property
    def num_unscheduled(self) -> int:
        return self.num_tokens - self.num_scheduled

    @property
    def tokens_computed_total(self) -> int:
        """Every token ever scheduled, recomputes included."""
        return self.tokens_recomputed + self.num_scheduled

    @property
    def max_kv_tokens(self) -> int:
        """KV slots the request needs at its longest (the last sampled token is never fed)."""
        return self.prompt_len + self.max_output - 1

    @property
    def is_finished(self) -> bool:
        return self.status in (Status.FINISHED, Status.REJECTED)
