"""sim driver_on_stage0: the scheduler shares stage 0's thread (pipetwin's runtime), so it
takes completions and decides only between stage-0 computes. Hand-computed timelines."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from core.request import Request
from sim import SimConfig, simulate


@dataclass
class SlowStage0:
    """Stage 0 takes 2 s per micro-batch, stage 1 takes 1 s, transfers are free."""
    sched_overhead: float = 0.0

    def stage_time(self, stage, *shape):
        return 2.0 if stage == 0 else 1.0

    def activation_bytes(self, n):
        return n

    def transfer_time(self, nbytes):
        return 0.0


def run(driver_on_stage0: bool):
    # A (prompt 4, 2 tokens) at 0, B (prompt 4, 1 token) at 0.5; Sarathi takes everything.
    cfg = SimConfig(policy="sarathi", policy_params={"budget": 64}, num_pages=100,
                    driver_on_stage0=driver_on_stage0)
    reqs = [Request(0, 4, 2, 0.0), Request(1, 4, 1, 0.5)]
    return simulate(cfg, latency=SlowStage0(), pp=2, requests=reqs).trace


def rows(trace):
    b = trace.batches.sort_values(["batch_id", "stage"])
    return [(int(r.batch_id), int(r.stage), r.start, r.end) for r in b.itertuples()]


def first_tokens(trace):
    return dict(zip(trace.requests["request_id"], trace.requests["first_token"]))


def test_completion_during_a_stage0_compute_waits_for_it():
    # Both ways: batch 0 = A's prefill, s0 [0,2], s1 [2,3]; batch 1 = B's prefill
    # (decided at 0.5, or at 2 when stage 0 frees), s0 [2,4], s1 [4,5].
    # A's token comes back at 3 while stage 0 computes B until 4:
    #   reacting at once: A's token at 3, its decode (batch 2) queues for stage 0: s0 [4,6];
    #   driver on stage 0: A's token is taken at 4 and batch 2 is decided then: s0 [4,6].
    # B's token returns at 5 while stage 0 computes batch 2 (until 6): taken at 5 vs 6.
    eager, driver = run(False), run(True)
    want = [(0, 0, 0.0, 2.0), (0, 1, 2.0, 3.0), (1, 0, 2.0, 4.0), (1, 1, 4.0, 5.0),
            (2, 0, 4.0, 6.0), (2, 1, 6.0, 7.0)]
    assert rows(eager) == want and rows(driver) == want  # exact: every time is a sum of whole seconds
    assert first_tokens(eager) == pytest.approx({0: 3.0, 1: 5.0})
    assert first_tokens(driver) == pytest.approx({0: 4.0, 1: 6.0})
    assert driver.meta["driver_on_stage0"] is True


def test_driver_on_stage0_needs_the_recursion_model():
    with pytest.raises(ValueError, match="driver_on_stage0"):
        SimConfig(driver_on_stage0=True, stage_model="resources")
    with pytest.raises(ValueError, match="driver_on_stage0 must be true or false"):
        SimConfig(driver_on_stage0="yes")
