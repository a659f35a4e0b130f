"""time_balanced (StageTimeBalanced) and the scheduler's time budget: hand-computed plans
and batches under a linear cost model, the protections it keeps from Token Throttling, the
missing-model error, and on a simulated workload that its consecutive batches take more
equal time than Token Throttling's.

Linear model used by hand: t = 1 ms + 10 us * prefill + 2 us * decode + 1 ns * attention work
(+ 0 * decode context), so a fresh n-token chunk costs 1 ms + 10 us n + 1 ns n^2.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

from core.cost_model import largest_chunk
from core.policies import BatchPlan, StageTimeBalanced, make_policy
from core.request import Request
from core.scheduler import Scheduler, SchedulerConfig
from tests.helpers import check_invariants, complete_oldest, drive, items_of, make_requests


class LinearTime:
    def __init__(self, base=1e-3, prefill=1e-5, decode=2e-6, attention=1e-9, context=0.0):
        self.c = (base, prefill, decode, attention, context)
        self.calls = 0

    def predict(self, p, d, a, c):
        self.calls += 1
        base, cp, cd, ca, cc = self.c
        return base + cp * p + cd * d + ca * a + cc * c


def scheduler(pp=2, num_pages=1000, model=None, policy="time_balanced", **params) -> Scheduler:
    return Scheduler(SchedulerConfig(pp=pp, num_pages=num_pages, page_size=16), make_policy(policy, params),
                     stage_time_model=LinearTime() if model is None else model)


def peek(s) -> BatchPlan:
    return copy.deepcopy(s.policy).plan(s)


def pre(rid, start, n):
    return (rid, start, n, True)


def dec(rid, pos):
    return (rid, pos, 1, False)


# ---------------------------------------------------------------- the model is required
def test_time_balanced_without_a_model_fails_naming_policy_and_model():
    with pytest.raises(ValueError, match=r"time_balanced needs a stage-time model.*stage_time_model="):
        Scheduler(SchedulerConfig(pp=2, num_pages=100), make_policy("time_balanced"))


def test_a_time_budget_without_a_model_is_an_error_not_ignored():
    class Timed:
        def bind(self, view): pass
        def plan(self, view): return BatchPlan(0, 100, time_budget=1.0)
    s = Scheduler(SchedulerConfig(pp=2, num_pages=100), Timed())
    s.add(Request(0, 50, 2))
    with pytest.raises(ValueError, match="time_budget.*no stage_time_model"):
        s.next_batch(0.0)


@pytest.mark.parametrize("field,value", [("fill", -0.1), ("fill", True), ("maxp", 0), ("iterp", 0),
                                         ("minp", 4096), ("kvthresh", 1.0), ("max_chunk", 0),
                                         ("max_chunk", 1.5), ("max_chunk", True),
                                         ("admit_whole_prompts", "yes"), ("admit_whole_prompts", 1),
                                         ("defer_per_1k_tokens", -0.1), ("defer_per_1k_tokens", True),
                                         ("defer_per_1k_tokens", float("inf")),
                                         ("defer_per_1k_tokens", float("nan")), ("defer_per_1k_tokens", "1"),
                                         ("late_after", 0), ("late_after", -1.0), ("late_after", True),
                                         ("late_after", "4"), ("late_after", float("inf")),
                                         ("late_after", float("nan")), ("maxp_cycle_time", 0),
                                         ("maxp_cycle_time", -0.3), ("maxp_cycle_time", True),
                                         ("maxp_cycle_time", "0.3"), ("maxp_cycle_time", float("inf")),
                                         ("maxp_cycle_time", float("nan"))])
def test_bad_parameters_name_the_policy_and_field(field, value):
    with pytest.raises(ValueError, match=rf"time_balanced\.{field} must be"):
        make_policy("time_balanced", {field: value})


# ---------------------------------------------------------------- the scheduler's time budget
@pytest.mark.parametrize("monotone", [False, True])
def test_largest_chunk_is_the_brute_force_answer(monotone):
    """Bisection, and for a model declaring `monotone` the interpolating search: the same
    answers, the latter in far fewer predictions (what makes time_balanced's trace-scale
    simulation fit its time goal)."""
    rng = np.random.default_rng(0)
    calls = 0
    for _ in range(200):
        m = LinearTime(*rng.uniform(0, 1e-4, 5) * np.array([10, 1, 1, 1e-3, 1e-3]))
        m.monotone = monotone
        shape = [int(x) for x in rng.integers(0, 3000, 4)]
        start, cap, budget = int(rng.integers(0, 5000)), int(rng.integers(0, 3000)), float(rng.uniform(0, 0.3))
        want = max([n for n in range(cap + 1)
                    if n == 0 or m.predict(shape[0] + n, shape[1], shape[2] + n * (start + n), shape[3]) <= budget])
        m.calls = 0
        assert largest_chunk(m, *shape, start, cap, budget) == want
        calls += m.calls
        # tokens the budget may not cut: the answer is never below them, and they are not priced
        floor = int(rng.integers(0, cap + 1))
        m.calls = 0
        assert largest_chunk(m, *shape, start, cap, budget, floor) == max(want, floor)
        assert floor < cap or m.calls == 0
    # bisection: ~5.9 predictions per search here (1-2 when the cap or nothing fits, ~11 else)
    assert (calls / 200 < 3.6) if monotone else (calls / 200 > 5.5)


@pytest.mark.parametrize("table,monotone", [("qwen2.5-32b_a100-80gb_pp4", True), ("llama-3-70b_h100-80gb_pp8", True),
                                            ("llama-3-8b_h200_pp1", False)])
def test_slowest_stage_declares_monotone_only_when_its_fit_grows_with_prefill(table, monotone):
    """llama-3-8b on H200 has a stage whose weight-read floor (c5) falls faster than its
    prefill cost rises between two knees: its time can dip as a chunk grows, so it must
    keep the bisection. Where the flag is set, the searches agree with brute force."""
    from profiles import fit
    from profiles.latency_model import SlowestStage

    model = SlowestStage(fit(table)[0])
    assert model.monotone is monotone
    rng = np.random.default_rng(1)
    for _ in range(25):
        p, d = int(rng.choice([0, rng.integers(1, 2048)])), int(rng.integers(0, 256))
        shape = (p, d, p * int(rng.integers(p, 4 * p + 1)), d * int(rng.integers(1, 2048)))
        start, cap = int(rng.integers(0, 4096)), int(rng.integers(1, 2049))
        budget = model.predict(shape[0] + cap // 2, shape[1], shape[2] + cap // 2 * (start + cap // 2), shape[3])
        budget *= float(rng.uniform(0.9, 1.1))
        want = max([n for n in range(cap + 1) if n == 0 or model.predict(
            shape[0] + n, shape[1], shape[2] + n * (start + n), shape[3]) <= budget])
        assert largest_chunk(model, *shape, start, cap, budget) == want


@pytest.mark.parametrize("table", ["qwen2.5-32b_a100-80gb_pp4", "llama-3-70b_h100-80gb_pp8", "qwen2.5-14b_l40s_pp1",
                                   "llama-32m_cpu-1thread_pp2", "llama-3-8b_h200_pp4"])
def test_slowest_stage_solves_largest_chunk_in_closed_form(table, monkeypatch):
    """SlowestStage answers largest_chunk by solving each stage's piecewise quadratic (knees
    included: small batches, decode-heavy batches) and checking the answer with predict.
    Against brute force, with and without a floor; for a monotone model the closed form is
    right every time (the search it falls back to when a check fails is never called), for
    a non-monotone one (llama-3-8b on H200) it is not used at all."""
    from profiles import fit
    from profiles import latency_model
    from profiles.latency_model import SlowestStage

    searches = []
    search = latency_model.search_largest_chunk
    monkeypatch.setattr(latency_model, "search_largest_chunk", lambda *a: searches.append(a) or search(*a))
    model = SlowestStage(fit(table)[0])
    rng = np.random.default_rng(2)
    for i in range(40):
        p = int(rng.choice([0, rng.integers(1, 64), rng.integers(1, 2048)]))
        d = int(rng.choice([0, rng.integers(1, 16), rng.integers(1, 256)]))
        shape = (p, d, p * int(rng.integers(p, 4 * p + 1)), d * int(rng.integers(1, 4096)))
        start, cap = int(rng.integers(0, 4096)), int(rng.integers(1, 2049))
        floor = int(rng.choice([0, rng.integers(0, cap + 1)]))
        k = int(rng.integers(0, cap + 1))
        budget = model.predict(shape[0] + k, shape[1], shape[2] + k * (start + k), shape[3]) * float(rng.uniform(0.95, 1.05))
        fits = [n == 0 or model.predict(shape[0] + n, shape[1], shape[2] + n * (start + n), shape[3]) <= budget
                for n in range(cap + 1)]
        got = largest_chunk(model, *shape, start, cap, budget, floor)
        if model.monotone:
            assert got == max(floor, max(n for n in range(cap + 1) if fits[n])), (i, shape, start, cap, floor)
        else:   # where the time dips there may be several answers: each fits, one token more does not
            assert got >= floor and (got == floor or fits[got]) and (got == cap or not fits[got + 1])
    assert (not searches) if model.monotone else searches


def test_time_budget_cuts_prefill_after_uncut_decodes_and_spares_min_prefill():
    class Plan:
        def __init__(self): self.plan_ = None
        def bind(self, view): pass
        def plan(self, view): return self.plan_
    pol = Plan()
    s = Scheduler(SchedulerConfig(pp=2, num_pages=1000), pol, stage_time_model=LinearTime())
    r0, r1 = make_requests([(100, 5), (1000, 5)])
    s.add(r0)
    pol.plan_ = BatchPlan(0, 4096)
    s.next_batch(0.0), complete_oldest(s, 1.0)             # r0 prefilled, now ready
    s.add(r1)
    # decode of r0 at position 100 (context 101): t = 1 ms + 2 us = 1.002 ms, never cut.
    # budget 3 ms: 1.002 ms + 10 us n + 1 ns n^2 <= 3 ms -> n = 180 (1.002 + 1.8 + 0.0324 = 2.8344 ms;
    # n = 181: 1.002 + 1.81 + 0.032761 = 2.844761 ... still fits; solve 1e-9 n^2 + 1e-5 n <= 1.998e-3:
    # n = 191: 1.91e-3 + 3.6481e-5 = 1.946481e-3 fits; n = 196: 1.96e-3 + 3.8416e-5 = 1.998416e-3 > 1.998e-3;
    # n = 195: 1.95e-3 + 3.8025e-5 = 1.988025e-3 fits -> 195
    pol.plan_ = BatchPlan(1, 4096, time_budget=3e-3)
    assert items_of(s.next_batch(1.0)) == [dec(0, 100), pre(1, 0, 195)]
    complete_oldest(s, 2.0)
    # A budget the decode alone exceeds: no prefill, except min_prefill tokens, which are never cut.
    pol.plan_ = BatchPlan(1, 4096, time_budget=1e-4)
    assert items_of(s.next_batch(2.0)) == [dec(0, 101)]
    complete_oldest(s, 3.0)
    pol.plan_ = BatchPlan(1, 4096, time_budget=1e-4, min_prefill=40)
    assert items_of(s.next_batch(3.0)) == [dec(0, 102), pre(1, 195, 40)]
    check_invariants(s)


# ---------------------------------------------------------------- the policy
def test_fills_a_batch_up_to_the_slowest_in_flight_where_tt_takes_the_backlog_rule():
    # pp=2, N=1000, ps=16, defaults (maxp 2048, minp 32, iterp 8, kvthresh 0.05 -> R0 = 50).
    s = scheduler()
    tt = scheduler(policy="token_throttling")
    for sched in (s, tt):
        sched.add(Request(0, 1600, 4))
        # nothing in flight: TT's own plan, P = max(1600 // 8, 32) = 200
        assert items_of(sched.next_batch(0.0)) == [pre(0, 0, 200)]
        sched.add(Request(1, 150, 4))
    # batch 0 predicted: 1 ms + 10 us * 200 + 1 ns * 200 * 200 = 3.04 ms = the level.
    # TT: WT = 150 -> P = max(150 // 8, 32) = 32.
    assert items_of(tt.next_batch(0.0)) == [pre(1, 0, 32)]
    # time_balanced: TT's 32 are granted (min_prefill); the KV cap is F = 1000 - 13 = 987,
    # P_mem = 16 * 937 = 14992, ramp = (0.987 - 0.05) / 0.95 -> round(0.98632 * 2048) = 2020;
    # the whole 150-token prompt costs 1 + 1.5 + 0.0225 = 2.5225 ms <= 3.04 ms: all of it.
    plan = peek(s)
    assert (plan.min_prefill, plan.prefill_budget) == (32, 2020)
    assert plan.time_budget == pytest.approx(3.04e-3)
    assert items_of(s.next_batch(0.0)) == [pre(1, 0, 150)]
    check_invariants(s)


def test_fill_fraction_cuts_the_extra_prefill_by_predicted_time():
    s = scheduler(fill=0.9)
    s.add(Request(0, 1600, 4))
    s.next_batch(0.0)                                    # 200 tokens, 3.04 ms
    s.add(Request(1, 400, 4))
    # level = 0.9 * 3.04 ms = 2.736 ms: 1 ms + 10 us n + 1 ns n^2 <= 2.736 ms
    # n = 170: 1 + 1.7 + 0.0289 = 2.7289 ms fits; n = 171: 1 + 1.71 + 0.029241 = 2.739241 ms does not
    assert items_of(s.next_batch(0.0)) == [pre(1, 0, 170)]


# ---------------------------------------------------------------- maxp in seconds
class PerStage(LinearTime):
    """LinearTime for the whole model, split evenly over pp stages (what a stage holds)."""
    def __init__(self, pp):
        super().__init__(*(c / pp for c in LinearTime().c))


def test_maxp_cycle_time_sets_maxp_from_the_predicted_time_of_a_fresh_prompt():
    # pp=2, whole model 1 ms + 10 us n + 1 ns n^2, a stage half of it. Cycle 12.0001 ms = 2 stages
    # x 6.00005 ms: n = 1000 costs 6 ms a stage (12 ms round the pipeline), n = 1001 6.006 ms.
    s = scheduler(model=PerStage(2), maxp=16384, minp=32, iterp=1, maxp_cycle_time=0.0120001)
    assert s.policy.effective_maxp(PerStage(2), 2) == 1000
    s.add(Request(0, 5000, 4))
    # TT's rules with maxp 1000: nothing in flight, WT // 1 = 5000 -> the ramp's cap,
    # round((1 - 0.05) / 0.95 * 1000) = 1000 tokens.
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 1000)]
    # maxp still caps: the fewer of the two.
    assert scheduler(model=PerStage(2), maxp=600, maxp_cycle_time=0.0120001).policy.effective_maxp(PerStage(2), 2) == 600
    assert make_policy("time_balanced", {"maxp": 700}).effective_maxp(PerStage(2), 2) == 700   # off: maxp


def test_maxp_cycle_time_carries_across_pp_where_a_stage_holds_1_over_pp_of_the_model():
    pol = make_policy("time_balanced", {"maxp": 16384, "maxp_cycle_time": 0.0120001})
    assert {pol.effective_maxp(PerStage(pp), pp) for pp in (1, 2, 4, 8)} == {1000}
    # twice the cost per token (a slower GPU): fewer tokens in the same time
    slow = LinearTime(2e-3 / 2, 2e-5 / 2, 2e-6, 2e-9 / 2)
    assert pol.effective_maxp(slow, 2) == max(n for n in range(1000) if 2 * slow.predict(n, 0, n * n, 0) <= 0.0120001)


def test_maxp_cycle_time_below_minp_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"time_balanced\.maxp_cycle_time=0.003 s allows 196 .*under minp=200: raise maxp_cycle_time above 0.00304 s"):
        scheduler(model=PerStage(2), maxp=4096, minp=200, maxp_cycle_time=0.003)


def test_maxp_cycle_time_on_the_shipped_tables_carries_across_pp_not_across_gpus():
    from profiles.latency_model import SlowestStage
    pol = make_policy("time_balanced", {"maxp": 16384, "maxp_cycle_time": 0.3})
    tokens = {name: pol.effective_maxp(m, m.pp) for name in ("a100-80gb_pp4", "a100-80gb_pp8", "h100-80gb_pp4",
                                                             "h100-80gb_pp8")
              for m in [SlowestStage.of_profile(f"qwen2.5-14b_{name}")]}
    for gpu in ("a100", "h100"):
        assert tokens[f"{gpu}-80gb_pp8"] == pytest.approx(tokens[f"{gpu}-80gb_pp4"], rel=0.05)
    assert tokens["h100-80gb_pp4"] > 2 * tokens["a100-80gb_pp4"]   # the same time holds far more on H100


def test_decodes_come_first_uncut_and_prefill_fills_what_time_leaves():
    # pp=2, 10+ running requests, maxd = 5 -> D = min((Rn + jitter) // 2, 5) = 5 per batch;
    # requeue_chunks keeps the prompt's next chunk schedulable while its first is in flight.
    s = scheduler(maxd=5, requeue_chunks=True)
    for i in range(10):
        s.add(Request(i, 16, 50))
    while s.num_ready < 10:                              # prefill all ten, one batch at a time
        s.next_batch(0.0)
        complete_oldest(s, 0.0)
    s.add(Request(100, 400, 4))
    b1 = s.next_batch(1.0)                               # nothing in flight: TT's plan, P = 400 // 8 = 50
    assert (b1.decode_tokens, b1.prefill_tokens) == (5, 50)
    # level = b1: 1 ms + 5 * 2 us + 10 us * 50 + 1 ns * 50 * 50 = 1.5125 ms. b2: 5 decodes
    # (1.010 ms with the base), TT's P = max(350 // 8, 32) = 43 granted; time leaves 0.5025 ms:
    # 10 us n + 1 ns n (50 + n) <= 0.5025 ms -> n = 49 (0.494851 ms); n = 50 gives 0.505 ms.
    plan = peek(s)
    assert (plan.max_decodes, plan.min_prefill) == (5, 43)
    b2 = s.next_batch(1.0)
    assert (b2.decode_tokens, b2.prefill_tokens) == (5, 49)
    check_invariants(s)


def test_max_chunk_shares_a_batch_among_waiting_prompts_instead_of_the_head_taking_it():
    # pp=2, iterp 1: TT's budget is the whole backlog (1,100 tokens, within the KV ramp cap)
    # and nothing is in flight, so there is no time budget: only the chunk cap differs.
    runs = {}
    for cap in (None, 256):
        s = scheduler(iterp=1, requeue_chunks=True, max_chunk=cap)
        s.add(Request(0, 1000, 4))
        s.add(Request(1, 100, 4))
        runs[cap] = items_of(s.next_batch(0.0))
        check_invariants(s)
    assert runs[None] == [pre(0, 0, 1000), pre(1, 0, 100)]
    # capped: the long prompt takes 256 and the short one all of its 100 in the same batch
    # (its first token comes a batch round earlier); one chunk per prompt per batch, so the
    # long prompt continues in the next batch.
    assert runs[256] == [pre(0, 0, 256), pre(1, 0, 100)]


def test_kv_pressure_throttles_the_extra_prefill_like_tt():
    # pp=2, N=100, ps=16, kvthresh 0.05 -> R0 = 5; maxp 4096, iterp 1
    s = scheduler(num_pages=100, maxp=4096, iterp=1)
    s.add(Request(0, 1280, 10))                          # 80 pages
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 1280)]
    s.add(Request(1, 1000, 1))
    # level = 1 ms + 12.8 ms + 1.6384 ms = 15.4384 ms. F = 20: P_mem = 16 * 15 = 240,
    # ramp = (0.2 - 0.05) / 0.95 -> round(0.157895 * 4096) = 647, WT = 1000 -> TT's P = 240;
    # the KV cap is min(240, 647) = 240 = TT's own P:
    # nothing extra to fill although time would allow ~1200 tokens.
    plan = peek(s)
    assert plan.prefill_budget == 240 and plan.time_budget is None
    assert items_of(s.next_batch(0.0)) == [pre(1, 0, 240)]
    assert s.free_pages == 5                             # = R0: the reserve holds


def test_backlog_drains_and_every_request_finishes_with_invariants():
    reqs = make_requests([(int(p), int(o)) for p, o in
                          zip(np.random.default_rng(1).integers(1, 600, 60), np.random.default_rng(2).integers(1, 40, 60))])
    s = scheduler(pp=3, num_pages=300, model=LinearTime())
    res = drive(s, reqs, arrivals=True, seed=3)
    assert all(r.finish_reason == "length" for r in reqs)
    assert not s.waiting and not s.ready and not s.in_flight


@pytest.mark.parametrize("cap", [None, 64])
def test_fill_zero_is_token_throttling_plus_only_the_chunk_cap(cap):
    """experiments/chunk_cap_code.yaml labels time_balanced with fill 0 "TT + cap": it must
    make Token Throttling's decisions exactly, with only the per-prompt cap added."""
    class CappedTT:
        requeue_chunks = True   # what the invariant checks read

        def __init__(self): self.tt = make_policy("token_throttling", {"requeue_chunks": True})
        def bind(self, view): self.tt.bind(view)
        def plan(self, view):
            plan = self.tt.plan(view)
            plan.max_chunk = cap
            return plan

    def log(policy):
        reqs = make_requests([(int(p), 8) for p in np.random.default_rng(6).integers(1, 900, 40)])
        s = Scheduler(SchedulerConfig(pp=3, num_pages=400, page_size=16), policy, stage_time_model=LinearTime())
        return drive(s, reqs, arrivals=True, seed=7).log
    assert log(make_policy("time_balanced", {"fill": 0.0, "requeue_chunks": True, "max_chunk": cap})) \
        == log(CappedTT())


def test_same_inputs_same_decisions():
    def log():
        reqs = make_requests([(int(p), 8) for p in np.random.default_rng(4).integers(1, 900, 40)])
        return drive(scheduler(pp=4, num_pages=400), reqs, arrivals=True, seed=5, check=False).log
    assert log() == log()


# ---------------------------------------------------------------- in the simulator
def _consecutive_imbalance(batches) -> float:
    """Mean over windows of pp consecutive micro-batches of 1 - mean(t) / max(t), t = time on
    the slowest stage: the bubble share such a set of batches in flight leaves."""
    t = batches.assign(dur=batches["end"] - batches["start"]).groupby("batch_id")["dur"].max().to_numpy()
    pp = int(batches["stage"].max()) + 1
    w = np.lib.stride_tricks.sliding_window_view(t, pp)
    return float(np.mean(1 - w.mean(axis=1) / w.max(axis=1)))


def test_in_simulation_consecutive_batches_take_more_equal_time_than_tt():
    from sim import SimConfig, simulate
    from sim.run import fitted_model
    workload = {"num_requests": 300, "arrival": {"kind": "gamma", "rate": 5.0},
                "prompt_len": {"kind": "lognormal", "mean": 1155, "spread": 0.96, "max": 8192},
                "output_len": {"kind": "lognormal", "mean": 211, "spread": 0.771, "max": 2048}}
    runs = {p: simulate(SimConfig(profile="qwen2.5-32b_a100-80gb_pp4", policy=p, workload=workload))
            for p in ("token_throttling", "time_balanced")}
    tt, tb = (runs[p] for p in ("token_throttling", "time_balanced"))
    assert _consecutive_imbalance(tb.trace.batches) < 0.95 * _consecutive_imbalance(tt.trace.batches)
    assert tb.summary["bubble_ratio"] < tt.summary["bubble_ratio"]
    again = simulate(SimConfig(profile="qwen2.5-32b_a100-80gb_pp4", policy="time_balanced", workload=workload))
    assert again.trace.batches.equals(tb.trace.batches)


def test_slowest_stage_adapter_is_the_max_over_the_fitted_stages():
    from profiles.latency_model import SlowestStage
    from sim.run import fitted_model
    model = fitted_model("qwen2.5-32b_a100-80gb_pp4")[0]
    slowest = SlowestStage(model)
    for shape in [(0, 1, 0, 100), (512, 0, 512 * 512, 0), (2048, 64, 2048 * 3000, 64 * 1500)]:
        per_stage = [model.stage_time(s, *shape) for s in range(4)]
        assert slowest.predict(*shape) == max(per_stage)
    # The last stage carries the LM head: a decode-heavy batch is slowest there.
    assert slowest.predict(0, 256, 0, 256 * 1000) == model.stage_time(3, 0, 256, 0, 256 * 1000)


def test_stage_time_profile_prices_with_another_table_and_leaves_other_policies_alone():
    from sim import SimConfig, simulate
    workload = {"num_requests": 120, "arrival": {"kind": "gamma", "rate": 6.0},
                "prompt_len": {"kind": "lognormal", "mean": 1155, "spread": 0.96, "max": 8192},
                "output_len": {"kind": "lognormal", "mean": 60, "spread": 0.771, "max": 512}}

    def batches(policy, pricing=None):
        return simulate(SimConfig(profile="qwen2.5-32b_a100-80gb_pp4", policy=policy, workload=workload,
                                  stage_time_profile=pricing)).trace.batches
    # The CPU table prices a decode far above a prefill token relative to the GPU one, so
    # the same level admits other chunks; Token Throttling never prices anything.
    assert not batches("time_balanced").equals(batches("time_balanced", "llama-32m_cpu-1thread_pp2"))
    assert batches("token_throttling").equals(batches("token_throttling", "llama-32m_cpu-1thread_pp2"))
    with pytest.raises(ValueError, match="stage_time_profile must be"):
        SimConfig(stage_time_profile="")


def test_the_simulator_hands_its_own_price_to_time_balanced_and_the_batches_do_not_change(monkeypatch):
    """The simulator times every batch with the model time_balanced prices with, so it sets
    each batch's `predicted_time` (the max over its stage times) and the policy finds every
    in-flight batch priced; pricing them itself gives the very same batches."""
    from profiles.latency_model import SlowestStage
    from sim import SimConfig, simulate
    from sim.run import fitted_model
    model = fitted_model("qwen2.5-32b_a100-80gb_pp4")[0]
    other = fitted_model("llama-32m_cpu-1thread_pp2")[0]
    assert SlowestStage(model).is_max_of(model.stage_times)
    assert not SlowestStage(model).is_max_of(other.stage_times)
    assert not SlowestStage(model, pp=2).is_max_of(model.stage_times)   # per-stage fallback: no
    workload = {"num_requests": 150, "arrival": {"kind": "gamma", "rate": 6.0},
                "prompt_len": {"kind": "lognormal", "mean": 1155, "spread": 0.96, "max": 8192},
                "output_len": {"kind": "lognormal", "mean": 60, "spread": 0.771, "max": 512}}
    cfg = SimConfig(profile="qwen2.5-32b_a100-80gb_pp4", policy="time_balanced", workload=workload)
    unpriced = []
    level = StageTimeBalanced.in_flight_level

    def checked_level(self, view):
        unpriced.extend(b.id for b in view.in_flight.values() if b.predicted_time is None)
        for b in view.in_flight.values():
            if b.predicted_time is not None:
                assert b.predicted_time == self._model.predict(b.prefill_tokens, b.decode_tokens,
                                                               b.prefill_attention_work, b.decode_context)
        return level(self, view)
    monkeypatch.setattr(StageTimeBalanced, "in_flight_level", checked_level)
    shared = simulate(cfg).trace.batches
    assert unpriced == []
    monkeypatch.setattr(SlowestStage, "is_max_of", lambda self, stage_times: False)
    priced_by_policy = simulate(cfg).trace.batches
    assert unpriced   # now the policy priced them
    assert shared.equals(priced_by_policy)


def test_admit_whole_prompts_waits_for_room_for_the_whole_prompt():
    """The kv-pressure case above with admit_whole_prompts: the 1,000-token prompt (63
    pages) does not start into 20 free pages; it starts once request 0 finishes."""
    s = scheduler(num_pages=100, maxp=4096, iterp=1, admit_whole_prompts=True)
    s.add(Request(0, 1280, 2))                           # 80 pages, owed none once scheduled
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 1280)] and s.prefill_debt == 0
    s.add(Request(1, 1000, 1))
    assert s.next_batch(0.0) is None                     # 20 free < 63: waits (TT would take 240)
    complete_oldest(s, 1.0)                              # request 0's first token
    assert items_of(s.next_batch(1.0)) == [dec(0, 1280)]
    complete_oldest(s, 2.0)                              # its last: 81 pages back
    assert items_of(s.next_batch(2.0)) == [pre(1, 0, 1000)]
    assert s.prefill_debt == 0 and len(s.requests[1].pages) == 63


def test_admit_whole_prompts_stops_the_thrash_of_a_barely_fitting_cache():
    """44 prompts at once on a cache that just holds the largest request, no KV reserve:
    started prompts spread the cache and preemption recomputes ~15x the tokens; admitting
    only prompts the free pages can finish keeps it near the minimum."""
    rng = np.random.default_rng(5)
    specs = [(int(p), int(o)) for p, o in zip(rng.integers(1, 400, 44), rng.integers(1, 50, 44))]
    minimum = sum(p + o - 1 for p, o in specs)
    computed = {}
    for whole in (False, True):
        reqs = make_requests(specs)
        s = Scheduler(SchedulerConfig(pp=1, num_pages=max(p + o - 1 for p, o in specs), page_size=1),
                      make_policy("time_balanced", {"maxp": 2048, "minp": 0, "iterp": 1, "kvthresh": 0.0,
                                                    "admit_whole_prompts": whole}),
                      stage_time_model=LinearTime())
        drive(s, reqs)
        assert all(r.num_output == r.max_output for r in reqs)
        computed[whole] = sum(r.tokens_computed_total for r in reqs)
    assert computed[False] > 10 * minimum      # measured 15.5x
    assert computed[True] < 1.2 * minimum      # measured 1.12x


# ---------------------------------------------------------------- the waiting order
def first_prefill_order(defer: float, arrivals: list[tuple[float, int]]) -> list[int]:
    """Ids in the order their prompts start, with pp=1 and one prompt a batch (maxp and
    iterp make each batch take exactly the head): request i arrives at arrivals[i][0] with
    arrivals[i][1] prompt tokens, all of them while the first batch is in flight."""
    s = scheduler(pp=1, maxp=4096, minp=0, iterp=1, max_chunk=4096, defer_per_1k_tokens=defer)
    s.add(Request(99, 16, 1, arrival=0.0))
    s.next_batch(0.0)                                   # in flight: the others queue behind it
    for i, (t, n) in enumerate(arrivals):
        s.add(Request(i, n, 1, arrival=t), t)
        check_invariants(s)
    assert [r.id for r in s.waiting] == [r.id for r in sorted(s.waiting, key=s.policy.deferred_arrival)]
    started = []
    now = 1.0
    while s.has_work:
        complete_oldest(s, now)
        b = s.next_batch(now)
        if b is None:
            break
        started += [it.request.id for it in b.chunks if it.start == 0]
        now += 1.0
    return started


def test_defer_zero_keeps_first_come_first_served():
    """0 (the default) keeps the scheduler's FIFO queue: no key, no reordering."""
    assert make_policy("time_balanced", {}).queue_key is None
    assert first_prefill_order(0.0, [(0.1, 4000), (0.2, 100), (0.3, 2000)]) == [0, 1, 2]


def test_defer_lets_shorter_prompts_ahead_of_longer_ones_by_at_most_the_deferral():
    """defer 0.1 s per 1,000 tokens: a prompt queues as if it arrived 0.1 s later per
    1,000 tokens. Keys: 0 (4,000 tokens at 0.1) 0.5; 1 (100 at 0.2) 0.21; 2 (2,000 at 0.31)
    0.51; 3 (100 at 0.45) 0.46; 4 (100 at 0.6) 0.61. So 1 and 3 go ahead of 0, and 4,
    which arrived after 0's deferred time, does not."""
    arrivals = [(0.1, 4000), (0.2, 100), (0.31, 2000), (0.45, 100), (0.6, 100)]
    assert first_prefill_order(0.1, arrivals) == [1, 3, 0, 2, 4]
    # Ten times the deferral: 0's key is 4.1, 2's 2.31; every short prompt goes first.
    assert first_prefill_order(1.0, arrivals) == [1, 3, 4, 2, 0]


def test_defer_never_moves_a_prompt_ahead_of_one_holding_pages():
    """A partly prefilled prompt (it holds pages) stays at the head: a shorter arrival
    waits behind it, as the paged prompt's next chunk must go first."""
    s = scheduler(pp=1, maxp=4096, minp=0, iterp=1, max_chunk=100, requeue_chunks=True, defer_per_1k_tokens=10.0)
    s.add(Request(0, 1000, 1, arrival=0.0))
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 100)]
    s.add(Request(1, 10, 1, arrival=0.0), 0.0)
    assert [r.id for r in s.waiting] == [0, 1]
    check_invariants(s)


def test_defer_around_a_preempted_prompt_places_as_a_scan_from_the_back_would():
    """A preempted prompt goes to the front whatever its key (4.5, 15 s per 1,000 tokens),
    ahead of 1 (key 2.0) and 2 (3.0). A new prompt behind the last one with a key no larger
    than its own: 3 (key 1.0) passes all three, 4 (2.5) goes between 1 and 2. The insert
    bisects the back part it knows to be in key order; 3 lands in front of that part, which
    must shrink by one, or check_invariants finds [0, 1, 2] marked sorted."""
    s = scheduler(pp=1, maxp=300, minp=0, iterp=1, defer_per_1k_tokens=15.0)
    s.add(Request(0, 300, 10, arrival=0.0), 0.0)
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 300)]
    complete_oldest(s, 1.0)
    victim = s.ready[0]
    s.add(Request(1, 100, 1, arrival=0.5), 1.5)
    s.add(Request(2, 100, 1, arrival=1.5), 1.5)
    s.ready.remove(victim)
    s._preempt(victim)   # what _take_decodes does when a decode finds no free page
    assert [r.id for r in s.waiting] == [0, 1, 2]
    check_invariants(s)
    s.add(Request(3, 10, 1, arrival=0.85), 1.5)
    assert [r.id for r in s.waiting] == [3, 0, 1, 2]
    check_invariants(s)
    s.add(Request(4, 100, 1, arrival=1.0), 1.5)
    assert [r.id for r in s.waiting] == [3, 0, 1, 4, 2]
    check_invariants(s)


# ---------------------------------------------------------------- the late queue
def start_order(arrivals: list[float], tokens: int = 100, **params) -> tuple[list[int], Scheduler]:
    """Ids in the order their prompts start, with pp=1 and one whole prompt a batch: request
    i is added when the clock (one tick a batch) reaches arrivals[i]. At pp 1 Token
    Throttling's budget is maxp: one prompt's tokens."""
    s = scheduler(pp=1, maxp=tokens, minp=0, iterp=1, **params)
    pending = sorted(range(len(arrivals)), key=lambda i: arrivals[i])
    started: list[int] = []
    now = 0.0
    while pending or s.has_work:
        while pending and arrivals[pending[0]] <= now:
            i = pending.pop(0)
            s.add(Request(i, tokens, 1, arrival=arrivals[i]), now)
        if s.in_flight:
            complete_oldest(s, now)
        b = s.next_batch(now)
        check_invariants(s)
        if b is not None:
            started += [it.request.id for it in b.chunks if it.start == 0]
        now += 1.0
    return started, s


def test_late_prompts_go_behind_every_on_time_one_in_arrival_order():
    """late_after 2: at t=3 prompts 3 (arrived 0) and 4 (0.5) have waited over 2 s without
    starting, so 5 (2) and 6 (3) go first; then 3 and 4, in arrival order. Without it,
    first come, first served."""
    arrivals = [0, 0, 0, 0, 0.5, 2, 3]
    assert start_order(arrivals)[0] == [0, 1, 2, 3, 4, 5, 6]
    assert start_order(arrivals, late_after=2.0)[0] == [0, 1, 2, 5, 6, 3, 4]
    # 2.5: only 3 is late by t=3 (4 turns late at t=3.5, after 5 and 6 have come)
    assert start_order(arrivals, late_after=2.5)[0] == [0, 1, 2, 4, 5, 6, 3]


def test_late_queue_with_a_deferral_keeps_the_key_order_among_on_time_prompts():
    """The late rule goes by arrival, the order among the others by the queue key (15 s per
    1,000 tokens; batches of 100 tokens): keys 4 -> 1.5, 2 -> 2.5, 1 (200 tokens) -> 3.0,
    3 -> 3.5. So 1 waits behind 4 and 2, and has turned late (arrived 0, 0 + 2.5 < 3) when
    3, whose key is larger, starts: 1 goes last."""
    s = scheduler(pp=1, maxp=100, minp=0, iterp=1, defer_per_1k_tokens=15.0, late_after=2.5)
    s.add(Request(0, 100, 1, arrival=0.0), 0.0)
    s.next_batch(0.0)
    s.add(Request(1, 200, 1, arrival=0.0), 0.0)
    s.add(Request(4, 100, 1, arrival=0.0), 0.0)
    assert [r.id for r in s.waiting] == [4, 1]
    starts = []
    for now, arriving in ((1.0, 2), (2.0, 3), (3.0, None), (4.0, None)):
        if arriving is not None:
            s.add(Request(arriving, 100, 1, arrival=now), now)
        complete_oldest(s, now)
        b = s.next_batch(now)
        check_invariants(s)
        starts += [it.request.id for it in b.chunks if it.start == 0]
        if now == 3.0:
            assert [r.id for r in s.late] == [1] and s.num_waiting == 1 and s.waiting_tokens == 200
    assert starts == [4, 2, 3, 1]


def test_a_prompt_holding_pages_never_turns_late():
    """Prompt 0 is part way through its prefill (100-token chunks) when it has waited past
    late_after: it keeps its place at the head; 1, which never started, turns late."""
    s = scheduler(pp=1, maxp=4096, minp=0, iterp=1, max_chunk=100, requeue_chunks=True, late_after=0.5)
    s.add(Request(0, 1000, 1, arrival=0.0), 0.0)
    s.add(Request(1, 10, 1, arrival=0.0), 0.0)
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 100), pre(1, 0, 10)]
    s.add(Request(2, 10, 1, arrival=0.0), 0.0)
    complete_oldest(s, 1.0)
    b = s.next_batch(1.0)
    check_invariants(s)
    assert items_of(b)[0] == pre(0, 100, 100)   # 0 goes on
    assert [r.id for r in s.late] == [] and items_of(b)[1] == pre(2, 0, 10)   # waiting empties first


def test_late_prompts_wait_while_on_time_ones_block_on_pages():
    """The late queue is served only once no on-time prompt waits: an on-time head that
    waits for pages (admit_whole_prompts: all 7 of them) holds the late one back, though
    the late one would fit in the one page left."""
    s = scheduler(pp=2, num_pages=8, maxp=4096, minp=0, iterp=1, kvthresh=0.0, admit_whole_prompts=True,
                  late_after=0.5)
    s.add(Request(0, 100, 1, arrival=0.0), 0.0)   # 7 of 8 pages
    assert [it.request.id for it in s.next_batch(0.0).chunks] == [0]
    s.add(Request(1, 16, 1, arrival=0.0), 0.0)    # late at t=1, fits in 1 page
    s.add(Request(2, 100, 1, arrival=1.0), 1.0)   # on time, needs 7 pages: waits
    assert s.next_batch(1.0) is None
    assert [r.id for r in s.late] == [1] and [r.id for r in s.waiting] == [2] and s.free_pages == 1
    check_invariants(s)


def test_aborting_a_late_prompt_drops_it_and_its_tokens():
    s = scheduler(pp=1, maxp=30, minp=0, iterp=1, late_after=0.5)
    s.add(Request(0, 30, 1, arrival=0.0), 0.0)
    s.next_batch(0.0)
    late = Request(1, 40, 1, arrival=0.0)
    s.add(late, 0.0)
    complete_oldest(s, 1.0)
    s.add(Request(2, 30, 1, arrival=1.0), 1.0)
    assert [it.request.id for it in s.next_batch(1.0).chunks] == [2]    # 1 turned late
    assert list(s.late) == [late] and s.waiting_tokens == 40 and s.num_waiting == 1
    s.abort(late, 1.5)
    assert not s.late and s.waiting_tokens == 0 and s.num_waiting == 0 and late.finish_reason == "aborted"
    check_invariants(s)


def test_no_late_queue_by_default():
    assert make_policy("time_balanced", {}).late_after is None
    assert scheduler()._late_after is None and scheduler(late_after=4.0)._late_after == 4.0
