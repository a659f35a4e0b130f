"""Scheduling policies: each decides the *size* of the next micro-batch.

A policy reads a `SchedulerView` and returns a `BatchPlan`; the `Scheduler` carries it out
(page allocation, preemption, chunking, queue moves), so those mechanics exist once and
every policy gets them identically. Semantics follow ../shared/reference/token-throttling.md.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from core.batch import MicroBatch

from core.cost_model import StageTimeModel, largest_chunk
from core.request import Request
from core.validation import check_keys, suggest


class SchedulerView(Protocol):
    """What a policy may read (the Scheduler implements it; policies must not mutate)."""
    pp: int
    page_size: int
    total_pages: int
    @property
    def free_pages(self) -> int: ...
    @property
    def waiting_tokens(self) -> int: ...     # uncomputed tokens of waiting requests (WT)
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_ready(self) -> int: ...          # ready to decode one more token
    @property
    def num_in_flight(self) -> int: ...      # micro-batches in the pipeline
    @property
    def num_running(self) -> int: ...        # ready + requests inside in-flight batches (Rn)
    @property
    def num_holding_pages(self) -> int: ...  # started, unfinished requests (vLLM "running")
    stage_time_model: StageTimeModel | None  # predicted slowest-stage time of a batch shape, if given
    in_flight: Mapping[int, MicroBatch]      # batch id -> micro-batch in the pipeline, oldest first


@dataclass(slots=True)
class BatchPlan:
    max_decodes: int                  # decode tokens to take from `ready`, front first
    prefill_budget: int               # prefill tokens to take from `waiting`, FIFO, chunked
    token_budget: int | None = None   # one shared budget: prefill gets what decodes leave
    max_new_requests: int | None = None  # requests that may start prefill (vLLM max_num_seqs)
    max_chunk: int | None = None      # per-request chunk cap (vLLM long_prefill_token_threshold)
    reserve_page_per_decode: bool = False  # gLLM: preempt while free pages < decodes
    requeue_chunks: bool = False      # next chunk schedulable before the previous returns
    # Seconds: prefill chunks are cut so the batch's predicted time on its slowest stage
    # (the scheduler's stage_time_model) stays within it; decodes are taken first, uncut.
    time_budget: float | None = None
    min_prefill: int = 0              # prefill tokens the time budget never cuts
    # A prompt starts only when the pages free beyond those promised to prompts already
    # started hold all of it (vLLM v0's can_allocate); False: when its first chunk fits
    # (vLLM with chunked prefill, gLLM). See docs/architecture.md, "Order and preemption".
    admit_whole_prompts: bool = False


class Policy(Protocol):
    """A policy may also have a `queue_key` attribute: None (first come, first served), or
    a function of a request whose ascending order the scheduler keeps among the waiting
    requests that hold no KV pages (core.scheduler.Scheduler.add)."""
    def bind(self, view: SchedulerView) -> None: ...
    def plan(self, view: SchedulerView) -> BatchPlan: ...


def _int(x: Any) -> bool:
    """An int that is not a bool (True is an int in Python; `maxp: true` in YAML is a mistake)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _check(cond: bool, policy: str, field: str, allowed: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"{policy}.{field} must be {allowed}, got {value!r}")


@dataclass(slots=True)
class TokenThrottling:
    """gLLM Token Throttling, paper-era semantics, with a rotating (not random) jitter."""
    maxp: int = 2048          # most prefill tokens in one micro-batch
    minp: int = 32            # least prefill tokens while any are waiting
    iterp: int = 8            # micro-batches over which the waiting backlog is spread
    kvthresh: float = 0.05    # fraction of KV pages kept free for decode growth
    maxd: int | None = None   # optional cap on decode tokens per micro-batch (later gLLM: 512)
    requeue_chunks: bool = False  # later gLLM: chunks of one prompt fill consecutive batches
    _reserve: float = dataclasses.field(default=0.0, init=False, repr=False)
    _jitter: int = dataclasses.field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        n = "token_throttling"
        _check(_int(self.maxp) and self.maxp >= 1, n, "maxp", "an int >= 1", self.maxp)
        _check(_int(self.minp) and 0 <= self.minp <= self.maxp, n, "minp", f"an int in [0, maxp={self.maxp}]", self.minp)
        _check(_int(self.iterp) and self.iterp >= 1, n, "iterp", "an int >= 1", self.iterp)
        _check(isinstance(self.kvthresh, (int, float)) and not isinstance(self.kvthresh, bool) and 0 <= self.kvthresh < 1, n, "kvthresh", "a number in [0, 1)", self.kvthresh)
        _check(self.maxd is None or (_int(self.maxd) and self.maxd >= 1), n, "maxd", "null or an int >= 1", self.maxd)
        _check(isinstance(self.requeue_chunks, bool), n, "requeue_chunks", "true or false", self.requeue_chunks)

    def bind(self, view: SchedulerView) -> None:
        self._reserve = self.kvthresh * view.free_pages  # R0, fixed at start-up
        self._jitter = 0

    def plan(self, view: SchedulerView) -> BatchPlan:
        return self.plan_and_kv_cap(view)[0]

    def plan_and_kv_cap(self, view: SchedulerView) -> tuple[BatchPlan, int]:
        """The plan, and the prefill tokens the KV rules alone allow (page reserve and, at
        pp > 1, the utilisation ramp; the WT rule then cuts the plan's budget below it):
        time_balanced lets prefill grow up to that cap."""
        free, pp = view.free_pages, view.pp
        cap = int(view.page_size * max(free - self._reserve, 0))              # hard page reserve
        if pp > 1 and cap > 0:
            ramp = max(0.0, (free / view.total_pages - self.kvthresh) / (1 - self.kvthresh))
            cap = min(cap, round(ramp * self.maxp))                            # UT rule
            prefill = min(cap, max(view.waiting_tokens // self.iterp, self.minp))  # WT rule
        else:
            prefill = cap = min(self.maxp, cap)
        running = view.num_running
        if running < pp:
            decodes = running
        else:
            decodes = (running + self._jitter) // pp
            self._jitter = (self._jitter + 1) % pp
        if self.maxd is not None:
            decodes = min(decodes, self.maxd)
        return BatchPlan(max_decodes=decodes, prefill_budget=prefill, reserve_page_per_decode=True,
                         requeue_chunks=self.requeue_chunks), cap


@dataclass(slots=True)
class Sarathi:
    """Sarathi-Serve as gLLM runs it: one fixed token budget, decodes first."""
    budget: int = 2048

    def __post_init__(self) -> None:
        _check(_int(self.budget) and self.budget >= 1, "sarathi", "budget", "an int >= 1", self.budget)

    def bind(self, view: SchedulerView) -> None:
        pass

    def plan(self, view: SchedulerView) -> BatchPlan:
        return BatchPlan(max_decodes=self.budget, prefill_budget=self.budget, token_budget=self.budget)


@dataclass(slots=True)
class VLLM:
    """vLLM V1 style: running requests first, then waiting FCFS, under one token budget."""
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    long_prefill_token_threshold: int = 0  # 0 = no per-request chunk cap (vLLM's default)

    def __post_init__(self) -> None:
        n = "vllm"
        _check(_int(self.max_num_batched_tokens) and self.max_num_batched_tokens >= 1, n,
               "max_num_batched_tokens", "an int >= 1", self.max_num_batched_tokens)
        _check(_int(self.max_num_seqs) and self.max_num_seqs >= 1, n, "max_num_seqs", "an int >= 1", self.max_num_seqs)
        _check(_int(self.long_prefill_token_threshold) and self.long_prefill_token_threshold >= 0, n,
               "long_prefill_token_threshold", "an int >= 0 (0 = off)", self.long_prefill_token_threshold)

    def bind(self, view: SchedulerView) -> None:
        pass

    def plan(self, view: SchedulerView) -> BatchPlan:
        budget = self.max_num_batched_tokens
        return BatchPlan(max_decodes=budget, prefill_budget=budget, token_budget=budget,
                         max_new_requests=max(0, self.max_num_seqs - view.num_holding_pages),
                         max_chunk=self.long_prefill_token_threshold or None)


@dataclass(slots=True)
class StageTimeBalanced:
    """Token Throttling, with every micro-batch filled up to the slowest one in flight.

    Why: with `pp` micro-batches circulating, a batch goes round the pipeline no faster
    than pp times the slowest batch in flight (each stage runs every batch in turn), so the
    cycle is pp * max(t_i) while the stages are busy only sum(t_i): the bubble share is
    1 - mean(t) / max(t). Token Throttling equalises *token counts*, yet its batches' times
    differ: the backlog rule (WT // iterp) makes one batch big after a burst and the next
    ones thin, a decode costs far less than a prefill token, a late chunk of a long prompt
    costs more attention than an early one, and the last stage carries the LM head. A batch
    shorter than the slowest one in flight does not shorten the cycle; the time it leaves
    is a bubble. So this policy prices batches with the latency model of the table it runs
    with (`stage_time_model`: predicted time on the slowest stage) and lets prefill beyond
    Token Throttling's budget into a batch only while its predicted time stays within
    `fill` x the slowest in-flight batch's predicted time: prefill that runs for free.

    The target time T is thus adaptive: the time of the slowest in-flight batch, which Token
    Throttling's own sizing set. It never exceeds what Token Throttling would form at some
    point (a batch grows past the current level only through TT's own budget), so there is
    no new knob to set in seconds; `fill` < 1 lets the level decay once the burst that set it
    is over (with fill = 1 a level holds while a backlog lasts, which keeps the cycle, and so
    TPOT, at that level). A fixed target (tuned seconds) was considered: it needs a value
    per model, GPU and SLO, which the in-flight level gets from the pipeline itself.

    `max_chunk` caps the tokens of one prompt in a micro-batch (vLLM's
    long_prefill_token_threshold), so a batch's prefill is shared among the waiting prompts
    instead of going to the head of the queue: a long prompt no longer holds every short one
    behind it for several batches. Measured on the Azure code trace (experiments/
    chunk_cap_code.yaml: 600 requests, Qwen2.5-14B on A100/H100 at pp 4 and 8): capacity
    +4.5% to +8.3% over Token Throttling with a cap of 256, of which Token Throttling
    given the same cap gains +4.3% to +5.6% (`fill: 0` here is exactly that).

    `defer_per_1k_tokens` orders the waiting queue (`queue_key`): a prompt queues as if it
    arrived d seconds later per 1,000 tokens, so short prompts stop waiting behind long ones
    that came just before them, while a long prompt is overtaken only by what arrives
    within d x its thousands of tokens after it (shortest-first would starve it). On the
    Azure code trace, where P99 TTFT binds, this raises capacity; what it costs the longest
    prompts is in docs/benchmarks.md ("A waiting order").

    `maxp_cycle_time` (seconds) caps `maxp` in time instead of tokens, once per run (at
    `bind`): at the prefill tokens of one fresh prompt whose predicted time on the slowest
    stage, times pp, is this. Why: pp times a batch's stage time is the time between a
    request's tokens if every batch were like it, which the TPOT SLO bounds on any GPU, and
    it hardly depends on pp (each stage holds 1/pp of the layers). maxp in tokens does not
    carry across GPUs: tuned on the Azure conversation trace, A100 capacities fall above
    ~2,000-2,500 tokens, while H100's keep rising to ~5,000, so one shared token budget
    short-changes one of them (docs/benchmarks.md, "A budget in seconds").

    `late_after` (seconds) sets a prompt that has waited that long without starting behind
    every prompt that has not (the scheduler's `late` queue). Under a TTFT SLO it has
    missed it, and first come, first served would make every prompt behind it miss it too:
    in an overload that outlasts the SLO, the misses then stay with the few prompts that
    were already late instead of spreading to all. Those few wait until the overload ends
    (docs/benchmarks.md, "Late prompts last", gives how long).

    Token Throttling's protections are unchanged: its decodes (Rn/pp, rotating jitter,
    optional `maxd`) are taken first and never cut by time; its prefill budget (KV reserve,
    utilisation ramp, backlog rule WT // iterp with floor minp) is always granted; the
    extra prefill is capped by the same KV reserve and ramp (ramp x maxp tokens), so KV
    pressure still throttles admissions.
    """
    maxp: int = 2048          # most prefill tokens in one micro-batch (scaled by the KV ramp)
    minp: int = 32            # least prefill tokens while any are waiting
    iterp: int = 8            # micro-batches over which Token Throttling spreads the backlog
    kvthresh: float = 0.05    # fraction of KV pages kept free for decode growth
    maxd: int | None = None   # optional cap on decode tokens per micro-batch
    fill: float = 1.0         # fill up to this fraction of the slowest in-flight batch's time
    requeue_chunks: bool = False
    max_chunk: int | None = None  # most tokens of one prompt per micro-batch (None: no cap)
    admit_whole_prompts: bool = False  # start a prompt only when the free pages hold all of it
    # Seconds a prompt's place in the queue is deferred per 1,000 prompt tokens: 0 first
    # come, first served; d > 0 lets a shorter prompt go ahead of a longer one that arrived
    # less than d x (difference in thousands of tokens) seconds earlier.
    defer_per_1k_tokens: float = 0.0
    # Seconds a prompt may wait unstarted before it goes behind every prompt that has not
    # waited that long; null: never.
    late_after: float | None = None
    # Seconds: maxp becomes the fewer of maxp and the prefill tokens of one fresh prompt
    # whose predicted slowest-stage time x pp is this (null: maxp alone).
    maxp_cycle_time: float | None = None
    _tt: TokenThrottling = dataclasses.field(default=None, init=False, repr=False)  # type: ignore[assignment]
    _model: StageTimeModel | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        n = "time_balanced"
        _check(isinstance(self.fill, (int, float)) and not isinstance(self.fill, bool) and 0 <= self.fill <= 4,
               n, "fill", "a number in [0, 4] (fraction of the slowest in-flight batch's time)", self.fill)
        _check(self.max_chunk is None or (_int(self.max_chunk) and self.max_chunk >= 1), n, "max_chunk",
               "null or an int >= 1 (most tokens of one prompt per micro-batch)", self.max_chunk)
        _check(isinstance(self.admit_whole_prompts, bool), n, "admit_whole_prompts", "true or false",
               self.admit_whole_prompts)
        d = self.defer_per_1k_tokens
        _check(isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d < math.inf, n,
               "defer_per_1k_tokens", "a finite number >= 0 (seconds per 1,000 prompt tokens; 0: first "
               "come, first served)", d)
        late = self.late_after
        _check(late is None or (isinstance(late, (int, float)) and not isinstance(late, bool) and 0 < late < math.inf),
               n, "late_after", "null or a finite number of seconds > 0", late)
        cycle = self.maxp_cycle_time
        _check(cycle is None or (isinstance(cycle, (int, float)) and not isinstance(cycle, bool)
                                 and 0 < cycle < math.inf),
               n, "maxp_cycle_time", "null or a finite number of seconds > 0 (a prefill's predicted "
               "slowest-stage time x pp)", cycle)
        # The token rules are Token Throttling's: it validates them, under this policy's name.
        try:
            self._tt = TokenThrottling(maxp=self.maxp, minp=self.minp, iterp=self.iterp, kvthresh=self.kvthresh,
                                       maxd=self.maxd, requeue_chunks=self.requeue_chunks)
        except ValueError as e:
            raise ValueError(str(e).replace("token_throttling.", f"{n}.", 1)) from None

    @property
    def queue_key(self) -> Callable[[Request], float] | None:
        """The waiting order: None (first come, first served) without a deferral."""
        return self.deferred_arrival if self.defer_per_1k_tokens else None

    def deferred_arrival(self, request: Request) -> float:
        return request.arrival + self.defer_per_1k_tokens * request.prompt_len / 1000

    def bind(self, view: SchedulerView) -> None:
        model = getattr(view, "stage_time_model", None)
        if model is None:
            raise ValueError("policy time_balanced needs a stage-time model (the fitted latency model of "
                             "the table it runs with) and the scheduler was given none: the simulator and "
                             "the runtime pass theirs; a bare Scheduler needs stage_time_model=")
        self._model = model
        self._tt.maxp = self.effective_maxp(model, view.pp)
        self._tt.bind(view)

    def effective_maxp(self, model: StageTimeModel, pp: int) -> int:
        """maxp, or with `maxp_cycle_time` the fewer of maxp and the tokens of one fresh
        prompt's chunk (attention n x n, no decodes) predicted within maxp_cycle_time / pp on
        the slowest stage. Fewer than minp is an error naming both: the backlog rule's floor
        must still fit under maxp."""
        if self.maxp_cycle_time is None:
            return self.maxp
        tokens = largest_chunk(model, 0, 0, 0, 0, 0, self.maxp, self.maxp_cycle_time / pp)
        if tokens < max(self.minp, 1):
            raise ValueError(
                f"time_balanced.maxp_cycle_time={self.maxp_cycle_time:g} s allows {tokens} prefill tokens a "
                f"micro-batch on this profile at pp={pp}, under minp={self.minp}: raise maxp_cycle_time "
                f"above {pp * model.predict(max(self.minp, 1), 0, max(self.minp, 1) ** 2, 0):.4g} s or lower minp")
        return tokens

    def in_flight_level(self, view: SchedulerView) -> float:
        """Predicted time of the slowest batch in flight (0 when none); each batch priced once
        (its `predicted_time`)."""
        predict = self._model.predict  # type: ignore[union-attr]
        level = 0.0
        for b in view.in_flight.values():
            t = b.predicted_time
            if t is None:
                t = b.predicted_time = predict(b.prefill_tokens, b.decode_tokens, b.prefill_attention_work,
                                               b.decode_context)
            if t > level:
                level = t
        return level

    def plan(self, view: SchedulerView) -> BatchPlan:
        plan, cap = self._tt.plan_and_kv_cap(view)
        plan.max_chunk = self.max_chunk
        plan.admit_whole_prompts = self.admit_whole_prompts
        if not view.num_waiting:   # no prefill to add: no pricing (half the batches on the Azure trace)
            return plan
        if cap <= plan.prefill_budget:   # TT's budget already takes what the KV rules allow
            return plan
        level = self.in_flight_level(view) * self.fill
        if level > 0.0:
            plan.min_prefill = plan.prefill_budget   # TT's own budget is never cut
            plan.prefill_budget = cap
            plan.time_budget = level
        return plan


POLICIES: dict[str, type] = {"token_throttling": TokenThrottling, "sarathi": Sarathi, "vllm": VLLM,
                             "time_balanced": StageTimeBalanced}


def policy_class(name: str) -> type:
    """A built-in policy by name, or a user class by dotted path (`pkg.module.Class` or `pkg.module:Class`)."""
    if name in POLICIES:
        return POLICIES[name]
    if "." not in name and ":" not in name:
        raise ValueError(f"policy must be one of {sorted(POLICIES)} or a dotted path to a class, "
                         f"got {name!r}{suggest(name, POLICIES)}")
    module_name, _, attr = name.replace(":", ".").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"policy {name!r}: cannot import {attr!r} from {module_name!r}: {e}") from e
    if not (callable(getattr(cls, "plan", None)) and callable(getattr(cls, "bind", None))):
        raise ValueError(f"policy {name!r} must define bind(view) and plan(view) -> BatchPlan")
    return cls


def policy_params(cls: type) -> dict[str, Any]:
    """Public parameters of a policy class with their defaults."""
    if not dataclasses.is_dataclass(cls):
        return {}
    return {f.name: f.default for f in dataclasses.fields(cls) if f.init}


def make_policy(name: str, params: dict[str, Any] | None = None) -> Policy:
    cls = policy_class(name)
    params = dict(params or {})
    if dataclasses.is_dataclass(cls):
        check_keys(params, policy_params(cls), f"policy {name!r}", noun="parameter")
    return cls(**params)
