"""Test helpers for the core scheduler: a trivial pipeline executor, invariant checks,
scheduler construction by policy name, and a user policy reachable by dotted path.

The executor (`drive`) is the smallest thing that honours the scheduler contract: it
adds requests (all at once, or at seeded arrival times on a logical clock), asks for
micro-batches until `next_batch` says None, then completes the OLDEST in-flight batch
(the pipeline is FIFO), advances the clock by one tick, and repeats. Every decision is
logged and every scheduler invariant is checked after every step (the page count every
step; the full partition of page ids every step when N <= 256, else every 16th and at the end).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from core.batch import MicroBatch
from core.kv_cache import PageCounter
from core.policies import BatchPlan, make_policy
from core.request import Request, Status
from core.scheduler import Scheduler, SchedulerConfig

# One decision: (batch id, ((request id, start, num_tokens, is_prefill), ...))
Decision = tuple[int, tuple[tuple[int, int, int, bool], ...]]


# ---------------------------------------------------------------- construction
def make_scheduler(policy: str = "token_throttling", *, pp: int = 4, num_pages: int = 1024,
                   page_size: int = 16, stage_time_model: Any = None, **params: Any) -> Scheduler:
    """A Scheduler with the named policy (built-in name or dotted path) and its parameters."""
    return Scheduler(SchedulerConfig(pp=pp, num_pages=num_pages, page_size=page_size),
                     make_policy(policy, params), stage_time_model=stage_time_model)


def make_requests(specs: Iterable[tuple[int, int]], *, first_id: int = 0) -> list[Request]:
    """Fresh requests from (prompt_len, max_output) pairs, ids in order."""
    return [Request(id=first_id + i, prompt_len=p, max_output=o) for i, (p, o) in enumerate(specs)]


# ---------------------------------------------------------------- user policy (dotted path)
@dataclass
class FixedPlanPolicy:
    """A user policy for the dotted-path test: a fixed prefill budget, every ready decode."""
    prefill: int = 64
    bound: bool = field(default=False, init=False)   # state, not a parameter

    def __post_init__(self) -> None:
        if not (isinstance(self.prefill, int) and self.prefill >= 0):
            raise ValueError(f"FixedPlanPolicy.prefill must be an int >= 0, got {self.prefill!r}")

    def bind(self, view) -> None:
        self.bound = True

    def plan(self, view) -> BatchPlan:
        return BatchPlan(max_decodes=view.num_ready, prefill_budget=self.prefill)


class NotAPolicy:
    """Has no plan()/bind(): naming it by dotted path must fail clearly."""


# ---------------------------------------------------------------- invariants
def held_pages(s: Scheduler) -> list[int]:
    return [p for r in s.requests for p in r.pages]


def check_pages(s: Scheduler, full: bool = True) -> None:
    """No page leaked or shared: requests' pages and free pages partition range(N). A
    PageCounter (the simulator's) names no pages: only the count is checked."""
    held = held_pages(s)
    if isinstance(s.kv, PageCounter):
        assert len(held) + s.kv.num_free == s.total_pages, "page count off"
        return
    assert len(set(held)) == len(held), "a page is held by two requests (or twice by one)"
    assert len(held) + s.kv.num_free == s.total_pages, (
        f"page count off: held {len(held)} + free {s.kv.num_free} != total {s.total_pages}")
    if full:
        free = list(s.kv._free)
        allp = set(held) | set(free)
        assert len(set(free)) == len(free), "a page is free twice"
        assert allp == set(range(s.total_pages)), "pages out of range or missing"
        assert set(held).isdisjoint(free), "a held page is also free"


def check_prefill_debt(s: Scheduler) -> None:
    """Every started, unfinished prompt is owed exactly the pages it still needs (its
    prefill_debt), and the scheduler's running sum is theirs."""
    decoding = {r.id for r in s.ready} | {r.id for b in s.in_flight.values() for r in b.decodes}
    for r in s.requests:
        if r.is_finished:
            continue
        prefilling = bool(r.pages) and r.id not in decoding   # waiting, or a chunk in flight
        owed = s.kv.pages_for(r.num_tokens) - len(r.pages) if prefilling else 0
        assert r.prefill_debt == owed, f"request {r.id}: prefill_debt {r.prefill_debt}, owes {owed} pages"
    assert s.prefill_debt == sum(r.prefill_debt for r in s.requests), "prefill debt sum off"


def check_invariants(s: Scheduler, full_pages: bool = True) -> None:
    requeue = bool(getattr(s.policy, "requeue_chunks", False))
    check_pages(s, full_pages)
    check_prefill_debt(s)
    assert len(s.in_flight) <= s.pp, f"{len(s.in_flight)} batches in flight, pp={s.pp}"

    # Where each request is in the in-flight window (batches in id = send order).
    where: dict[int, list[tuple[int, Any]]] = {}
    batch_ids = list(s.in_flight)
    assert batch_ids == sorted(batch_ids), "in-flight batches out of order"
    for bid, b in s.in_flight.items():
        ids = [it.request.id for it in b.items]
        assert len(ids) == len(set(ids)), f"batch {bid}: a request appears twice"
        for it in b.items:
            where.setdefault(it.request.id, []).append((bid, it))
    by_id = {r.id: r for r in s.requests}
    for rid, items in where.items():
        r = by_id[rid]
        assert r.in_flight == len(items), f"request {rid}: in_flight={r.in_flight}, in {len(items)} batches"
        if len(items) > 1:
            assert requeue, f"request {rid} is in {len(items)} in-flight batches without requeue_chunks"
            assert all(it.is_prefill for _, it in items), f"request {rid}: a decode overlaps another step"
            for (_, a), (_, b) in zip(items, items[1:]):
                assert a.start + a.num_tokens == b.start, f"request {rid}: non-consecutive chunks"
                assert not a.samples, f"request {rid}: a sampling chunk is followed by another"

    waiting_ids = [r.id for r in s.waiting]
    ready_ids = [r.id for r in s.ready]
    late_ids = [r.id for r in s.late]
    assert len(set(late_ids)) == len(late_ids), "a request is twice in late"
    assert not set(late_ids) & (set(waiting_ids) | set(ready_ids)), "a late request is in another queue too"
    assert not late_ids or getattr(s.policy, "late_after", None) is not None, "a late queue without late_after"
    # Late prompts never started (nor were preempted: those keep the front), in arrival order.
    for r in s.late:
        assert r.status is Status.WAITING and not r.pages and not r.in_flight and not r.preemptions \
            and r.num_scheduled == 0, f"late request {r.id}: {r.status}, {len(r.pages)} pages, started or preempted"
    assert [(r.arrival, r.id) for r in s.late] == sorted((r.arrival, r.id) for r in s.late), "late out of order"
    assert s.num_waiting == len(waiting_ids) + len(late_ids), "num_waiting leaves out a queue"
    assert len(set(waiting_ids)) == len(waiting_ids), "a request is twice in waiting"
    if s._queue_key is not None:   # the part _insert_by_key bisects
        tail = list(s.waiting)[s._sorted_from:]
        assert 0 <= s._sorted_from <= len(s.waiting), f"_sorted_from {s._sorted_from} outside waiting"
        assert not any(r.pages for r in tail), "a page holder in the sorted part of waiting"
        keys = [s._queue_key(r) for r in tail]
        assert keys == sorted(keys), "the sorted part of waiting is out of key order"
    assert len(set(ready_ids)) == len(ready_ids), "a request is twice in ready"
    assert not set(waiting_ids) & set(ready_ids), "a request is both waiting and ready"
    # Page holders precede non-holders in `waiting` (head-of-line liveness relies on it).
    seen_nonholder = False
    for r in s.waiting:
        if r.pages:
            assert not seen_nonholder, f"request {r.id}: page holder behind a non-holder"
        else:
            seen_nonholder = True
    # With a queue key, the prompts that never held pages wait in its order.
    key = getattr(s.policy, "queue_key", None)
    if key is not None:
        fresh = [key(r) for r in s.waiting if not r.pages and not r.preemptions]
        assert fresh == sorted(fresh), "waiting prompts out of the policy's queue order"
    for r in s.waiting:
        assert r.status is Status.WAITING, f"request {r.id} in waiting with status {r.status}"
        assert r.num_unscheduled > 0, f"request {r.id} in waiting with nothing to schedule"
        if r.in_flight:
            assert requeue, f"request {r.id} waiting while in flight without requeue_chunks"
    for r in s.ready:
        assert r.status is Status.RUNNING and r.in_flight == 0, f"request {r.id}: bad ready state"
        assert r.num_unscheduled == 1 and r.num_computed == r.num_scheduled, f"request {r.id}: not decodable"

    in_queue = set(waiting_ids) | set(ready_ids) | set(late_ids) | set(where)
    unfinished = holding = 0
    ps = s.page_size
    FINISHED, REJECTED = Status.FINISHED, Status.REJECTED
    for r in s.requests:
        if r.pages:
            holding += 1
        st = r.status
        if st is FINISHED or st is REJECTED:
            # Queued requests have status WAITING/RUNNING (checked above), so a finished
            # one is in no queue; it keeps pages only while an in-flight batch uses them.
            assert not r.pages or (st is FINISHED and r.in_flight), f"finished request {r.id} still holds pages"
            continue
        unfinished += 1
        assert r.id in in_queue, f"request {r.id} ({st}) is in no queue and not in flight: dropped"
        assert len(r.pages) * ps >= r.num_scheduled, (
            f"request {r.id}: {len(r.pages)} pages hold fewer than {r.num_scheduled} scheduled tokens")
        assert r.num_computed <= r.num_scheduled <= r.num_tokens
        assert r.tokens_computed_total >= r.num_scheduled
        assert r.num_output < r.max_output
        assert not r.output_ids or len(r.output_ids) == r.num_output  # ids, where sampled, match the count
    # The running sums policies read must match the state they summarise.
    assert s.num_unfinished == unfinished
    assert s.waiting_tokens == sum(r.num_unscheduled for r in s.waiting) + sum(r.num_unscheduled for r in s.late), \
        "waiting_tokens drifted"
    assert s.num_running == len(s.ready) + len(where), "num_running drifted"
    assert s.num_holding_pages == holding, "num_holding_pages drifted"


# ---------------------------------------------------------------- executor
@dataclass
class DriveResult:
    scheduler: Scheduler
    requests: list[Request]
    log: list[Decision] = field(default_factory=list)
    completions: list[int] = field(default_factory=list)   # batch ids in completion order
    steps: int = 0
    end_time: float = 0.0


def arrival_times(n: int, seed: int) -> list[float]:
    """Seeded, nondecreasing integer arrival times (bursts and gaps)."""
    rng = random.Random(seed)
    t, out = 0, []
    for _ in range(n):
        t += rng.choice((0, 0, 1, 2, 5))
        out.append(float(t))
    return out


def drive(scheduler: Scheduler, requests: Sequence[Request], *, arrivals: bool = False, seed: int = 0,
          check: bool = True, max_steps: int | None = None,
          hook: Callable[[Scheduler, float, "DriveResult"], None] | None = None) -> DriveResult:
    """Run `requests` to completion through `scheduler` with a FIFO pipeline on a logical clock.

    arrivals=False: every request is added at t=0 in order. arrivals=True: request i is
    added when the clock reaches its seeded arrival time. Each step: add arrivals due,
    ask for batches until None, complete the oldest in-flight batch, tick the clock.
    `hook(scheduler, now, result)` runs after every completion (e.g. to abort requests).
    """
    s = scheduler
    reqs = list(requests)
    if arrivals:
        for r, t in zip(reqs, arrival_times(len(reqs), seed)):
            r.arrival = t
    res = DriveResult(s, reqs)
    pending = sorted(range(len(reqs)), key=lambda i: (reqs[i].arrival if arrivals else 0.0, i))
    nxt = 0
    now = 0.0
    if max_steps is None:
        max_steps = 1000 + 4 * sum(r.prompt_len + r.max_output for r in reqs) * (1 + s.pp)
    full_every = 1 if s.total_pages <= 256 else 16
    while True:
        while nxt < len(pending) and (not arrivals or reqs[pending[nxt]].arrival <= now):
            s.add(reqs[pending[nxt]], now)
            nxt += 1
        while (batch := s.next_batch(now)) is not None:
            assert batch.items, "next_batch returned an empty batch"
            res.log.append((batch.id, tuple((it.request.id, it.start, it.num_tokens, it.is_prefill)
                                            for it in batch.items)))
            if check:
                check_invariants(s, full_pages=(len(res.log) % full_every == 0))
        if s.in_flight:
            oldest = next(iter(s.in_flight.values()))
            s.complete(oldest, now, None)
            res.completions.append(oldest.id)
        elif nxt < len(pending):
            now = max(now, reqs[pending[nxt]].arrival)
            continue
        elif s.has_work:
            raise AssertionError(f"deadlock at t={now}: work left, nothing in flight, no batch formed "
                                 f"(waiting={len(s.waiting)}, ready={len(s.ready)}, free={s.free_pages})")
        else:
            break
        res.steps += 1
        if hook is not None:
            hook(s, now, res)
        now += 1.0
        if check:
            check_invariants(s, full_pages=(res.steps % full_every == 0))
        if res.steps > max_steps:
            raise AssertionError(f"no termination after {res.steps} steps (livelock?)")
    res.end_time = now
    if check:
        check_invariants(s, full_pages=True)
    return res


def complete_oldest(s: Scheduler, now: float, sampled: Sequence[int] | None = None) -> MicroBatch:
    """Complete the oldest in-flight batch (what the pipeline returns next)."""
    batch = next(iter(s.in_flight.values()))
    s.complete(batch, now, sampled)
    return batch


def items_of(batch: MicroBatch) -> list[tuple[int, int, int, bool]]:
    """A batch as (request id, start, num_tokens, is_prefill) tuples, in item order."""
    return [(it.request.id, it.start, it.num_tokens, it.is_prefill) for it in batch.items]


def wait_until(cond: Callable[[], Any], what: str, limit_s: float = 30.0) -> None:
    """Poll a condition an engine or server reaches asynchronously (a hang fails; no speed asserted)."""
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


def load_benchmark(name: str):
    """Import a script of benchmarks/ (not a package) by its file name, without the .py."""
    import importlib.util
    import sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module     # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
