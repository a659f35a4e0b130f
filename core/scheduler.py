"""The one scheduler both worlds run: queues, KV pages, in-flight window, policy.

Contract (design.md): `add(request)`, `next_batch(now)` -> MicroBatch | None (None when
`pp` batches are in flight or nothing can run), `complete(batch, now, sampled)` when a
micro-batch leaves the last stage. Preemption, page allocation and request state changes
happen only here. Every operation costs O(batch size), never O(queue length): the
counts policies read are running sums.

A plan may also be in seconds (`BatchPlan.time_budget`): decodes are taken first, uncut,
then each prefill chunk is cut so the batch's predicted time on its slowest stage stays
within the budget, priced by the `stage_time_model` the caller hands in (the latency model
its stage times come from; core.cost_model). Plans without one pay a single None check.

Waiting requests are served first come, first served, unless the policy has a
`queue_key`: new requests are then kept in its order behind those holding pages. A policy
with a `late_after` (seconds) moves a prompt that has waited that long without starting to
`late`, a second queue served only when `waiting` is empty: under a TTFT SLO such a prompt
has missed it, and serving it first makes the ones behind it miss it too.

A prompt starts prefill once its first chunk fits (vLLM with chunked prefill), or, when a
plan sets `admit_whole_prompts`, only once the pages free beyond those still owed to
started prompts (`prefill_debt`) hold all of it: docs/architecture.md says why.
"""
from __future__ import annotations

import bisect
import heapq
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from core.batch import BatchItem, MicroBatch
from core.cost_model import StageTimeModel, largest_chunk
from core.kv_cache import PageAllocator, PageCounter
from core.policies import BatchPlan, Policy
from core.request import Request, Status
from core.trace import TraceRecorder


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    pp: int
    num_pages: int
    page_size: int = 16
    # False: pages are counted, not named (core.kv_cache.PageCounter): the simulator's
    # choice, which no decision can tell apart; the runtime needs real page ids
    page_ids: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.pp, int) and self.pp >= 1):
            raise ValueError(f"pp must be an int >= 1, got {self.pp!r}")
        if not (isinstance(self.num_pages, int) and self.num_pages >= 1):
            raise ValueError(f"num_pages must be an int >= 1, got {self.num_pages!r}")
        if not (isinstance(self.page_size, int) and self.page_size >= 1):
            raise ValueError(f"page_size must be an int >= 1, got {self.page_size!r}")
        if not isinstance(self.page_ids, bool):
            raise ValueError(f"page_ids must be true or false, got {self.page_ids!r}")


class Scheduler:
    def __init__(self, config: SchedulerConfig, policy: Policy, recorder: TraceRecorder | None = None,
                 stage_time_model: StageTimeModel | None = None) -> None:
        """`stage_time_model`: the predicted stage time of a batch shape (the latency model of
        the table the caller runs with); policies that plan in seconds need it."""
        self.config = config
        self.pp = config.pp
        self.page_size = config.page_size
        self.total_pages = config.num_pages
        self.kv = (PageAllocator if config.page_ids else PageCounter)(config.num_pages, config.page_size)
        self.policy = policy
        self.recorder = recorder
        self.stage_time_model = stage_time_model
        self.requests: list[Request] = []          # every request ever added, in order
        self.waiting: deque[Request] = deque()     # prompt (or recompute) left to schedule
        self.ready: deque[Request] = deque()       # can decode one more token
        self.late: deque[Request] = deque()        # waited past late_after without starting
        self.in_flight: dict[int, MicroBatch] = {}  # batch id -> batch, oldest first
        self._waiting_tokens = 0
        self._requests_in_flight = 0
        self._holding_pages = 0
        self._prefill_debt = 0   # sum of Request.prefill_debt
        self._unfinished = 0
        self._next_batch_id = 0
        self.forced_batches = 0
        policy.bind(self)
        self._queue_key = getattr(policy, "queue_key", None)   # None: first come, first served
        self._late_after: float | None = getattr(policy, "late_after", None)   # None: no late queue
        self._due: list[tuple[float, int, Request]] = []   # (arrival, id, request): when each turns late
        # With a queue_key, waiting[_sorted_from:] is page-less and in key order, so a new
        # request finds its place by bisection. The front part holds page holders and
        # preempted requests, which keep the front whatever their key.
        self._sorted_from = 0

    # ---- the read-only view policies see ----
    @property
    def free_pages(self) -> int:
        return self.kv.num_free

    @property
    def waiting_tokens(self) -> int:
        return self._waiting_tokens

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.late)

    @property
    def num_ready(self) -> int:
        return len(self.ready)

    @property
    def num_in_flight(self) -> int:
        return len(self.in_flight)

    @property
    def num_running(self) -> int:
        return len(self.ready) + self._requests_in_flight

    @property
    def num_holding_pages(self) -> int:
        return self._holding_pages

    @property
    def prefill_debt(self) -> int:
        """Pages the started, unfinished prompts still need to finish their prefill (kept
        for every plan; `BatchPlan.admit_whole_prompts` admits against it)."""
        return self._prefill_debt

    @property
    def num_unfinished(self) -> int:
        return self._unfinished

    @property
    def has_work(self) -> bool:
        return self._unfinished > 0

    # ---- contract ----
    def add(self, request: Request, now: float | None = None) -> bool:
        """Queue a request; one that can never fit in the KV cache is rejected (and kept in the trace)."""
        self.requests.append(request)
        if self.kv.pages_for(request.max_kv_tokens) > self.total_pages:
            request.status = Status.REJECTED
            request.finish_reason = "too_long"
            request.finish_time = request.arrival if now is None else now
            return False
        request.status = Status.WAITING
        if self._queue_key is None:
            self.waiting.append(request)
        else:
            self._insert_by_key(request, self._queue_key)
        if self._late_after is not None:
            heapq.heappush(self._due, (request.arrival, request.id, request))
        self._waiting_tokens += request.num_unscheduled
        self._unfinished += 1
        return True

    def next_batch(self, now: float) -> MicroBatch | None:
        if self._late_after is not None and self._due:
            self._move_late(now)
        if len(self.in_flight) >= self.pp or not (self.waiting or self.ready or self.late):
            return None
        plan = self.policy.plan(self)
        batch = MicroBatch(self._next_batch_id, now)
        self._fill(batch, plan, now)
        # Liveness: nothing was chosen and nothing in flight will ever change that. Preempt
        # the newest page holder so older requests can go on; with one holder left, take a
        # batch of whatever fits, counted in `forced_batches` so it is never silent.
        while not (batch.decodes or batch.chunks) and not self.in_flight:
            if self._preempt_newest_holder():
                self._fill(batch, self.policy.plan(self), now)
            else:
                self.forced_batches += 1
                self._fill(batch, BatchPlan(len(self.ready), max(1, self.kv.num_free * self.page_size)), now)
                break
        if not (batch.decodes or batch.chunks):
            return None
        self._next_batch_id += 1
        self.in_flight[batch.id] = batch
        self._requests_in_flight += len(batch.decodes)  # _take_decodes set their in_flight
        for item in batch.chunks:
            r = item.request
            if r.in_flight == 0:
                self._requests_in_flight += 1
            r.in_flight += 1
        self._sample(now)
        return batch

    def complete(self, batch: MicroBatch, now: float, sampled: Sequence[int] | None = None) -> list[Request]:
        """A micro-batch left the last stage. `sampled`: one token id per sampling item, in
        `batch.items` order (decodes, then chunks); None in simulation (token id 0)."""
        # Validate before touching any state, so a bad call cannot half-apply the batch:
        # the very batch object must be in flight (a same-id batch from another scheduler
        # was accepted), and the sampled count is checked before the batch is dropped.
        if self.in_flight.get(batch.id) is not batch:
            raise ValueError(f"micro-batch {batch.id} is not in flight")
        if sampled is not None and len(sampled) != batch.num_samples:
            raise ValueError(f"micro-batch {batch.id}: {len(sampled)} sampled tokens for "
                             f"{batch.num_samples} sampling items")
        del self.in_flight[batch.id]
        num_decodes = len(batch.decodes)
        # Decodes sample first (batch.items order). The simulator samples no ids: its tokens
        # are counted by their times (stop tokens see id 0).
        tokens = None if sampled is None else iter(sampled[num_decodes:])
        finished: list[Request] = []
        self._requests_in_flight -= num_decodes
        if sampled is None:
            self._complete_decodes_sim(batch.decodes, now, finished)
        else:
            self._complete_decodes(batch.decodes, sampled[:num_decodes], now, finished)
        running = Status.RUNNING
        back_to_waiting = []
        for item in batch.chunks:
            r = item.request
            r.in_flight -= 1
            if r.in_flight == 0:
                self._requests_in_flight -= 1
            token = (next(tokens) if tokens is not None else 0) if item.samples else None
            if r.is_finished:
                self._release_if_idle(r)
                continue
            end = item.start + item.num_tokens  # item.context_len
            if end > r.num_computed:
                r.num_computed = end
            if token is not None:
                if tokens is not None:
                    r.output_ids.append(token)
                self._append_token(r, token, now, finished)
            elif r.status is running and r.num_unscheduled > 0 and r.in_flight == 0:
                r.status = Status.WAITING
                back_to_waiting.append(r)  # paper-era chunking: next chunk only after this one returns
        for r in reversed(back_to_waiting):
            self.waiting.appendleft(r)
            self._waiting_tokens += r.num_unscheduled
        self._sorted_from += len(back_to_waiting)
        self._sample(now)
        return finished

    def _complete_decodes(self, decodes: list[Request], tokens: Sequence[int], now: float,
                          finished: list[Request]) -> None:
        for r, token in zip(decodes, tokens):
            r.in_flight = 0
            if r.status is not Status.RUNNING:  # aborted while in flight
                self._release_if_idle(r)
                continue
            r.num_computed = r.num_scheduled
            r.output_ids.append(token)
            self._append_token(r, token, now, finished)

    def _complete_decodes_sim(self, decodes: list[Request], now: float, finished: list[Request]) -> None:
        """`_complete_decodes` without token ids: the simulator's hot path, one pass per
        decode token (~4 million on the Azure conversation trace), inlined. The survivors go
        back to `ready` in one extend, in batch order, unless one finished or was aborted."""
        running = Status.RUNNING
        all_running = True
        for r in decodes:
            r.in_flight = 0
            if r.status is not running:
                self._release_if_idle(r)
                all_running = False
                continue
            r.num_computed = r.num_scheduled
            times = r.token_times
            times.append(now)
            if len(times) >= r.max_output:
                self._finish(r, now, "length")
                finished.append(r)
                all_running = False
            elif r.stop_token_ids and 0 in r.stop_token_ids:  # the simulator's token id is 0
                self._finish(r, now, "stop")
                finished.append(r)
                all_running = False
        self.ready.extend(decodes if all_running else [r for r in decodes if r.status is running])

    def _append_token(self, r: Request, token: int, now: float, finished: list[Request]) -> None:
        """One generated token's time (its id, where there is one, is already in output_ids)."""
        r.token_times.append(now)
        if len(r.token_times) >= r.max_output:
            self._finish(r, now, "length")
            finished.append(r)
        elif token in r.stop_token_ids:
            self._finish(r, now, "stop")
            finished.append(r)
        else:
            self.ready.append(r)

    def abort(self, request: Request, now: float) -> None:
        """Stop a request (client gone); pages are freed once no in-flight batch uses them."""
        if request.is_finished:
            return
        if request.status is Status.WAITING:
            (self.late if request in self.late else self.waiting).remove(request)  # O(queue): aborts are rare
            self._sorted_from = min(self._sorted_from, len(self.waiting))
            self._waiting_tokens -= request.num_unscheduled
        elif request in self.ready:
            self.ready.remove(request)
        self._finish(request, now, "aborted")

    # ---- mechanics ----
    def _fill(self, batch: MicroBatch, plan: BatchPlan, now: float) -> None:
        decodes = self._take_decodes(batch, plan, now)
        budget = plan.prefill_budget
        if plan.token_budget is not None:
            budget = min(budget, plan.token_budget - decodes)
        self._take_prefills(batch, plan, budget, now)

    def _take_decodes(self, batch: MicroBatch, plan: BatchPlan, now: float) -> int:
        ready, kv, page_size = self.ready, self.kv, self.page_size
        want = min(plan.max_decodes, len(ready))
        if plan.reserve_page_per_decode:
            while ready and kv.num_free < want:
                self._preempt(ready.pop())
                want = min(want, len(ready))
        decodes = batch.decodes
        context = 0
        if kv.num_free >= want:
            # Hot path (millions of decode tokens per trace): a free page for every decode,
            # so none can need a preemption; take them all at once, then add pages.
            if want == len(ready):   # the usual case (91% of decode tokens on the Azure trace)
                taken = list(ready)
                ready.clear()
            else:
                popleft = ready.popleft
                taken = [popleft() for _ in range(want)]
            allocate_one = kv.allocate_one
            for r in taken:
                n = r.num_scheduled
                if not n % page_size:  # pages hold exactly ceil(n / page_size): the next token opens one
                    r.pages.append(allocate_one())
                r.num_scheduled = n = n + 1
                r.in_flight = 1  # ready requests are never in flight; the batch is dispatched below
                context += n
            decodes += taken
        else:  # short of pages: decode by decode, preempting as pages run out
            count = 0
            while count < want:  # want <= count + len(ready)
                r = ready[0]
                n = r.num_scheduled
                if not n % page_size:
                    while not kv.num_free and len(ready) > 1:
                        self._preempt(ready.pop())  # newest-ready first, so the oldest keep going
                        want = min(want, count + len(ready))
                    if not kv.num_free:
                        break
                    r.pages.append(kv.allocate_one())
                ready.popleft()
                r.num_scheduled = n = n + 1
                r.in_flight = 1
                context += n
                decodes.append(r)
                count += 1
        batch.decode_tokens += len(decodes)
        batch.decode_context += context
        batch.num_samples += len(decodes)
        return len(decodes)

    def _take_prefills(self, batch: MicroBatch, plan: BatchPlan, budget: int, now: float) -> None:
        # Hot path (one call per micro-batch, ~10^5 chunks per trace): queue, allocator and
        # batch sums are read and written inline.
        waiting, late, kv, page_size = self.waiting, self.late, self.kv, self.page_size
        new_allowed, max_chunk, requeue = plan.max_new_requests, plan.max_chunk, plan.requeue_chunks
        time_budget, whole = plan.time_budget, plan.admit_whole_prompts
        if time_budget is not None and self.stage_time_model is None:
            raise ValueError(f"{type(self.policy).__name__} planned a time_budget, but the scheduler has no "
                             "stage_time_model to price prefill chunks with")
        running = Status.RUNNING
        kept: list[Request] = []  # partly scheduled requests that stay at the front (requeue_chunks)
        while budget > 0:
            queue = waiting if waiting else late   # late prompts only once no other waits
            if not queue:
                break
            r = queue[0]
            pages = r.pages
            held = len(pages)
            if not held and new_allowed is not None and new_allowed <= 0:
                break
            start = r.num_scheduled
            known = r.prompt_len + len(r.token_times)  # r.num_tokens
            n = min(known - start, budget)
            if max_chunk is not None:
                n = min(n, max_chunk)
            n = min(n, (held + kv.num_free) * page_size - start)  # room in pages held + free
            if time_budget is not None and n > 0:
                # The chunk the predicted time allows; the first `min_prefill` tokens of the
                # batch are exempt, so a backlog drains even when decodes fill the budget.
                n = largest_chunk(self.stage_time_model, batch.prefill_tokens, batch.decode_tokens,
                                  batch.prefill_attention_work, batch.decode_context, start, n, time_budget,
                                  max(0, min(n, plan.min_prefill - batch.prefill_tokens)))
            if n <= 0:
                break  # FIFO: the head waits for pages (or time), nobody overtakes it
            if not held:
                target = kv.pages_for(known)
                if whole and kv.num_free - self._prefill_debt < target:
                    break
                r.prefill_debt = target
                self._prefill_debt += target
            queue.popleft()
            if queue is waiting and self._sorted_from:
                self._sorted_from -= 1
            r.status = running
            self._waiting_tokens -= n
            end = start + n
            need = kv.extra_pages(held, end)
            if need:
                if not held:
                    self._holding_pages += 1
                pages.extend(kv.allocate(need))
                r.prefill_debt -= need
                self._prefill_debt -= need
            r.num_scheduled = end
            if r.first_scheduled is None:
                r.first_scheduled = now
            samples = end == known
            batch.chunks.append(BatchItem(r, start, n, True, samples))
            batch.prefill_tokens += n  # what batch.add does for a prefill item
            batch.prefill_attention_work += n * end
            batch.num_samples += samples
            budget -= n
            if not held and new_allowed is not None:
                new_allowed -= 1
            if end < known and requeue:
                r.status = Status.WAITING
                kept.append(r)
            elif end < known:
                # Paper-era chunking: r leaves `waiting` until this chunk returns, and
                # complete() adds its remaining tokens back; drop them from WT now, or WT
                # counts them twice from then on (tests/test_scheduler.py caught the drift).
                self._waiting_tokens -= known - end
        for r in reversed(kept):
            waiting.appendleft(r)
        self._sorted_from += len(kept)

    def _move_late(self, now: float) -> None:
        """Prompts that arrived more than `late_after` ago and have not started go to the back
        of `late`, in arrival order. Each request is checked once, when it turns late; one
        that has started (or was preempted: those keep the front) stays. O(its place in
        `waiting`): late prompts are near its front, the oldest there."""
        due, cutoff = self._due, now - self._late_after   # type: ignore[operator]
        while due and due[0][0] < cutoff:
            r = heapq.heappop(due)[2]
            if r.status is Status.WAITING and not r.pages and not r.preemptions and not r.in_flight:
                self.waiting.remove(r)   # from either part: what stays behind is still in order
                self.late.append(r)
        self._sorted_from = min(self._sorted_from, len(self.waiting))

    def _insert_by_key(self, request: Request, key) -> None:
        """Just behind the last waiting request whose key is no larger than its own, and never
        ahead of a page holder. Preempted requests still go to the front (`_preempt`); the
        others stay in key order. Bisects the sorted part, then scans the front part only if
        the request goes ahead of all of it. A scan from the back is O(n^2) over a backlog:
        the whole conversation trace at t=0 (deferral 0.3, A100 pp4) took 30 s, not 3.1 s."""
        waiting, front = self.waiting, self._sorted_from
        k = key(request)
        i = bisect.bisect_right(waiting, k, lo=front, key=key)
        if i == front:
            while i and not waiting[i - 1].pages and key(waiting[i - 1]) > k:
                i -= 1
            if i < front:
                self._sorted_from += 1
        waiting.insert(i, request)

    def _preempt(self, r: Request) -> None:
        """Recompute-style preemption: drop the KV, go back to the front of `waiting`."""
        self._free_pages(r)
        r.tokens_recomputed += r.num_scheduled
        r.num_computed = r.num_scheduled = 0
        r.status = Status.WAITING
        r.preemptions += 1
        # Front of `waiting`, but behind partly prefilled requests that hold pages (vLLM
        # serves running before waiting); else the victim would take its pages straight back.
        pos = 0
        while pos < len(self.waiting) and self.waiting[pos].pages:
            pos += 1
        self.waiting.insert(pos, r)
        self._sorted_from = self._sorted_from + 1 if pos <= self._sorted_from else pos + 1
        self._waiting_tokens += r.num_unscheduled

    def _preempt_newest_holder(self) -> bool:
        """Rare path, O(queue): preempt the newest page holder not in flight, if it is not the only one."""
        holders = [r for r in self.ready if r.pages] + [r for r in self.waiting if r.pages and not r.in_flight]
        if len(holders) < 2:
            return False
        victim = max(holders, key=lambda r: (r.arrival, r.id))
        if victim.status is Status.WAITING:
            self.waiting.remove(victim)
            self._sorted_from = min(self._sorted_from, len(self.waiting))
            self._waiting_tokens -= victim.num_unscheduled
        else:
            self.ready.remove(victim)
        self._preempt(victim)
        return True

    def _finish(self, r: Request, now: float, reason: str) -> None:
        r.status = Status.FINISHED
        r.finish_time = now
        r.finish_reason = reason
        self._unfinished -= 1
        self._release_if_idle(r)

    def _release_if_idle(self, r: Request) -> None:
        if r.in_flight == 0 and r.pages:
            self._free_pages(r)

    def _free_pages(self, r: Request) -> None:
        if r.pages:
            self.kv.free(r.pages)
            r.pages = r.pages[:0]   # a new, empty list of the same kind (the runtime's is array('i'))
            self._holding_pages -= 1
            self._prefill_debt -= r.prefill_debt   # a preempted or aborted prompt's promise lapses
            r.prefill_debt = 0

    def _sample(self, now: float) -> None:
        if self.recorder is not None:
            ready = len(self.ready)
            self.recorder.sample(now, self.total_pages - self.kv.num_free, self.total_pages,
                                 len(self.waiting) + len(self.late),
                                 ready, len(self.in_flight), ready + self._requests_in_flight)
