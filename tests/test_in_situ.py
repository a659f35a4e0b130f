"""profiles.in_situ: a latency table from a runtime trace's stage rows, on hand-built rows."""
from __future__ import annotations

import pandas as pd
import pytest

from profiles.in_situ import in_situ_profile, jitter_rows, link_gaps, stage_rows, stage_turnaround
from profiles.latency_model import fit
from profiles.schema import Profile, ProfileError, load_profile

COLS = ["batch_id", "stage", "start", "end", "prefill_tokens", "decode_tokens", "num_requests",
        "prefill_attention_work", "decode_context", "returned"]


def rows(spec):
    """spec: (batch, stage, start, end, prefill, decode) with attention features derived."""
    return pd.DataFrame([(b, s, t0, t1, p, d, 1, p * p, d * 50, float("nan")) for b, s, t0, t1, p, d in spec],
                        columns=COLS)


def test_link_gaps_count_only_hops_into_an_idle_stage():
    b = rows([(0, 0, 0.0, 1.0, 10, 0), (0, 1, 1.5, 3.0, 10, 0),     # stage 1 idle: hop 0.5
              (1, 0, 1.0, 2.0, 0, 4), (1, 1, 3.0, 4.0, 0, 4),       # stage 1 busy until 3.0: queueing
              (2, 0, 5.0, 6.0, 0, 2), (2, 1, 6.25, 7.0, 0, 2)])     # idle again: hop 0.25
    g = link_gaps(b, bytes_per_token=100)
    assert g["seconds"].tolist() == [0.5, 0.25] and g["bytes"].tolist() == [1000, 200]


def test_stage_rows_keep_features_and_durations():
    b = rows([(0, 0, 0.0, 0.5, 8, 3), (0, 1, 0.6, 0.9, 8, 3)])
    st = stage_rows(b, [4, 4])
    assert st["latency_median"].tolist() == pytest.approx([0.5, 0.3])
    assert st["prefill_attention_work"].tolist() == [64, 64] and st["decode_context"].tolist() == [150, 150]
    assert (st["num_layers"] == 4).all() and (st["samples"] == 1).all()
    with pytest.raises(ProfileError, match="decode_context"):
        stage_rows(b.drop(columns=["decode_context"]), [4, 4])
    # a half-layer split (runtime layer_split 4.5,3.5) keeps its halves
    assert stage_rows(b, [4.5, 3.5])["num_layers"].tolist() == [4.5, 3.5]


def test_profile_fits_and_recovers_a_linear_cost():
    """Rows timed by a known linear cost: the fit reproduces it, meta says in situ."""
    spec, t, bid = [], 0.0, 0
    for p in (0, 16, 64, 128, 256):
        for d in (1, 4, 16, 32):
            for s in (0, 1):
                dur = 0.002 + 1e-5 * p + 2e-4 * d + 1e-9 * p * p + 1e-7 * d * 50
                spec.append((bid, s, t, t + dur, p, d))
                t += dur + 0.001
            bid += 1
    base = load_profile("llama-32m_cpu-1thread_pp2")
    prof = in_situ_profile(base, [rows(spec)], ["hand-built"])
    assert prof.meta["sched_overhead_s"] == 0 and prof.meta["measurement"]["traces"] == ["hand-built"]
    assert prof.meta["sched_overhead_per_item_s"] == 0
    model, err = fit(prof, holdout=0.2)
    assert err.mape < 0.02
    assert model.stage_time(0, 100, 8, 10_000, 400) == pytest.approx(
        0.002 + 1e-3 + 1.6e-3 + 1e-5 + 4e-5, rel=0.05)


def test_jitter_rows_are_each_stage_over_its_shape_median_per_batch():
    """Six batches of one shape over two runs (batch ids restart per run), two of a rare
    shape: the common ones give rows of (stage time / that stage's median), paired per
    batch; the rare shape repeats too few times for a median and is left out."""
    s0 = [1.0, 1.1, 0.9, 1.2, 1.0, 0.8]          # stage 0 times of the common shape (median 1.0)
    s1 = [2.0, 2.0, 2.2, 1.8, 2.4, 2.0]          # stage 1 (median 2.0)
    runs, t = [[], []], 0.0
    for k in range(6):
        run, bid = k % 2, k // 2
        runs[run] += [(bid, 0, t, t + s0[k], 0, 3), (bid, 1, t + s0[k], t + s0[k] + s1[k], 0, 3)]
        t += 10
    for run in (0, 1):   # a rare prefill shape in each run
        runs[run].append((9, 0, t, t + 5.0, 64, 0))
        runs[run].append((9, 1, t + 5.0, t + 9.0, 64, 0))
        t += 10
    j = jitter_rows([rows(r) for r in runs], pp=2)
    assert list(j.columns) == ["tokens", "stage_0", "stage_1"]
    assert (j["tokens"] == 3).all() and len(j) == 6
    order = [0, 2, 4, 1, 3, 5]   # run 0's batches, then run 1's
    assert j["stage_0"].tolist() == pytest.approx([s0[k] / 1.0 for k in order])
    assert j["stage_1"].tolist() == pytest.approx([s1[k] / 2.0 for k in order])
    # in_situ_profile carries it, and it survives the table's validation
    base = load_profile("llama-32m_cpu-1thread_pp2")
    prof = in_situ_profile(base, [rows(r) for r in runs], ["a", "b"])
    assert prof.jitter is not None and len(prof.jitter) == 6
    assert "6 micro-batches" in prof.meta["measurement"]["jitter"]


def test_stage_turnaround_is_the_mean_gap_before_batches_that_were_waiting():
    """Stage 1 starts a batch that stage 0 finished long before (it was waiting) 0.2 and
    0.4 after its previous row ends: turnaround 0.3. A batch that arrives while stage 1 is
    idle (batch 3: its gap is the hop) or just before it frees up (batch 2, within the
    margin) does not count; stage 0 gets 0."""
    b = rows([(0, 0, 0.0, 1.0, 0, 2), (0, 1, 1.1, 4.0, 0, 2),
              (1, 0, 1.0, 2.0, 0, 2), (1, 1, 4.2, 5.0, 0, 2),     # ready at 2.0, waited: gap 0.2
              (2, 0, 2.0, 4.95, 0, 2), (2, 1, 5.3, 6.0, 0, 2),    # ready 0.05 before 5.0: not counted
              (3, 0, 7.0, 8.0, 0, 2), (3, 1, 8.5, 9.0, 0, 2)])    # stage 1 idle: a hop
    assert stage_turnaround([b], pp=2, ready_margin=0.1) == pytest.approx([0.0, 0.2])
    later = rows([(0, 0, 0.0, 1.0, 0, 2), (0, 1, 1.1, 3.0, 0, 2),
                  (1, 0, 1.0, 2.0, 0, 2), (1, 1, 3.4, 4.0, 0, 2)])   # waited: gap 0.4
    assert stage_turnaround([b, later], pp=2, ready_margin=0.1) == pytest.approx([0.0, 0.3])
    # in_situ_profile writes it into meta, where the table's validation checks it
    base = load_profile("llama-32m_cpu-1thread_pp2")
    prof = in_situ_profile(base, [b, later], ["a", "b"])
    assert len(prof.meta["stage_turnaround_s"]) == 2 and prof.meta["stage_turnaround_s"][0] == 0.0
    # and the fitted model carries it to the simulator
    timed = Profile({**base.meta, "stage_turnaround_s": [0.0, 0.3]}, base.stages, base.transfer)
    assert fit(timed)[0].stage_turnaround == (0.0, 0.3)
    assert fit(base)[0].stage_turnaround == ()
    with pytest.raises(ProfileError, match="stage_turnaround_s.*2 non-negative"):
        Profile({**base.meta, "stage_turnaround_s": [0.3]}, base.stages, base.transfer)
    with pytest.raises(ProfileError, match="stage_turnaround_s"):
        Profile({**base.meta, "stage_turnaround_s": [0.0, -1.0]}, base.stages, base.transfer)


def test_transfer_is_the_mean_hop_of_each_size_bin():
    """A hop that now and then waits for a core (right-skewed) is charged its mean: the
    pipeline pays the sum of its hops, which the median would undercount."""
    from profiles.in_situ import transfer_rows
    gaps = pd.DataFrame({"bytes": [4096] * 4, "seconds": [0.001, 0.001, 0.001, 0.007]})
    rows = transfer_rows(gaps)
    assert rows["bytes"].tolist() == [4096] and rows["samples"].tolist() == [4]
    assert rows["latency_median"].tolist() == pytest.approx([0.0025])   # the median: 0.001
