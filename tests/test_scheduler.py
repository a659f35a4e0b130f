"""Property-based tests of the core Scheduler under every built-in policy.

Random workloads run to completion through `tests.helpers.drive` (a FIFO pipeline on a
logical clock), which checks the scheduler's invariants after every step: pages are
never leaked or shared, at most `pp` batches are in flight, a request is in two in-flight
batches only as consecutive prefill chunks under `requeue_chunks`, pages cover every
scheduled token, and the running sums the policies read (WT, Rn, page holders) match the
queues. At the end every admitted request has finished with exactly `max_output` tokens
and all pages are free. Plus unit tests of abort, complete() validation and stop tokens.
"""
from __future__ import annotations

import copy
import functools
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.request import Request, Status
from core.policies import make_policy
from core.scheduler import Scheduler, SchedulerConfig
from tests.helpers import (check_invariants, complete_oldest, drive, items_of, make_requests,
                           make_scheduler)

# PIPETWIN_HYPOTHESIS_EXAMPLES raises the example count for a long bug hunt (default 80).
N_EXAMPLES = int(os.environ.get("PIPETWIN_HYPOTHESIS_EXAMPLES", "80"))
PROPS = settings(max_examples=N_EXAMPLES, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEWER = settings(PROPS, max_examples=max(10, N_EXAMPLES * 2 // 5))


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


# ---------------------------------------------------------------- strategies
REQUEST = st.tuples(st.integers(1, 400), st.integers(1, 50))   # (prompt_len, max_output)
# Hypothesis alone draws mostly tiny lists; half the workloads get a uniform size in 1..60.
WORKLOAD = st.one_of(
    st.lists(REQUEST, min_size=1, max_size=60),
    st.integers(1, 60).flatmap(lambda n: st.lists(REQUEST, min_size=n, max_size=n)),
)


@st.composite
def tt_params(draw, requeue: bool | None = None, maxd: bool | None = None) -> tuple[str, dict]:
    maxp = draw(st.one_of(st.just(2048), st.integers(8, 2048)))
    p: dict[str, Any] = {
        "maxp": maxp,
        "minp": draw(st.integers(0, min(maxp, 64))),
        "iterp": draw(st.integers(1, 16)),
        "kvthresh": draw(st.sampled_from([0.0, 0.05, 0.1, 0.3])),
        "requeue_chunks": draw(st.booleans()) if requeue is None else requeue,
    }
    if maxd is None:
        p["maxd"] = draw(st.one_of(st.none(), st.integers(1, 8)))
    elif maxd:
        p["maxd"] = draw(st.integers(1, 8))
    return "token_throttling", p


@st.composite
def sarathi_params(draw) -> tuple[str, dict]:
    return "sarathi", {"budget": draw(st.integers(8, 256))}


@st.composite
def vllm_params(draw) -> tuple[str, dict]:
    return "vllm", {
        "max_num_batched_tokens": draw(st.integers(8, 512)),
        "max_num_seqs": draw(st.one_of(st.integers(1, 8), st.just(256))),
        "long_prefill_token_threshold": draw(st.one_of(st.just(0), st.integers(1, 64))),
    }


@st.composite
def tb_params(draw, fill: float | None = None, max_chunk: bool | None = None) -> tuple[str, dict]:
    _, p = draw(tt_params())
    p["fill"] = draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0, 4.0]), st.floats(0, 4))) if fill is None else fill
    # Caps from 16 tokens: a cap of a few tokens, no KV reserve (kvthresh 0) and a cache that
    # barely holds the largest request spread the cache over partial prompts, and preemption
    # makes slow progress (measured: a cap of 1, 427 one-token pages, 44 prompts at once:
    # 134,669 batches, 75x the tokens recomputed; Token Throttling without the cap 18x,
    # vLLM-style with threshold 1 3x). Every request still finishes: that is the policies'
    # admission semantics (a prompt starts when its chunk fits, as in vLLM), not a livelock,
    # but drive's step bound would call it one.
    caps = st.integers(16, 256)
    if max_chunk is None:
        p["max_chunk"] = draw(st.one_of(st.none(), caps))
    elif max_chunk:
        p["max_chunk"] = draw(caps)
    p["admit_whole_prompts"] = draw(st.booleans()) if fill is None else False
    # Deferrals from none to far beyond the arrival gaps (drive's are 0-5 s): from FIFO to
    # shortest-prompt-first.
    p["defer_per_1k_tokens"] = draw(st.sampled_from([0.0, 0.0, 1.0, 1e6]) | st.floats(0, 100)) \
        if fill is None else 0.0
    # Late after: from within one arrival gap to beyond most runs; None (off) half the time.
    p["late_after"] = draw(st.sampled_from([None, None, 0.5, 3.0]) | st.floats(0.01, 50)) if fill is None else None
    return "time_balanced", p


class LinearStageTime:
    """t = base + per prefill token + per decode + per attention work + per context (>= 0),
    optionally declaring `monotone` (search_largest_chunk then interpolates), or falling
    with prefill below a knee of 64 tokens (a fit's weight-read floor may dip; the search
    must still answer)."""

    def __init__(self, coef: tuple[float, ...], monotone: bool, dip: float) -> None:
        self.coef, self.dip = coef, dip
        if monotone:
            self.monotone = True

    def predict(self, p: float, d: float, a: float, c: float) -> float:
        base, cp, cd, ca, cc = self.coef
        t = base + cp * p + cd * d + ca * a + cc * c
        return t - self.dip * p if p < 64 else t   # dip 0 when monotone is declared


@st.composite
def stage_time_models(draw):
    """A random linear model, or the fitted model of a shipped measured table (its own
    closed-form largest_chunk)."""
    if draw(st.integers(0, 3)) == 0:
        return fitted_model(draw(st.sampled_from(["llama-32m_cpu-1thread_pp2", "qwen2.5-14b_a100-80gb_pp4"])))
    coef = (draw(st.floats(0, 5e-3)), draw(st.floats(0, 1e-4)), draw(st.floats(0, 1e-4)),
            draw(st.floats(0, 1e-7)), draw(st.floats(0, 1e-7)))
    monotone = draw(st.booleans())
    dip = 0.0 if monotone else draw(st.sampled_from([0.0, 2 * coef[1]]))
    return LinearStageTime(coef, monotone, dip)


@functools.lru_cache(maxsize=None)
def fitted_model(profile: str):
    from profiles.latency_model import SlowestStage
    return SlowestStage.of_profile(profile)


ANY_POLICY = st.one_of(tt_params(), sarathi_params(), vllm_params())


@dataclass
class Scenario:
    specs: list[tuple[int, int]]
    policy: str
    params: dict
    pp: int
    num_pages: int
    page_size: int
    arrivals: bool
    seed: int
    model: Any = None   # the stage-time model time_balanced prices with

    def scheduler(self, policy: str | None = None, params: dict | None = None):
        return make_scheduler(policy or self.policy, pp=self.pp, num_pages=self.num_pages,
                              page_size=self.page_size, stage_time_model=self.model,
                              **(self.params if params is None else params))

    def requests(self) -> list[Request]:
        return make_requests(self.specs)


@st.composite
def scenarios(draw, policy=ANY_POLICY) -> Scenario:
    specs = draw(WORKLOAD)
    ps = draw(st.sampled_from([1, 4, 16]))
    need = max(pages_for(p + o - 1, ps) for p, o in specs)        # just enough for the largest
    plenty = max(need, sum(pages_for(p + o - 1, ps) for p, o in specs))  # everyone at once
    num_pages = draw(st.one_of(st.just(need), st.integers(need, 2 * need), st.integers(need, plenty)))
    name, params = draw(policy)
    return Scenario(specs, name, params, draw(st.integers(1, 8)), num_pages, ps,
                    draw(st.booleans()), draw(st.integers(0, 2**16)),
                    draw(stage_time_models()) if name == "time_balanced" else None)


# ---------------------------------------------------------------- end-of-run checks
def check_outcome(res) -> None:
    s = res.scheduler
    for r in res.requests:
        assert r.status is Status.FINISHED and r.finish_reason == "length", (r.id, r.status, r.finish_reason)
        assert r.num_output == r.max_output and not r.output_ids  # the simulator samples no ids
        assert r.in_flight == 0 and not r.pages
        minimum = r.prompt_len + r.max_output - 1   # prompt once, then one decode per later token
        if r.preemptions == 0:
            assert r.tokens_computed_total == minimum, (r.id, r.tokens_computed_total, minimum)
        else:
            assert r.tokens_computed_total > minimum, (r.id, r.tokens_computed_total, minimum)
    assert s.free_pages == s.total_pages
    assert not s.in_flight and not s.waiting and not s.ready
    assert s.waiting_tokens == 0 and s.num_running == 0 and s.num_holding_pages == 0
    assert s.num_unfinished == 0 and not s.has_work
    check_log(res)


def check_log(res) -> None:
    """Replay the decision log: every request's runs are contiguous from 0 (restarting at
    0 only after a preemption), and add up to its tokens_computed_total."""
    pos: dict[int, int] = {}
    total: dict[int, int] = {}
    restarts: dict[int, int] = {}
    for _, items in res.log:
        for rid, start, n, is_prefill in items:
            assert n >= 1
            if start != pos.get(rid, 0):
                assert start == 0 and is_prefill, f"request {rid}: run starts at {start}, expected {pos.get(rid, 0)}"
                restarts[rid] = restarts.get(rid, 0) + 1
            if not is_prefill:
                assert n == 1
            pos[rid] = start + n
            total[rid] = total.get(rid, 0) + n
    for r in res.requests:
        assert total.get(r.id, 0) == r.tokens_computed_total
        assert restarts.get(r.id, 0) <= r.preemptions
        assert pos.get(r.id, 0) == r.prompt_len + r.max_output - 1


def batch_sizes(items) -> tuple[int, int]:
    prefill = sum(n for _, _, n, p in items if p)
    decode = sum(n for _, _, n, p in items if not p)
    return prefill, decode


# ---------------------------------------------------------------- properties per policy
def check_token_throttling_limits(res, params: dict) -> None:
    """Unless a batch was forced: prefill within maxp, decodes within maxd, one prompt's
    chunk within max_chunk (time_balanced's), where they are set."""
    if res.scheduler.forced_batches:
        return
    for _, items in res.log:
        prefill, decode = batch_sizes(items)
        assert prefill <= params["maxp"]
        if params.get("maxd") is not None:
            assert decode <= params["maxd"]
        if params.get("max_chunk") is not None:
            assert all(n <= params["max_chunk"] for _, _, n, p in items if p)


@PROPS
@given(scenarios(tt_params()))
def test_token_throttling_runs_clean(sc: Scenario):
    res = drive(sc.scheduler(), sc.requests(), arrivals=sc.arrivals, seed=sc.seed)
    check_outcome(res)
    check_token_throttling_limits(res, sc.params)


@PROPS
@given(scenarios(tt_params(requeue=True, maxd=True)))
def test_token_throttling_requeue_chunks_and_maxd(sc: Scenario):
    res = drive(sc.scheduler(), sc.requests(), arrivals=sc.arrivals, seed=sc.seed)
    check_outcome(res)
    if res.scheduler.forced_batches == 0:
        for _, items in res.log:
            assert batch_sizes(items)[1] <= sc.params["maxd"]


@PROPS
@given(scenarios(sarathi_params()))
def test_sarathi_runs_clean(sc: Scenario):
    res = drive(sc.scheduler(), sc.requests(), arrivals=sc.arrivals, seed=sc.seed)
    check_outcome(res)
    if res.scheduler.forced_batches == 0:
        for _, items in res.log:
            assert sum(batch_sizes(items)) <= sc.params["budget"]


@PROPS
@given(scenarios(vllm_params()))
def test_vllm_runs_clean(sc: Scenario):
    seqs = sc.params["max_num_seqs"]

    def cap(s, now, res):  # max_num_seqs bounds the requests holding pages
        if s.forced_batches == 0:
            assert s.num_holding_pages <= seqs

    res = drive(sc.scheduler(), sc.requests(), arrivals=sc.arrivals, seed=sc.seed, hook=cap)
    check_outcome(res)
    if res.scheduler.forced_batches == 0:
        thr = sc.params["long_prefill_token_threshold"]
        for _, items in res.log:
            assert sum(batch_sizes(items)) <= sc.params["max_num_batched_tokens"]
            if thr:
                assert all(n <= thr for _, _, n, p in items if p)


@PROPS
@given(scenarios(tb_params()))
def test_time_balanced_runs_clean(sc: Scenario):
    """Whatever the model and parameters: every request finishes, invariants hold at every
    step (drive checks them), and Token Throttling's limits stay limits: the extra prefill
    is capped by the KV ramp x maxp, decodes by maxd, one prompt's chunk by max_chunk."""
    res = drive(sc.scheduler(), sc.requests(), arrivals=sc.arrivals, seed=sc.seed)
    check_outcome(res)
    check_token_throttling_limits(res, sc.params)
    check_queue_order(res)


def check_queue_order(res) -> None:
    """No prompt starts before one that had arrived and comes first (preempted requests
    aside: they go back to the front). With `late_after`, a prompt that had waited longer
    (it was late when the other started) comes after every one that had not, and the late
    ones come in arrival order; among the others, a queue key's order."""
    policy = res.scheduler.policy
    key = getattr(policy, "queue_key", None)
    late_after = getattr(policy, "late_after", None)
    if key is None and late_after is None:
        return

    def late(r, t: float) -> bool:
        return late_after is not None and r.arrival < t - late_after

    started = sorted((r for r in res.requests if not r.preemptions), key=lambda r: r.first_scheduled)
    for b in started:
        t = b.first_scheduled
        for a in started:
            if not (a.first_scheduled > t and a.arrival <= t):
                continue   # a started first, or had not arrived when b started
            where = f"request {b.id} started at {t} before {a.id} (arrived {a.arrival})"
            if late(b, t):
                assert late(a, t), f"{where}: a late prompt went ahead of an on-time one"
                assert (a.arrival, a.id) > (b.arrival, b.id), f"{where}: late prompts out of arrival order"
            elif not late(a, t) and key is not None:
                assert key(a) >= key(b), f"{where}: keys {key(b)} > {key(a)}"


class PlanChecked:
    """time_balanced, every plan checked against Token Throttling's for the same view: the
    same decodes (never cut by time), and either TT's prefill budget untouched or TT's
    budget kept as `min_prefill` with prefill up to the KV rules' cap, within a time budget
    of `fill` x the slowest in-flight batch."""

    def __init__(self, params: dict) -> None:
        self.inner = make_policy("time_balanced", params)
        self.requeue_chunks = self.inner.requeue_chunks   # what check_invariants reads
        self.queue_key = self.inner.queue_key             # and the scheduler
        self.late_after = self.inner.late_after

    def bind(self, view) -> None:
        self.inner.bind(view)

    def plan(self, view):
        tt, cap = copy.copy(self.inner._tt).plan_and_kv_cap(view)   # a copy: TT's jitter turns once
        p = self.inner.plan(view)
        assert (p.max_decodes, p.reserve_page_per_decode, p.requeue_chunks, p.token_budget) == \
            (tt.max_decodes, True, tt.requeue_chunks, None)
        assert (p.max_chunk, p.admit_whole_prompts) == (self.inner.max_chunk, self.inner.admit_whole_prompts)
        if p.time_budget is None:
            assert (p.prefill_budget, p.min_prefill) == (tt.prefill_budget, 0)
        else:
            assert p.prefill_budget == cap > tt.prefill_budget and p.min_prefill == tt.prefill_budget
            assert p.time_budget == self.inner.in_flight_level(view) * self.inner.fill > 0
        return p


@PROPS
@given(scenarios(tb_params()))
def test_time_balanced_plans_are_token_throttlings_plus_only_prefill_up_to_the_kv_cap(sc: Scenario):
    s = Scheduler(SchedulerConfig(pp=sc.pp, num_pages=sc.num_pages, page_size=sc.page_size),
                  PlanChecked(sc.params), stage_time_model=sc.model)
    check_outcome(drive(s, sc.requests(), arrivals=sc.arrivals, seed=sc.seed))


@FEWER
@given(scenarios(tb_params(fill=0.0, max_chunk=False)))
def test_time_balanced_with_fill_zero_and_no_cap_is_token_throttling(sc: Scenario):
    """fill 0 adds no prefill beyond Token Throttling's budget, so with no chunk cap every
    decision is Token Throttling's, whatever the model."""
    tt = {k: v for k, v in sc.params.items() if k not in ("fill", "max_chunk", "admit_whole_prompts", "defer_per_1k_tokens", "late_after")}
    a = drive(sc.scheduler(), sc.requests(), arrivals=sc.arrivals, seed=sc.seed, check=False)
    b = drive(sc.scheduler("token_throttling", tt), sc.requests(), arrivals=sc.arrivals, seed=sc.seed,
              check=False)
    assert a.log == b.log and a.completions == b.completions


@FEWER
@given(scenarios(tb_params()))
def test_time_balanced_same_inputs_same_decisions(sc: Scenario):
    a = drive(sc.scheduler(), sc.requests(), arrivals=sc.arrivals, seed=sc.seed, check=False)
    b = drive(sc.scheduler(), sc.requests(), arrivals=sc.arrivals, seed=sc.seed, check=False)
    assert a.log == b.log and a.completions == b.completions


# ---------------------------------------------------------------- determinism
@FEWER
@given(scenarios())
def test_same_inputs_same_decisions(sc: Scenario):
    a = drive(sc.scheduler(), sc.requests(), arrivals=sc.arrivals, seed=sc.seed, check=False)
    b = drive(sc.scheduler(), sc.requests(), arrivals=sc.arrivals, seed=sc.seed, check=False)
    assert a.log == b.log
    assert a.completions == b.completions
    summary = lambda res: [(r.id, r.preemptions, r.tokens_computed_total, r.finish_time, list(r.token_times))
                           for r in res.requests]
    assert summary(a) == summary(b)


# ---------------------------------------------------------------- rejection
@FEWER
@given(WORKLOAD, st.sampled_from([1, 4, 16]), st.integers(1, 8), ANY_POLICY, st.data())
def test_too_long_requests_are_rejected_and_reported(specs, ps, pp, policy, data):
    sizes = sorted(pages_for(p + o - 1, ps) for p, o in specs)
    num_pages = data.draw(st.integers(1, sizes[-1]))  # may be too small for some (or all)
    name, params = policy
    s = make_scheduler(name, pp=pp, num_pages=num_pages, page_size=ps, **params)
    reqs = make_requests(specs)
    res = drive(s, reqs, arrivals=data.draw(st.booleans()), seed=0)
    scheduled = {rid for _, items in res.log for rid, *_ in items}
    assert s.requests == reqs  # every request is kept and reported, rejected or not
    for r in reqs:
        if pages_for(r.max_kv_tokens, ps) > num_pages:
            assert r.status is Status.REJECTED and r.finish_reason == "too_long"
            assert r.finish_time is not None and r.first_scheduled is None
            assert r.id not in scheduled and not r.num_output and r.tokens_computed_total == 0
        else:
            assert r.status is Status.FINISHED and r.num_output == r.max_output
    assert s.free_pages == s.total_pages and not s.has_work


def test_add_reports_rejection():
    s = make_scheduler("token_throttling", pp=2, num_pages=4, page_size=16)
    ok = Request(0, 60, 5)      # 64 KV tokens = 4 pages: fits exactly
    big = Request(1, 60, 6)     # 65 KV tokens = 5 pages > 4
    assert s.add(ok, 0.0) is True
    assert s.add(big, 3.0) is False
    assert big.status is Status.REJECTED and big.finish_reason == "too_long" and big.finish_time == 3.0
    assert big in s.requests and big not in s.waiting
    assert s.num_unfinished == 1 and s.waiting_tokens == 60
    s.abort(big, 4.0)  # no-op on a rejected request
    assert big.finish_reason == "too_long" and s.num_unfinished == 1


# ---------------------------------------------------------------- aborts under load
@FEWER
@given(scenarios(st.one_of(ANY_POLICY, tb_params())), st.floats(0.01, 0.3))
def test_random_aborts_keep_invariants(sc: Scenario, p_abort: float):
    rng = random.Random(sc.seed)
    aborted: set[int] = set()

    def abort_some(s, now, res):
        live = [r for r in s.requests if not r.is_finished]
        if live and rng.random() < p_abort:
            victim = rng.choice(live)
            s.abort(victim, now)
            aborted.add(victim.id)
            check_invariants(s)

    res = drive(sc.scheduler(), sc.requests(), arrivals=sc.arrivals, seed=sc.seed, hook=abort_some)
    s = res.scheduler
    for r in res.requests:
        assert r.status is Status.FINISHED and not r.pages and r.in_flight == 0
        if r.id in aborted:
            assert r.finish_reason == "aborted" and r.num_output < r.max_output
        else:
            assert r.finish_reason == "length" and r.num_output == r.max_output
    assert s.free_pages == s.total_pages and s.num_holding_pages == 0 and s.waiting_tokens == 0


# ---------------------------------------------------------------- window
def test_at_most_pp_batches_in_flight():
    s = make_scheduler("sarathi", pp=3, num_pages=64, page_size=16, budget=8)
    for r in make_requests([(100, 4)] * 5):
        s.add(r)
    batches = []
    while (b := s.next_batch(0.0)) is not None:
        batches.append(b)
    assert len(batches) == 3 and s.num_in_flight == 3
    assert s.next_batch(0.0) is None  # window full
    complete_oldest(s, 1.0)
    assert s.next_batch(1.0) is not None


def test_empty_scheduler_has_no_batch():
    s = make_scheduler("vllm", pp=2, num_pages=8, page_size=4)
    assert s.next_batch(0.0) is None and not s.has_work


# ---------------------------------------------------------------- abort unit tests
def _sched(**kw):
    kw.setdefault("pp", 2)
    kw.setdefault("num_pages", 32)
    kw.setdefault("page_size", 4)
    return make_scheduler("sarathi", **kw)


def test_abort_waiting_not_started():
    s = _sched(budget=16)
    a, b = make_requests([(10, 3), (7, 2)])
    s.add(a), s.add(b)
    s.abort(b, 1.0)
    assert b.status is Status.FINISHED and b.finish_reason == "aborted" and b.finish_time == 1.0
    assert list(s.waiting) == [a] and s.waiting_tokens == 10 and s.num_unfinished == 1
    check_invariants(s)


def test_abort_waiting_partly_prefilled_frees_pages():
    s = _sched(budget=8)                 # 20-token prompt: chunk of 8, then back to waiting
    (r,) = make_requests([(20, 3)])
    s.add(r)
    b = s.next_batch(0.0)
    assert items_of(b) == [(0, 0, 8, True)] and len(r.pages) == 2   # 8 tokens / 4 per page
    complete_oldest(s, 1.0)
    assert list(s.waiting) == [r] and s.waiting_tokens == 12 and s.free_pages == 30
    s.abort(r, 2.0)
    assert s.free_pages == 32 and not r.pages and s.waiting_tokens == 0 and not s.waiting
    assert s.num_holding_pages == 0 and not s.has_work
    check_invariants(s)


def test_abort_ready_frees_pages():
    s = _sched(budget=64)
    a, b = make_requests([(10, 5), (6, 5)])
    s.add(a), s.add(b)
    s.next_batch(0.0)
    complete_oldest(s, 1.0)
    assert list(s.ready) == [a, b] and s.free_pages == 32 - 3 - 2
    s.abort(a, 2.0)
    assert list(s.ready) == [b] and not a.pages and s.free_pages == 32 - 2
    assert a.finish_reason == "aborted" and a.num_output == 1 and s.num_running == 1
    check_invariants(s)


@pytest.mark.parametrize("requeue", [False, True])
def test_abort_in_flight_frees_pages_when_batch_returns(requeue):
    s = make_scheduler("token_throttling", pp=2, num_pages=32, page_size=4, requeue_chunks=requeue,
                       minp=8, maxp=8, kvthresh=0.0)
    (r,) = make_requests([(20, 3)])
    s.add(r)
    b1 = s.next_batch(0.0)
    assert items_of(b1) == [(0, 0, 8, True)]
    b2 = s.next_batch(0.0)
    if requeue:  # the next chunk is already on its way
        assert items_of(b2) == [(0, 8, 8, True)] and r.in_flight == 2
    else:
        assert b2 is None and r.in_flight == 1
    held = len(r.pages)
    s.abort(r, 0.5)
    assert r.status is Status.FINISHED and r.finish_reason == "aborted"
    assert len(r.pages) == held and s.free_pages == 32 - held  # still read by the pipeline
    assert r not in s.waiting and s.waiting_tokens == 0 and not s.has_work
    check_invariants(s)
    assert complete_oldest(s, 1.0) is b1
    if requeue:
        assert r.pages and s.free_pages == 32 - held  # b2 still uses them
        check_invariants(s)
        assert s.complete(b2, 2.0) == []
    assert not r.pages and s.free_pages == 32 and r.in_flight == 0 and not r.num_output
    assert s.next_batch(3.0) is None
    check_invariants(s)


def test_abort_in_flight_decode():
    s = _sched(budget=64)
    (r,) = make_requests([(10, 5)])
    s.add(r)
    s.next_batch(0.0)
    complete_oldest(s, 1.0)
    b = s.next_batch(1.0)
    assert items_of(b) == [(0, 10, 1, False)]
    s.abort(r, 1.5)
    assert r.pages
    assert s.complete(b, 2.0, [42]) == []
    assert r.num_output == 1 and not r.pages and s.free_pages == 32 and s.num_running == 0
    check_invariants(s)


def test_abort_is_idempotent():
    s = _sched()
    (r,) = make_requests([(5, 2)])
    s.add(r)
    s.abort(r, 1.0)
    s.abort(r, 2.0)
    assert r.finish_time == 1.0 and s.num_unfinished == 0


# ---------------------------------------------------------------- complete() validation
def _two_in_flight():
    s = _sched(budget=64)
    a, b = make_requests([(10, 3), (6, 3)])
    s.add(a), s.add(b)
    return s, s.next_batch(0.0), (a, b)


def test_complete_twice_raises():
    s, batch, _ = _two_in_flight()
    s.complete(batch, 1.0)
    with pytest.raises(ValueError, match="not in flight"):
        s.complete(batch, 2.0)


def test_complete_foreign_batch_raises():
    s, batch, (a, b) = _two_in_flight()
    other = _sched(budget=64)
    other.add(Request(7, 4, 2))
    foreign = other.next_batch(0.0)
    assert foreign.id == batch.id
    with pytest.raises(ValueError, match="not in flight"):
        s.complete(foreign, 1.0)
    # nothing was applied: both batches are still in flight in their own schedulers
    assert batch.id in s.in_flight and a.in_flight == 1 and b.in_flight == 1
    assert foreign.id in other.in_flight and other.requests[0].in_flight == 1
    s.complete(batch, 2.0)
    assert list(s.ready) == [a, b]
    check_invariants(s)


@pytest.mark.parametrize("sampled", [[], [1], [1, 2, 3]])
def test_complete_wrong_sampled_count_raises_and_changes_nothing(sampled):
    s, batch, (a, b) = _two_in_flight()
    assert batch.num_samples == 2
    with pytest.raises(ValueError, match="sampled"):
        s.complete(batch, 1.0, sampled)
    assert batch.id in s.in_flight and a.in_flight == 1 and not a.output_ids and not b.output_ids
    check_invariants(s)
    s.complete(batch, 1.0, [11, 12])
    assert a.output_ids == [11] and b.output_ids == [12]
    check_invariants(s)


def test_sampled_tokens_go_to_sampling_items_in_item_order():
    s = _sched(budget=12, pp=1)
    a, b = make_requests([(6, 3), (10, 3)])
    s.add(a), s.add(b)
    batch = s.next_batch(0.0)                 # a's whole prompt (samples), b's first 6 tokens
    assert items_of(batch) == [(0, 0, 6, True), (1, 0, 6, True)] and batch.num_samples == 1
    s.complete(batch, 1.0, [5])
    assert a.output_ids == [5] and b.output_ids == []
    batch = s.next_batch(1.0)                 # a decodes first, then b's last 4 prompt tokens
    assert items_of(batch) == [(0, 6, 1, False), (1, 6, 4, True)] and batch.num_samples == 2
    s.complete(batch, 2.0, [6, 7])
    assert a.output_ids == [5, 6] and b.output_ids == [7]


# ---------------------------------------------------------------- stop tokens
def test_stop_token_finishes_early():
    s = _sched(budget=64)
    r = Request(0, 10, 8, stop_token_ids=frozenset({99}))
    other = Request(1, 10, 2)
    s.add(r), s.add(other)
    s.complete(s.next_batch(0.0), 1.0, [3, 4])
    s.complete(s.next_batch(1.0), 2.0, [99, 5])   # r stops; other reaches max_output
    assert r.status is Status.FINISHED and r.finish_reason == "stop" and r.output_ids == [3, 99]
    assert other.finish_reason == "length" and other.output_ids == [4, 5]
    assert r.tokens_computed_total == 11 and not r.pages
    assert s.free_pages == s.total_pages and not s.has_work
    check_invariants(s)


def test_stop_token_on_first_token():
    s = _sched(budget=64)
    r = Request(0, 10, 8, stop_token_ids=frozenset({0, 1}))
    s.add(r)
    finished = s.complete(s.next_batch(0.0), 1.0, [1])
    assert finished == [r] and r.finish_reason == "stop" and r.output_ids == [1]
    assert s.free_pages == s.total_pages


def test_max_output_wins_over_stop_on_last_token():
    s = _sched(budget=64)
    r = Request(0, 4, 1, stop_token_ids=frozenset({9}))
    s.add(r)
    s.complete(s.next_batch(0.0), 1.0, [9])
    assert r.finish_reason == "length"


# ---------------------------------------------------------------- preemption bookkeeping
def test_preempted_request_recomputes_prompt_and_outputs():
    # pp=1, 3 pages of 4 tokens: two requests fill the cache and one must be preempted.
    s = make_scheduler("sarathi", pp=1, num_pages=3, page_size=4, budget=64)
    a, b = make_requests([(4, 4), (4, 4)])     # each needs 7 KV tokens = 2 pages at most
    res = drive(s, [a, b])
    check_outcome(res)
    assert a.preemptions + b.preemptions >= 1



@pytest.mark.parametrize("policy,params", [("token_throttling", {"maxp": 96, "minp": 8}), ("vllm", {"max_num_batched_tokens": 64}),
                                           ("time_balanced", {"maxp": 96, "minp": 8, "max_chunk": 24,
                                                              "admit_whole_prompts": True})])
def test_a_page_counter_makes_every_decision_the_page_allocator_makes(policy, params):
    """The simulator counts pages (PageCounter) instead of naming them: on a cache small
    enough to preempt, every batch and every completion must be the same as with ids."""
    from core.kv_cache import PageCounter

    logs = []
    for page_ids in (True, False):
        reqs = make_requests([(int(p), int(o)) for p, o in
                              np.random.default_rng(4).integers([8, 1], [200, 60], size=(60, 2))])
        s = Scheduler(SchedulerConfig(pp=3, num_pages=40, page_size=8, page_ids=page_ids), make_policy(policy, params),
                      stage_time_model=LinearStageTime((1e-3, 1e-5, 2e-6, 1e-9, 0.0), True, 0.0))
        assert isinstance(s.kv, PageCounter) is not page_ids
        res = drive(s, reqs, arrivals=True, seed=2)
        logs.append((res.log, res.completions, [(r.finish_time, r.preemptions, r.tokens_recomputed) for r in reqs]))
    assert logs[0] == logs[1]
    assert sum(r[1] for r in logs[0][2]) > 0  # the cache was small enough to preempt


def test_page_counter_counts_and_refuses_like_the_allocator():
    from core.kv_cache import PageAllocator, PageCounter

    for kv in (PageAllocator(8, 16), PageCounter(8, 16)):
        a = kv.allocate(3)
        kv.allocate_one()
        assert len(a) == 3 and kv.num_free == 4 and kv.num_used == 4 and kv.utilization == 0.5
        kv.free(a)
        assert kv.num_free == 7 and kv.allocate(0) == []
        with pytest.raises(RuntimeError, match="asked for 8 pages, only 7 free"):
            kv.allocate(8)
    with pytest.raises(ValueError, match="page_ids must be true or false"):
        SchedulerConfig(pp=1, num_pages=8, page_ids="no")
