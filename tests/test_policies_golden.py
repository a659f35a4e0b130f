"""Golden tests: plans and micro-batches computed BY HAND from
../shared/reference/token-throttling.md (/work/shared/reference/token-throttling.md).

Each test builds a Scheduler through its public API (add / next_batch / complete) into a
precise state, then checks the plan the policy makes and the batch the scheduler forms.
The arithmetic is written next to every expected number. Notation: N pages of `ps`
tokens, F free pages, R0 = kvthresh * N (fixed when the policy is bound, cache empty),
WT waiting tokens, Rn = len(ready) + requests inside in-flight batches.

    P_mem = ps * max(F - R0, 0)
    pp > 1 and P_mem > 0:  ramp = max(0, (F/N - kvthresh) / (1 - kvthresh))
                           P = min(P_mem, round(ramp * maxp), max(WT // iterp, minp))
    else:                  P = min(maxp, P_mem)
    D = Rn if Rn < pp else (Rn + jitter) // pp, jitter = 0, 1, ..., pp-1, 0, ... (one step
    per plan with Rn >= pp); D = min(D, maxd); preempt from the back of `ready` while F < D.

Batch items are written (request id, start, num_tokens, is_prefill).
"""
from __future__ import annotations

import copy

import pytest

from core.policies import POLICIES, BatchPlan, make_policy, policy_class, policy_params
from core.request import Request, Status
from tests.helpers import (FixedPlanPolicy, check_invariants, complete_oldest, drive, items_of,
                           make_requests, make_scheduler)


def peek(s) -> BatchPlan:
    """The plan the policy would make now, without advancing its state (jitter)."""
    return copy.copy(s.policy).plan(s)


def dec(rid: int, pos: int) -> tuple[int, int, int, bool]:
    return (rid, pos, 1, False)


def pre(rid: int, start: int, n: int) -> tuple[int, int, int, bool]:
    return (rid, start, n, True)


# ====================================================================== Token Throttling: P
def test_tt_wt_rule_spreads_backlog_over_iterp():
    # pp=4, N=1000, ps=16, defaults maxp=2048 minp=32 iterp=8 kvthresh=0.05 -> R0 = 50
    s = make_scheduler("token_throttling", pp=4, num_pages=1000, page_size=16)
    r0, r1 = make_requests([(600, 4), (400, 4)])
    s.add(r0), s.add(r1)
    assert s.waiting_tokens == 1000                    # WT = 600 + 400
    # P_mem = 16*(1000-50) = 15200; ramp = (1-0.05)/0.95 = 1 -> UT = 2048
    # WT rule: max(1000 // 8, 32) = 125  ->  P = min(15200, 2048, 125) = 125
    assert peek(s).prefill_budget == 125
    assert peek(s).max_decodes == 0                    # Rn = 0 < pp -> D = Rn = 0
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 125)]   # r0 chunked at 125 tokens
    # r0 is in flight (paper-era: its next chunk waits for this one): waiting = [r1], WT = 400
    # F = 1000 - ceil(125/16) = 1000 - 8 = 992; P_mem = 16*(992-50) = 15072
    # ramp = (0.992-0.05)/0.95 = 0.99158 -> round(2030.7) = 2031
    # WT rule: max(400 // 8, 32) = 50  ->  P = min(15072, 2031, 50) = 50
    assert s.waiting_tokens == 400 and s.free_pages == 992
    assert peek(s).prefill_budget == 50
    assert items_of(s.next_batch(0.0)) == [pre(1, 0, 50)]
    assert s.next_batch(0.0) is None                   # nothing waiting outside the pipeline
    complete_oldest(s, 1.0)                            # r0's chunk back: front of waiting again
    assert [r.id for r in s.waiting] == [0]
    assert s.waiting_tokens == 475                     # 600 - 125 (r1 is still in flight)
    # F = 992 - ceil(50/16) = 988; P_mem = 16*(988-50) = 15008;
    # ramp = (0.988-0.05)/0.95 = 0.98737 -> round(2022.1) = 2022; WT rule: max(475 // 8, 32) = 59
    assert peek(s).prefill_budget == 59
    assert items_of(s.next_batch(1.0)) == [pre(0, 125, 59)]
    check_invariants(s)


def test_tt_minp_floor():
    # pp=2, N=1000, ps=16, defaults; WT = 100 -> 100 // 8 = 12 < minp = 32 -> P = 32
    s = make_scheduler("token_throttling", pp=2, num_pages=1000, page_size=16)
    s.add(Request(0, 100, 2))
    assert peek(s).prefill_budget == 32
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 32)]
    # minp = 0 turns the floor off: P = max(12, 0) = 12
    s = make_scheduler("token_throttling", pp=2, num_pages=1000, page_size=16, minp=0)
    s.add(Request(0, 100, 2))
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 12)]


def test_tt_cache_empty_gives_maxp():
    # pp=4, N=1000, ps=16, defaults. WT = 10000 + 14000 = 24000 -> 24000 // 8 = 3000
    # F = N: ramp = (1 - 0.05)/0.95 = 1 -> round(2048) = 2048; P_mem = 16*950 = 15200
    # P = min(15200, 2048, 3000) = 2048 = maxp
    s = make_scheduler("token_throttling", pp=4, num_pages=1000, page_size=16)
    s.add(Request(0, 10000, 1)), s.add(Request(1, 14000, 1))
    assert peek(s).prefill_budget == 2048
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 2048)]


def test_tt_ut_ramp_near_kvthresh_gives_small_p():
    # pp=2, N=1000, ps=16, kvthresh=0.05 -> R0 = 50; maxp=14400, iterp=1 (WT rule = WT)
    s = make_scheduler("token_throttling", pp=2, num_pages=1000, page_size=16, maxp=14400, iterp=1)
    big = Request(0, 14399, 10)
    s.add(big)
    # F = 1000: P_mem = 16*950 = 15200; UT = round(1.0 * 14400) = 14400; WT = 14399
    # P = min(15200, 14400, max(14399, 32)) = 14399: the whole prompt, ceil(14399/16) = 900 pages
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 14399)]
    assert s.free_pages == 100
    complete_oldest(s, 1.0)
    s.add(Request(1, 2000, 1))
    # F/N = 0.1: ramp = (0.1 - 0.05)/0.95 = 0.0526316 -> round(0.0526316 * 14400) = round(757.9) = 758
    # P_mem = 16*(100-50) = 800; WT = 2000 -> P = min(800, 758, 2000) = 758 (UT binds)
    # Rn = 1 (big is ready) < pp = 2 -> D = 1
    plan = peek(s)
    assert (plan.prefill_budget, plan.max_decodes) == (758, 1)
    # decode of position 14399 fits in big's 900th page; the chunk takes ceil(758/16) = 48 pages
    assert items_of(s.next_batch(1.0)) == [dec(0, 14399), pre(1, 0, 758)]
    assert s.free_pages == 100 - 48
    check_invariants(s)


def test_tt_page_reserve_p_mem_binds_then_stops_prefill():
    # pp=2, N=100, ps=16, kvthresh=0.05 -> R0 = 5; maxp=4096, iterp=1
    s = make_scheduler("token_throttling", pp=2, num_pages=100, page_size=16, maxp=4096, iterp=1)
    s.add(Request(0, 1439, 5))
    # F=100: P_mem = 16*95 = 1520, UT = 4096, WT = 1439 -> P = 1439; ceil(1439/16) = 90 pages
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 1439)]
    complete_oldest(s, 1.0)
    s.add(Request(1, 500, 1))
    assert s.free_pages == 10
    # F=10: P_mem = 16*(10-5) = 80; ramp = (0.1-0.05)/0.95 = 0.0526 -> round(215.6) = 216
    # WT = 500 -> P = min(80, 216, 500) = 80 (the page reserve binds); Rn = 1 < 2 -> D = 1
    plan = peek(s)
    assert (plan.prefill_budget, plan.max_decodes) == (80, 1)
    assert items_of(s.next_batch(1.0)) == [dec(0, 1439), pre(1, 0, 80)]   # 80 tokens = 5 pages
    assert s.free_pages == 5                            # = R0: the reserve is all that is left
    complete_oldest(s, 2.0)                             # r0 ready again, r1 back to waiting (420 left)
    # F=5: P_mem = 16*max(5-5, 0) = 0 -> else branch: P = min(4096, 0) = 0, no prefill at all
    # Rn = 1 < 2 -> D = 1; position 1440 opens r0's 91st page -> F = 4
    plan = peek(s)
    assert (plan.prefill_budget, plan.max_decodes) == (0, 1)
    assert items_of(s.next_batch(2.0)) == [dec(0, 1440)]
    assert s.free_pages == 4 and [r.id for r in s.waiting] == [1] and s.waiting_tokens == 420
    check_invariants(s)


def test_tt_pp1_branch_ignores_ut_and_wt_rules():
    # pp=1, N=100, ps=16, kvthresh=0.05 -> R0 = 5, P_mem = 16*95 = 1520
    # P = min(maxp=2048, 1520) = 1520 (WT = 100 would give max(100//8, 32) = 32 under pp > 1)
    s = make_scheduler("token_throttling", pp=1, num_pages=100, page_size=16)
    s.add(Request(0, 100, 2))
    assert peek(s).prefill_budget == 1520
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 100)]
    # pp=2, same state: the WT rule applies -> 32
    s2 = make_scheduler("token_throttling", pp=2, num_pages=100, page_size=16)
    s2.add(Request(0, 100, 2))
    assert items_of(s2.next_batch(0.0)) == [pre(0, 0, 32)]
    # maxp binds: P = min(1000, 1520) = 1000
    s3 = make_scheduler("token_throttling", pp=1, num_pages=100, page_size=16, maxp=1000)
    s3.add(Request(0, 1590, 1))
    assert items_of(s3.next_batch(0.0)) == [pre(0, 0, 1000)]


def test_tt_pp1_p_mem_binds_then_liveness_forces_the_tail():
    # pp=1, N=100, ps=16, R0 = 5: a 1590-token prompt (100 pages at most) gets
    # P = min(2048, 16*95) = 1520 tokens = 95 pages; then F = 5 = R0 -> P_mem = 0 -> P = 0.
    s = make_scheduler("token_throttling", pp=1, num_pages=100, page_size=16)
    r = Request(0, 1590, 1)
    s.add(r)
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 1520)]
    complete_oldest(s, 1.0)
    assert s.free_pages == 5 and peek(s).prefill_budget == 0
    # Nothing in flight and a single page holder: the scheduler forms a forced batch of what
    # fits (F * ps = 80 >= the 70 tokens left) and counts it.
    assert items_of(s.next_batch(1.0)) == [pre(0, 1520, 70)]
    assert s.forced_batches == 1
    complete_oldest(s, 2.0)
    assert r.status is Status.FINISHED and s.free_pages == 100


def test_tt_requeue_chunks_fills_consecutive_batches():
    # pp=4, N=1000, ps=16, R0 = 50, requeue_chunks: the rest of a chunked prompt stays at the
    # front of `waiting` (still counted in WT), so its next chunk goes out at once.
    s = make_scheduler("token_throttling", pp=4, num_pages=1000, page_size=16, requeue_chunks=True)
    r = Request(0, 600, 2)
    s.add(r)
    # UT never binds here (ramp >= (987/1000 - 0.05)/0.95 = 0.986 -> >= 2020) nor does P_mem:
    #   WT = 600 -> max(600 // 8, 32) = 75   -> [0, 75)     5 pages, F = 995
    #   WT = 525 -> max(525 // 8, 32) = 65   -> [75, 140)   9 pages, F = 991
    #   WT = 460 -> max(460 // 8, 32) = 57   -> [140, 197) 13 pages, F = 987
    #   WT = 403 -> max(403 // 8, 32) = 50   -> [197, 247)
    assert [items_of(s.next_batch(0.0)) for _ in range(4)] == [
        [pre(0, 0, 75)], [pre(0, 75, 65)], [pre(0, 140, 57)], [pre(0, 197, 50)]]
    assert r.in_flight == 4 and s.waiting_tokens == 353 and list(s.waiting) == [r]
    assert s.next_batch(0.0) is None                   # pp batches in flight
    check_invariants(s)
    complete_oldest(s, 1.0)                            # no sample yet: r stays where it is
    assert r.num_computed == 75 and list(s.waiting) == [r] and s.waiting_tokens == 353
    # WT = 353 -> max(353 // 8, 32) = 44 -> [247, 291)
    assert items_of(s.next_batch(1.0)) == [pre(0, 247, 44)]
    check_invariants(s)


# ====================================================================== Token Throttling: D
def _ten_ready(pp: int = 4, **params):
    # N=100, ps=16, iterp=1: WT = 10*16 = 160 -> P = min(16*95, 2048, 160) = 160: all ten
    # prompts in the first batch (Rn = 0 -> D = 0, the jitter does not move).
    s = make_scheduler("token_throttling", pp=pp, num_pages=100, page_size=16, iterp=1, **params)
    for r in make_requests([(16, 50)] * 10):
        s.add(r)
    assert items_of(s.next_batch(0.0)) == [pre(i, 0, 16) for i in range(10)]
    complete_oldest(s, 1.0)
    assert [r.id for r in s.ready] == list(range(10)) and s.num_running == 10
    return s


def test_tt_decode_rotating_jitter_rn10_pp4():
    s = _ten_ready(pp=4)
    # Rn = 10 stays 10 throughout (ready + in flight). D = (10 + j) // 4 for j = 0, 1, 2, 3:
    #   j=0: 10//4 = 2   j=1: 11//4 = 2   j=2: 12//4 = 3   j=3: 13//4 = 3    (2+2+3+3 = 10)
    b = [s.next_batch(1.0) for _ in range(4)]
    assert [items_of(x) for x in b] == [
        [dec(0, 16), dec(1, 16)],
        [dec(2, 16), dec(3, 16)],
        [dec(4, 16), dec(5, 16), dec(6, 16)],
        [dec(7, 16), dec(8, 16), dec(9, 16)],
    ]
    assert s.next_batch(1.0) is None                   # pp = 4 batches in flight
    # The counter wraps to 0: each completion frees one slot and returns its requests to the
    # back of `ready`; D = 2, 2, 3, 3 again (j = 0, 1, 2, 3).
    sizes = []
    for t in range(4):
        complete_oldest(s, 2.0 + t)
        assert s.num_running == 10
        sizes.append(len(s.next_batch(2.0 + t)))
    assert sizes == [2, 2, 3, 3]
    check_invariants(s)


def test_tt_decode_rotating_jitter_rn10_pp3():
    s = _ten_ready(pp=3)
    # D = (10 + j) // 3: j=0: 3, j=1: 11//3 = 3, j=2: 12//3 = 4 -> 3 + 3 + 4 = 10
    assert [len(s.next_batch(1.0)) for _ in range(3)] == [3, 3, 4]
    complete_oldest(s, 2.0)                            # j wrapped to 0: 10//3 = 3
    assert len(s.next_batch(2.0)) == 3


def test_tt_decode_rn_below_pp_takes_all():
    # pp=4, 3 requests: after their prompts, Rn = 3 < pp -> D = Rn = 3 (no jitter)
    s = make_scheduler("token_throttling", pp=4, num_pages=100, page_size=16, iterp=1)
    for r in make_requests([(16, 5)] * 3):
        s.add(r)
    s.next_batch(0.0)
    complete_oldest(s, 1.0)
    assert peek(s).max_decodes == 3
    assert items_of(s.next_batch(1.0)) == [dec(0, 16), dec(1, 16), dec(2, 16)]
    assert s.next_batch(1.0) is None                   # Rn = 3, all in flight, nothing ready


def test_tt_maxd_caps_decodes_front_of_ready_first():
    s = _ten_ready(pp=4, maxd=2)
    # D = min((10 + j) // 4, 2) = 2, 2, min(3, 2) = 2, min(3, 2) = 2
    b = [s.next_batch(1.0) for _ in range(4)]
    assert [[it[0] for it in items_of(x)] for x in b] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [r.id for r in s.ready] == [8, 9]
    complete_oldest(s, 2.0)                            # 0, 1 return behind 8, 9
    assert [r.id for r in s.ready] == [8, 9, 0, 1]
    assert [it[0] for it in items_of(s.next_batch(2.0))] == [8, 9]   # j=0: min(10//4, 2) = 2


def test_tt_preempts_while_free_pages_below_decodes():
    # pp=2, N=8, ps=4, kvthresh=0.25 -> R0 = 2. Six requests of 3 prompt tokens (1 page each).
    s = make_scheduler("token_throttling", pp=2, num_pages=8, page_size=4, kvthresh=0.25)
    reqs = make_requests([(3, 10)] * 6)
    for r in reqs:
        s.add(r)
    # F=8: P_mem = 4*(8-2) = 24; ramp = (1-0.25)/0.75 = 1 -> 2048; WT = 18 -> max(18//8, 32) = 32
    # P = min(24, 2048, 32) = 24 >= 18: all six prompts, 6 pages -> F = 2
    assert items_of(s.next_batch(0.0)) == [pre(i, 0, 3) for i in range(6)]
    complete_oldest(s, 1.0)
    assert s.free_pages == 2 and len(s.ready) == 6
    # Rn = 6 >= 2 -> D = (6+0)//2 = 3; F = 2 -> P_mem = 4*max(2-2, 0) = 0 -> P = min(2048, 0) = 0
    plan = peek(s)
    assert (plan.max_decodes, plan.prefill_budget, plan.reserve_page_per_decode) == (3, 0, True)
    # F = 2 < D = 3: preempt the back of `ready` (r5, 1 page) -> F = 3 >= 3, stop.
    # r0, r1, r2 decode position 3, inside their first page (no new pages).
    assert items_of(s.next_batch(1.0)) == [dec(0, 3), dec(1, 3), dec(2, 3)]
    r5 = reqs[5]
    assert r5.preemptions == 1 and r5.status is Status.WAITING and not r5.pages
    assert r5.num_scheduled == 0 and r5.num_output == 1        # keeps its sampled token
    assert list(s.waiting) == [r5] and s.waiting_tokens == 4   # recompute 3 prompt + 1 output
    assert [r.id for r in s.ready] == [3, 4] and s.free_pages == 3
    # Next plan: Rn = 2 ready + 3 in flight = 5 -> D = (5+1)//2 = 3 (j=1), capped by 2 ready.
    # F = 3: P_mem = 4*(3-2) = 4; ramp = (3/8-0.25)/0.75 = 0.1667 -> round(341.3) = 341
    # WT = 4 -> max(4//8, 32) = 32 -> P = min(4, 341, 32) = 4: r5 recomputes its 4 tokens
    # (prompt and its generated token) and samples its second token; F = 3 >= D = 2, no preemption.
    plan = peek(s)
    assert (plan.max_decodes, plan.prefill_budget) == (3, 4)
    b = s.next_batch(1.0)
    assert items_of(b) == [dec(3, 3), dec(4, 3), pre(5, 0, 4)] and b.num_samples == 3
    assert s.free_pages == 2
    check_invariants(s)


# ====================================================================== Sarathi
def test_sarathi_decodes_first_then_prefill_fills_the_rest_chunking_the_last():
    # pp=1, budget=8. Five 1-token prompts and a 20-token prompt.
    s = make_scheduler("sarathi", pp=1, num_pages=100, page_size=16, budget=8)
    for r in make_requests([(1, 3)] * 5 + [(20, 1)]):
        s.add(r)
    # no decodes; prefill FIFO: r0..r4 take 5, r5 gets the last 8 - 5 = 3 tokens (chunked)
    assert items_of(s.next_batch(0.0)) == [pre(i, 0, 1) for i in range(5)] + [pre(5, 0, 3)]
    complete_oldest(s, 1.0)
    # 5 decodes (budget 8 -> 3 left), then r5's next chunk [3, 6)
    assert items_of(s.next_batch(1.0)) == [dec(i, 1) for i in range(5)] + [pre(5, 3, 3)]
    complete_oldest(s, 2.0)
    # 5 decodes again (the last for r0..r4: max_output 3), r5 [6, 9)
    assert items_of(s.next_batch(2.0)) == [dec(i, 2) for i in range(5)] + [pre(5, 6, 3)]
    complete_oldest(s, 3.0)
    # decodes finished; r5 gets the whole budget: [9, 17), then [17, 20) samples
    assert items_of(s.next_batch(3.0)) == [pre(5, 9, 8)]
    complete_oldest(s, 4.0)
    assert items_of(s.next_batch(4.0)) == [pre(5, 17, 3)]


def test_sarathi_decodes_can_take_the_whole_budget():
    # budget=4: four 1-token prompts fill the first batch; then their 4 decodes take the whole
    # budget (4 - 4 = 0 left), so r4 starves until they finish.
    s = make_scheduler("sarathi", pp=1, num_pages=100, page_size=16, budget=4)
    for r in make_requests([(1, 3)] * 4 + [(10, 1)]):
        s.add(r)
    assert items_of(s.next_batch(0.0)) == [pre(i, 0, 1) for i in range(4)]
    complete_oldest(s, 1.0)
    assert items_of(s.next_batch(1.0)) == [dec(i, 1) for i in range(4)]
    complete_oldest(s, 2.0)
    assert items_of(s.next_batch(2.0)) == [dec(i, 2) for i in range(4)]
    complete_oldest(s, 3.0)                            # r0..r3 finish (3 tokens each)
    assert items_of(s.next_batch(3.0)) == [pre(4, 0, 4)]


def test_sarathi_preempts_newest_ready_when_a_decode_needs_a_page():
    # pp=1, N=4 pages of 4 tokens, budget=16.
    # r0, r1: prompt 4 (1 page), 3 outputs; r2: prompt 7 (2 pages), 2 outputs.
    s = make_scheduler("sarathi", pp=1, num_pages=4, page_size=4, budget=16)
    r0, r1, r2 = reqs = make_requests([(4, 3), (4, 3), (7, 2)])
    for r in reqs:
        s.add(r)
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 4), pre(1, 0, 4), pre(2, 0, 7)]  # 15 <= 16
    complete_oldest(s, 1.0)
    assert s.free_pages == 0 and list(s.ready) == [r0, r1, r2]
    # r0's decode at position 4 opens a page; F = 0 -> preempt the back of ready (r2, 2 pages)
    # -> F = 2; r0 and r1 each take one -> F = 0. Budget 16 - 2 = 14 for prefill, but r2
    # (back at the front of waiting) finds no page and nobody overtakes it.
    assert items_of(s.next_batch(1.0)) == [dec(0, 4), dec(1, 4)]
    assert r2.preemptions == 1 and list(s.waiting) == [r2] and s.waiting_tokens == 8  # 7 + 1
    complete_oldest(s, 2.0)
    assert items_of(s.next_batch(2.0)) == [dec(0, 5), dec(1, 5)]  # position 5: page 2 has room
    complete_oldest(s, 3.0)                            # r0, r1 finish: 4 pages free
    # r2 recomputes prompt and its generated token (8 tokens, 2 pages) and samples its 2nd
    assert items_of(s.next_batch(3.0)) == [pre(2, 0, 8)]
    complete_oldest(s, 4.0)
    assert r2.status is Status.FINISHED and r2.num_output == 2
    assert r2.tokens_computed_total == 7 + 8        # first prefill + recompute
    assert s.free_pages == 4


def test_preempted_request_goes_behind_partly_prefilled_page_holders():
    # pp=1, N=5 pages of 4, budget=19. r3's prompt is cut after 4 tokens (one full page).
    s = make_scheduler("sarathi", pp=1, num_pages=5, page_size=4, budget=19)
    r0, r1, r2, r3 = reqs = make_requests([(4, 3), (4, 3), (7, 2), (8, 1)])
    for r in reqs:
        s.add(r)
    # 4 + 4 + 7 = 15, then r3 gets 19 - 15 = 4 tokens -> pages 1 + 1 + 2 + 1 = 5, F = 0
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 4), pre(1, 0, 4), pre(2, 0, 7), pre(3, 0, 4)]
    complete_oldest(s, 1.0)
    assert list(s.waiting) == [r3] and len(r3.pages) == 1
    # r0 needs a page at position 4: preempt r2 (back of ready) -> it goes to the front of
    # waiting BEHIND r3, which holds pages; r0, r1 take the two freed pages. r3's page is full
    # and F = 0, so r3 (head) cannot go on and r2 may not overtake it.
    assert items_of(s.next_batch(1.0)) == [dec(0, 4), dec(1, 4)]
    assert list(s.waiting) == [r3, r2] and s.waiting_tokens == 4 + 8
    complete_oldest(s, 2.0)
    assert items_of(s.next_batch(2.0)) == [dec(0, 5), dec(1, 5)]
    complete_oldest(s, 3.0)                            # r0, r1 finish -> F = 4
    # r3: last 4 prompt tokens (1 new page); r2: 8 tokens recompute (2 pages) -> F = 1
    assert items_of(s.next_batch(3.0)) == [pre(3, 4, 4), pre(2, 0, 8)]
    assert s.free_pages == 1
    check_invariants(s)


# ====================================================================== vLLM
def test_vllm_max_num_seqs_caps_new_admissions():
    # pp=2, budget 100, max_num_seqs=2: four 10-token prompts, 2 outputs each
    s = make_scheduler("vllm", pp=2, num_pages=100, page_size=16,
                       max_num_batched_tokens=100, max_num_seqs=2)
    for r in make_requests([(10, 2)] * 4):
        s.add(r)
    # max_new = 2 - 0 holders = 2 -> r0, r1 (20 tokens); r2 would be a third sequence
    assert peek(s).max_new_requests == 2
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 10), pre(1, 0, 10)]
    assert peek(s).max_new_requests == 0               # 2 - 2 holders
    assert s.next_batch(0.0) is None                   # budget left, but no new sequence allowed
    complete_oldest(s, 1.0)
    assert items_of(s.next_batch(1.0)) == [dec(0, 10), dec(1, 10)]   # still no admission
    complete_oldest(s, 2.0)                            # r0, r1 finish: 0 holders
    assert items_of(s.next_batch(2.0)) == [pre(2, 0, 10), pre(3, 0, 10)]


def test_vllm_long_prefill_threshold_caps_each_chunk_budget_shared():
    # pp=1, budget 10, long_prefill_token_threshold=8
    s = make_scheduler("vllm", pp=1, num_pages=100, page_size=16,
                       max_num_batched_tokens=10, long_prefill_token_threshold=8)
    s.add(Request(9, 20, 1))
    assert items_of(s.next_batch(0.0)) == [pre(9, 0, 8)]   # min(20, budget 10, threshold 8) = 8

    s = make_scheduler("vllm", pp=1, num_pages=100, page_size=16,
                       max_num_batched_tokens=10, long_prefill_token_threshold=8)
    for r in make_requests([(2, 3)] * 3 + [(20, 1)]):
        s.add(r)
    # 2 + 2 + 2 = 6, r3 gets min(20, 10 - 6 = 4, 8) = 4
    assert items_of(s.next_batch(0.0)) == [pre(0, 0, 2), pre(1, 0, 2), pre(2, 0, 2), pre(3, 0, 4)]
    complete_oldest(s, 1.0)
    # 3 decodes first (10 - 3 = 7 left), r3 gets min(16, 7, 8) = 7: [4, 11)
    assert items_of(s.next_batch(1.0)) == [dec(0, 2), dec(1, 2), dec(2, 2), pre(3, 4, 7)]
    complete_oldest(s, 2.0)
    assert items_of(s.next_batch(2.0)) == [dec(0, 3), dec(1, 3), dec(2, 3), pre(3, 11, 7)]
    complete_oldest(s, 3.0)                            # r0..r2 finish
    # r3 has 2 tokens left: min(2, 10, 8) = 2 -> [18, 20), samples
    b = s.next_batch(3.0)
    assert items_of(b) == [pre(3, 18, 2)] and b.num_samples == 1


# ====================================================================== validation
@pytest.mark.parametrize("name,params,field", [
    ("token_throttling", {"maxp": 0}, "maxp"),
    ("token_throttling", {"maxp": -5}, "maxp"),
    ("token_throttling", {"maxp": "2048"}, "maxp"),
    ("token_throttling", {"maxp": 2048.0}, "maxp"),
    ("token_throttling", {"maxp": True}, "maxp"),
    ("token_throttling", {"minp": -1}, "minp"),
    ("token_throttling", {"minp": 100, "maxp": 50}, "minp"),
    ("token_throttling", {"minp": 1.5}, "minp"),
    ("token_throttling", {"iterp": 0}, "iterp"),
    ("token_throttling", {"iterp": -8}, "iterp"),
    ("token_throttling", {"iterp": None}, "iterp"),
    ("token_throttling", {"kvthresh": 1}, "kvthresh"),
    ("token_throttling", {"kvthresh": 1.0}, "kvthresh"),
    ("token_throttling", {"kvthresh": -0.05}, "kvthresh"),
    ("token_throttling", {"kvthresh": "0.05"}, "kvthresh"),
    ("token_throttling", {"maxd": 0}, "maxd"),
    ("token_throttling", {"maxd": -1}, "maxd"),
    ("token_throttling", {"maxd": "512"}, "maxd"),
    ("token_throttling", {"requeue_chunks": "yes"}, "requeue_chunks"),
    ("token_throttling", {"requeue_chunks": 1}, "requeue_chunks"),
    ("sarathi", {"budget": 0}, "budget"),
    ("sarathi", {"budget": -512}, "budget"),
    ("sarathi", {"budget": "512"}, "budget"),
    ("vllm", {"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
    ("vllm", {"max_num_batched_tokens": 2048.5}, "max_num_batched_tokens"),
    ("vllm", {"max_num_seqs": 0}, "max_num_seqs"),
    ("vllm", {"max_num_seqs": -1}, "max_num_seqs"),
    ("vllm", {"long_prefill_token_threshold": -1}, "long_prefill_token_threshold"),
    ("vllm", {"long_prefill_token_threshold": "off"}, "long_prefill_token_threshold"),
])
def test_bad_parameter_names_the_field(name, params, field):
    with pytest.raises(ValueError, match=rf"\b{name}\.{field}\b"):
        make_policy(name, params)


def test_defaults_are_the_anchors():
    assert policy_params(POLICIES["token_throttling"]) == {
        "maxp": 2048, "minp": 32, "iterp": 8, "kvthresh": 0.05, "maxd": None, "requeue_chunks": False}
    assert policy_params(POLICIES["sarathi"]) == {"budget": 2048}
    assert policy_params(POLICIES["vllm"]) == {
        "max_num_batched_tokens": 2048, "max_num_seqs": 256, "long_prefill_token_threshold": 0}
    # good edge values are accepted
    make_policy("token_throttling", {"minp": 0, "kvthresh": 0, "maxd": 1, "maxp": 1})
    make_policy("token_throttling", {"minp": 2048})


def test_unknown_parameter_is_rejected_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown parameter 'max_p'.*did you mean 'maxp'"):
        make_policy("token_throttling", {"max_p": 1024})
    with pytest.raises(ValueError, match=r"unknown parameter 'max_num_seq'.*did you mean 'max_num_seqs'"):
        make_policy("vllm", {"max_num_seq": 8})
    with pytest.raises(ValueError, match=r"unknown parameter 'budgte'.*did you mean 'budget'"):
        make_policy("sarathi", {"budgte": 8})
    with pytest.raises(ValueError, match=r"unknown parameter '_jitter'"):  # private state is not a parameter
        make_policy("token_throttling", {"_jitter": 1})


def test_unknown_policy_name_suggests():
    with pytest.raises(ValueError, match=r"did you mean 'token_throttling'"):
        make_policy("token_throtling")
    with pytest.raises(ValueError, match=r"one of"):
        make_policy("fcfs")


@pytest.mark.parametrize("path", ["tests.helpers.FixedPlanPolicy", "tests.helpers:FixedPlanPolicy"])
def test_user_policy_by_dotted_path(path):
    assert policy_class(path) is FixedPlanPolicy
    s = make_scheduler(path, pp=2, num_pages=64, page_size=16, prefill=8)
    assert isinstance(s.policy, FixedPlanPolicy) and s.policy.bound and s.policy.prefill == 8
    res = drive(s, make_requests([(20, 3), (5, 2)]))
    assert res.log[0] == (0, (pre(0, 0, 8),))            # prefill budget 8, FIFO
    assert all(r.status is Status.FINISHED and r.num_output == r.max_output for r in res.requests)
    with pytest.raises(ValueError, match=r"did you mean 'prefill'"):  # its parameters are checked too
        make_policy(path, {"prefil": 8})
    with pytest.raises(ValueError, match=r"FixedPlanPolicy\.prefill"):  # and validated by the class
        make_policy(path, {"prefill": -1})


@pytest.mark.parametrize("path,msg", [
    ("tests.no_such_module.Policy", r"cannot import 'Policy' from 'tests\.no_such_module'"),
    ("tests.helpers.NoSuchPolicy", r"cannot import 'NoSuchPolicy' from 'tests\.helpers'"),
    ("tests.helpers.NotAPolicy", r"must define bind\(view\) and plan\(view\)"),
])
def test_bad_dotted_path_errors_clearly(path, msg):
    with pytest.raises(ValueError, match=msg):
        make_policy(path)
