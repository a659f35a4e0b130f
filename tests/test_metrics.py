"""Metrics and trace I/O on hand-built traces with hand-computed answers."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from core.metrics import (SUMMARY_KEYS, BubbleRatio, bubble_ratio, format_summary, inter_token_latencies,
                          merge_intervals, summarize, summary_keys, time_weighted)
from core.trace import BATCH_COLUMNS, REQUEST_COLUMNS, SAMPLE_COLUMNS, TOKEN_COLUMNS, Trace


def batches(rows):
    """rows: (batch_id, stage, start, end[, prefill, decode])."""
    full = [(r + (10, 2) if len(r) == 4 else r) + (1,) for r in rows]
    df = pd.DataFrame(full, columns=BATCH_COLUMNS)
    return df.astype({"batch_id": "int64", "stage": "int64", "start": "float64", "end": "float64",
                      "prefill_tokens": "int64", "decode_tokens": "int64", "num_requests": "int64"})


def requests(rows):
    """rows: (id, arrival, finish[, status]) with the other columns filled in."""
    out = []
    for r in rows:
        rid, arrival, finish = r[:3]
        status = r[3] if len(r) > 3 else ("finished" if finish is not None else "running")
        out.append((rid, arrival, arrival, None, finish, 4, 2, 2, 0, status, None))
    return pd.DataFrame(out, columns=REQUEST_COLUMNS)


# ------------------------------------------------------------------ bubble ratio

def test_known_gantt_pp2():
    # One request in the system over [0, 10].
    # stage 0 busy [0,2] [3,5] [6,8]  -> busy 6, idle 4
    # stage 1 busy [2,3] [5,6] [8,10] -> busy 4, idle 6
    b = batches([(0, 0, 0, 2), (1, 0, 3, 5), (2, 0, 6, 8),
                 (0, 1, 2, 3), (1, 1, 5, 6), (2, 1, 8, 10)])
    br = bubble_ratio(b, requests([(0, 0.0, 10.0)]), pp=2)
    assert isinstance(br, BubbleRatio)
    assert br.window == pytest.approx(10.0)
    assert br.per_stage == pytest.approx([0.4, 0.6])
    assert br.overall == pytest.approx((4 + 6) / (2 * 10))


def test_idle_without_requests_is_not_a_bubble():
    # Request A in [0, 4], request B in [100, 104]; nothing in between.
    # stage 0 busy [0,4] and [100,104] -> no idle in the window
    # stage 1 busy [1,4] and [101,104] -> idle 1 + 1
    b = batches([(0, 0, 0, 4), (1, 0, 100, 104), (0, 1, 1, 4), (1, 1, 101, 104)])
    br = bubble_ratio(b, requests([(0, 0.0, 4.0), (1, 100.0, 104.0)]), pp=2)
    assert br.window == pytest.approx(8.0)
    assert br.per_stage == pytest.approx([0.0, 2 / 8])
    assert br.overall == pytest.approx(2 / 16)


def test_overlapping_requests_form_one_window():
    b = batches([(0, 0, 0, 6)])
    br = bubble_ratio(b, requests([(0, 0.0, 4.0), (1, 2.0, 6.0), (2, 3.0, 5.0)]), pp=1)
    assert br.window == pytest.approx(6.0)
    assert br.overall == pytest.approx(0.0)


def test_overlapping_busy_intervals_not_double_counted():
    # stage 0 rows [0,4], [2,6], [3,5] overlap: busy union [0,6] = 6 of a 10 s window
    b = batches([(0, 0, 0, 4), (1, 0, 2, 6), (2, 0, 3, 5)])
    br = bubble_ratio(b, requests([(0, 0.0, 10.0)]), pp=1)
    assert br.per_stage == pytest.approx([0.4])


def test_busy_time_outside_the_window_is_clipped():
    # busy [0,10] but the request is only in the system during [2, 7]
    b = batches([(0, 0, 0, 10), (1, 1, 0, 3)])
    br = bubble_ratio(b, requests([(0, 2.0, 7.0)]), pp=2)
    assert br.window == pytest.approx(5.0)
    assert br.per_stage == pytest.approx([0.0, 4 / 5])


def test_unfinished_request_counts_to_trace_end_and_rejected_does_not():
    b = batches([(0, 0, 0, 2), (1, 0, 6, 8)])
    # unfinished request arriving at 0: window [0, 8] (last batch end), idle 4
    br = bubble_ratio(b, requests([(0, 0.0, None)]), pp=1)
    assert br.window == pytest.approx(8.0)
    assert br.per_stage == pytest.approx([0.5])
    # a rejected request without finish never holds the system open
    br = bubble_ratio(b, requests([(0, 0.0, 2.0), (1, 1.0, None, "rejected")]), pp=1)
    assert br.window == pytest.approx(2.0)
    assert br.overall == pytest.approx(0.0)


def test_empty_stage_and_empty_window():
    b = batches([(0, 0, 0, 5)])
    br = bubble_ratio(b, requests([(0, 0.0, 5.0)]), pp=3)
    assert br.per_stage == pytest.approx([0.0, 1.0, 1.0])
    assert br.overall == pytest.approx(2 / 3)
    br = bubble_ratio(b.iloc[:0], requests([]), pp=2)
    assert (br.overall, br.per_stage, br.window) == (0.0, [0.0, 0.0], 0.0)
    with pytest.raises(ValueError, match="stages outside"):
        bubble_ratio(batches([(0, 2, 0, 1)]), requests([(0, 0.0, 1.0)]), pp=2)


def test_merge_intervals():
    s, e = merge_intervals(np.array([5.0, 0.0, 1.0, 10.0, 3.0]), np.array([6.0, 2.0, 3.0, 10.0, 4.0]))
    # [0,2]+[1,3]+[3,4] touch -> [0,4]; [5,6]; zero-length [10,10] dropped
    assert s.tolist() == [0.0, 5.0] and e.tolist() == [4.0, 6.0]


@st.composite
def gantt(draw):
    pp = draw(st.integers(1, 4))
    n_req = draw(st.integers(1, 6))
    reqs = []
    for i in range(n_req):
        a = draw(st.floats(0, 100, allow_nan=False))
        d = draw(st.floats(0, 20, allow_nan=False))
        finished = draw(st.booleans()) or i == 0
        reqs.append((i, a, a + d if finished else None))
    rows = []
    for k in range(draw(st.integers(0, 15))):
        s = draw(st.integers(0, pp - 1))
        a = draw(st.floats(0, 130, allow_nan=False))
        rows.append((k, s, a, a + draw(st.floats(0, 20, allow_nan=False))))
    return pp, reqs, rows


@settings(max_examples=150, deadline=None)
@given(gantt())
def test_property_bubble_ratio_in_unit_interval(case):
    pp, reqs, rows = case
    br = bubble_ratio(batches(rows), requests(reqs), pp)
    assert 0.0 <= br.overall <= 1.0
    assert len(br.per_stage) == pp and all(0.0 <= r <= 1.0 for r in br.per_stage)
    assert br.overall == pytest.approx(float(np.mean(br.per_stage)))


@settings(max_examples=150, deadline=None)
@given(gantt(), st.lists(st.floats(0.0, 1.0), min_size=0, max_size=5))
def test_property_zero_when_every_stage_busy_over_window(case, cuts):
    pp, reqs, _ = case
    # every stage is busy over each request's interval, chopped into overlapping pieces
    end = max([a for _, a, _ in reqs] + [f for _, _, f in reqs if f is not None]) + 1.0
    rows, k = [], 0
    for _, a, f in reqs:
        f = end if f is None else f
        points = sorted({a, f, *(a + c * (f - a) for c in cuts)})
        for s in range(pp):
            for lo, hi in zip(points[:-1], points[1:]):
                rows.append((k, s, lo, hi))
                k += 1
            rows.append((k, s, a, a + 0.5 * (f - a)))  # an overlapping duplicate
            k += 1
    rows.append((k, 0, end - 1.0, end))  # fixes the trace end for unfinished requests
    br = bubble_ratio(batches(rows), requests(reqs), pp, end=end)
    assert br.overall == pytest.approx(0.0, abs=1e-9)
    assert br.per_stage == pytest.approx([0.0] * pp, abs=1e-9)


def test_bubble_ratio_scales():
    rng = np.random.default_rng(0)
    n = 200_000
    start = np.sort(rng.uniform(0, 1000, n))
    b = pd.DataFrame({"batch_id": np.arange(n), "stage": rng.integers(0, 4, n), "start": start,
                      "end": start + rng.uniform(0, 0.05, n), "prefill_tokens": 0, "decode_tokens": 1,
                      "num_requests": 1})
    arr = np.sort(rng.uniform(0, 1000, 5000))
    r = pd.DataFrame({"request_id": np.arange(5000), "arrival": arr, "finish": arr + 1.0,
                      "status": "finished"})
    br = bubble_ratio(b, r, pp=4)
    assert 0.0 < br.overall < 1.0


# ------------------------------------------------------------------ latency / summary

def latency_trace():
    # r0: arrives 0, tokens at 1, 2, 4   -> ttft 1, e2e 4, tpot (4-1)/2 = 1.5, itl [1, 2]
    # r1: arrives 1, tokens at 3, 3.5    -> ttft 2, e2e 2.5, tpot 0.5, itl [0.5]
    # r2: arrives 2, token at 2.5        -> ttft 0.5, e2e 0.5, no tpot, no itl
    # r3: arrives 3, still running (one token at 5) -> excluded from latency
    # r4: rejected at arrival 4
    req = pd.DataFrame([
        (0, 0.0, 0.5, 1.0, 4.0, 10, 3, 3, 1, "finished", "length"),
        (1, 1.0, 1.5, 3.0, 3.5, 20, 2, 2, 0, "finished", "length"),
        (2, 2.0, 2.0, 2.5, 2.5, 30, 1, 1, 2, "finished", "stop"),
        (3, 3.0, 3.5, 5.0, None, 40, 1, 5, 0, "running", None),
        (4, 4.0, None, None, 4.0, 9999, 0, 5, 0, "rejected", "too_long"),
    ], columns=REQUEST_COLUMNS)
    tok = pd.DataFrame([(0, 2, 4.0), (0, 0, 1.0), (1, 0, 3.0), (0, 1, 2.0), (1, 1, 3.5), (2, 0, 2.5),
                        (3, 0, 5.0)], columns=TOKEN_COLUMNS)
    b = batches([(0, 0, 0.0, 1.0), (0, 1, 1.0, 2.0), (1, 0, 2.0, 3.0), (1, 1, 3.0, 5.0)])
    smp = pd.DataFrame([(0.0, 0, 100, 0.0, 1, 0, 0, 0), (1.0, 50, 100, 0.5, 3, 0, 1, 1),
                        (3.0, 100, 100, 1.0, 0, 0, 2, 2), (5.0, 20, 100, 0.2, 0, 0, 0, 1)],
                       columns=SAMPLE_COLUMNS)
    return Trace(batches=b, requests=req, tokens=tok, samples=smp, meta={"pp": 2, "policy": "test"})


def test_latency_metrics_by_hand():
    s = summarize(latency_trace())
    assert s["ttft_mean"] == pytest.approx((1 + 2 + 0.5) / 3)
    assert s["ttft_p50"] == pytest.approx(1.0)
    assert s["ttft_p90"] == pytest.approx(np.percentile([0.5, 1, 2], 90))  # 1.8
    assert s["ttft_p90"] == pytest.approx(1.8)
    assert s["ttft_max"] == pytest.approx(2.0)
    assert s["tpot_mean"] == pytest.approx(1.0)
    assert s["tpot_p50"] == pytest.approx(1.0)
    assert s["tpot_p99"] == pytest.approx(0.5 + 0.99 * 1.0)
    assert s["itl_mean"] == pytest.approx(3.5 / 3)
    assert s["itl_p50"] == pytest.approx(1.0)
    assert s["itl_p90"] == pytest.approx(1.8)
    assert s["e2e_mean"] == pytest.approx(7.0 / 3)
    assert s["e2e_p50"] == pytest.approx(2.5)
    # counts
    assert (s["requests"], s["finished"], s["rejected"], s["unfinished"], s["preemptions"]) == (5, 3, 1, 1, 3)
    # duration: first arrival 0 -> last finish 4
    assert s["duration"] == pytest.approx(4.0)
    assert s["throughput_rps"] == pytest.approx(3 / 4)
    assert s["output_tps"] == pytest.approx((3 + 2 + 1) / 4)
    assert s["total_tps"] == pytest.approx((3 + 2 + 1 + 10 + 20 + 30) / 4)
    assert s["goodput_rps"] == pytest.approx(s["throughput_rps"])
    # samples: kv_util 0 on [0,1), .5 on [1,3), 1 on [3,5) -> (0 + 1 + 2) / 5
    assert s["kv_util_mean"] == pytest.approx(0.6)
    assert s["kv_util_max"] == pytest.approx(1.0)
    assert s["waiting_mean"] == pytest.approx((1 * 1 + 3 * 2 + 0 * 2) / 5)
    assert s["waiting_max"] == 3
    assert list(s) == summary_keys(2)
    assert set(SUMMARY_KEYS) <= set(s)


def test_goodput_with_slos():
    t = latency_trace()
    # ttft <= 1: r0, r2 pass
    assert summarize(t, {"ttft_slo": 1.0})["goodput_rps"] == pytest.approx(2 / 4)
    # tpot <= 0.6: r1 passes, r2 has no tpot and passes, r0 (1.5) fails
    assert summarize(t, {"tpot_slo": 0.6})["goodput_rps"] == pytest.approx(2 / 4)
    # both: only r2
    assert summarize(t, {"ttft_slo": 1.0, "tpot_slo": 0.6})["goodput_rps"] == pytest.approx(1 / 4)
    # e2e <= 2.5: r1, r2; None = not applied
    assert summarize(t, {"e2e_slo": 2.5, "ttft_slo": None})["goodput_rps"] == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="unknown SLO"):
        summarize(t, {"latency": 1.0})


def test_bubble_in_summary_and_pp_required():
    t = latency_trace()
    s = summarize(t)
    # window: r0 [0,4] r1 [1,3.5] r2 [2,2.5] r3 [3, end=5] -> [0,5]; rejected r4 [4,4] empty
    # stage 0 busy 2 -> 0.6 idle; stage 1 busy 3 -> 0.4 idle
    assert s["bubble_window"] == pytest.approx(5.0)
    assert s["bubble_ratio_stage0"] == pytest.approx(0.6)
    assert s["bubble_ratio_stage1"] == pytest.approx(0.4)
    assert s["bubble_ratio"] == pytest.approx(0.5)
    t.meta.pop("pp")
    with pytest.raises(ValueError, match="pp"):
        summarize(t)


def test_itl_sorts_tokens_within_requests():
    tok = pd.DataFrame([(1, 1, 5.0), (0, 1, 1.0), (1, 0, 4.0), (0, 0, 0.0)], columns=TOKEN_COLUMNS)
    assert sorted(inter_token_latencies(tok).tolist()) == [1.0, 1.0]
    assert inter_token_latencies(tok, [1]).tolist() == [1.0]


def test_time_weighted_edge_cases():
    assert all(math.isnan(x) for x in time_weighted(np.array([]), np.array([])))
    assert time_weighted(np.array([2.0, 2.0]), np.array([1.0, 3.0])) == (2.0, 3.0)


def test_empty_trace_summary_and_format():
    t = Trace(batches=batches([]), requests=requests([]), tokens=pd.DataFrame(columns=TOKEN_COLUMNS),
              samples=pd.DataFrame(columns=SAMPLE_COLUMNS), meta={"pp": 2})
    s = summarize(t)
    assert s["throughput_rps"] == 0.0 and s["finished"] == 0 and math.isnan(s["ttft_mean"])
    assert s["bubble_ratio"] == 0.0
    assert "ttft" in format_summary(s)


def test_format_summary_is_aligned_text():
    text = format_summary(summarize(latency_trace()))
    lines = text.splitlines()
    rows = [ln for ln in lines if ln.strip().split(" ")[0] in ("ttft", "tpot", "itl", "e2e")]
    assert len(rows) == 4 and len({len(r) for r in rows}) == 1
    assert "1000.00" in text  # ttft p50 = 1 s shown in ms
    assert "s0 0.600" in text and "s1 0.400" in text


# ------------------------------------------------------------------ trace I/O

def test_save_load_roundtrip_csv(tmp_path):
    t = latency_trace()
    t.meta["seed"] = np.int64(7)
    t.meta["nested"] = {"a": [1, 2]}
    t.batches.loc[0, "end"] = 1 / 3
    t.samples.loc[1, "kv_util"] = 0.1 + 0.2
    folder = t.save(tmp_path / "run")
    assert sorted(p.name for p in folder.iterdir()) == [
        "batches.csv", "meta.json", "requests.csv", "samples.csv", "tokens.csv"]
    u = Trace.load(folder)
    assert u.meta == {"pp": 2, "policy": "test", "seed": 7, "nested": {"a": [1, 2]}}
    pd.testing.assert_frame_equal(u.batches, t.batches, check_exact=True)
    pd.testing.assert_frame_equal(u.tokens, t.tokens, check_exact=True)
    pd.testing.assert_frame_equal(u.samples, t.samples, check_exact=True)
    pd.testing.assert_frame_equal(u.requests, t.requests, check_dtype=False)
    reasons = u.requests["finish_reason"]
    assert reasons.isna().tolist() == [False, False, False, True, False]
    assert reasons.dropna().tolist() == ["length", "length", "stop", "too_long"]
    # floats survive CSV exactly
    assert u.requests["arrival"].tolist() == t.requests["arrival"].tolist()
    assert u.requests["status"].tolist() == t.requests["status"].tolist()
    assert summarize(u) == pytest.approx(summarize(t), nan_ok=True)
    # a second save/load is the identity
    v = Trace.load(u.save(tmp_path / "again"))
    for name in ("batches", "requests", "tokens", "samples"):
        pd.testing.assert_frame_equal(getattr(v, name), getattr(u, name))


def test_save_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="formats"):
        latency_trace().save(tmp_path, formats=("xlsx",))


def test_save_load_roundtrip_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    t = latency_trace()
    u = Trace.load(t.save(tmp_path, formats=("csv", "parquet")))
    assert (tmp_path / "batches.parquet").exists()
    pd.testing.assert_frame_equal(u.batches, t.batches)
    pd.testing.assert_frame_equal(u.requests, t.requests, check_dtype=False)


def test_perfetto_tracks_and_events(tmp_path):
    t = latency_trace()
    path = t.to_perfetto(tmp_path / "trace.json")
    doc = json.loads(path.read_text())
    ev = doc["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {0: "stage 0", 1: "stage 1"}
    xs = [e for e in ev if e["ph"] == "X"]
    assert len(xs) == len(t.batches)
    x = next(e for e in xs if e["tid"] == 1 and e["name"] == "mb 1")
    assert x["ts"] == pytest.approx(3.0e6) and x["dur"] == pytest.approx(2.0e6)
    assert x["args"]["prefill_tokens"] == 10 and x["args"]["decode_tokens"] == 2
    counters = [e for e in ev if e["ph"] == "C"]
    kv = [e["args"]["kv_util"] for e in counters if e["name"] == "kv_util"]
    assert kv == [0.0, 0.5, 1.0, 0.2]
    q = [e["args"] for e in counters if e["name"] == "queues"]
    assert [a["waiting"] for a in q] == [1, 3, 0, 0] and "running" in q[0]
    assert all({"ph", "pid", "name"} <= set(e) for e in ev)


def test_recorder_trace_roundtrips(tmp_path):
    from core.request import Request, Status
    from core.trace import TraceRecorder

    rec = TraceRecorder()
    rec.stage(0, 0, 0.0, 1.0, 5, 0, 1)
    rec.stage(0, 1, 1.0, 2.0, 5, 0, 1)
    rec.sample(0.0, 0, 10, 1, 0, 0, 0)
    rec.sample(2.0, 5, 10, 0, 0, 0, 1)
    done = Request(id=0, prompt_len=5, max_output=1, arrival=0.0)
    done.output_ids, done.token_times, done.finish_time = [7], [2.0], 2.0
    done.status, done.finish_reason, done.first_scheduled = Status.FINISHED, "length", 0.0
    waiting = Request(id=1, prompt_len=3, max_output=2, arrival=1.5)
    t = rec.build([done, waiting], meta={"pp": 2})
    u = Trace.load(t.save(tmp_path))
    assert u.requests["status"].tolist() == ["finished", "waiting"]
    assert summarize(u) == pytest.approx(summarize(t), nan_ok=True)
    s = summarize(u)
    assert (s["finished"], s["unfinished"], s["ttft_mean"], s["bubble_ratio"]) == (1, 1, 2.0, 0.5)


def test_recorder_tables_are_views_of_its_arrays_and_build_is_its_last_step():
    """build() hands its recorded columns to pandas without copying them (the simulator's
    ~25 MB cost ~6,000 page faults to copy), so appending after it fails loudly while the
    tables live, instead of the data moving under them."""
    import numpy as np
    from core.trace import TraceRecorder
    rec = TraceRecorder()
    rec.stages(7, [0.0, 1.0], [1.0, 2.5], 5, 1, 2)
    rec.sample(0.5, 3, 10, 1, 2, 1, 3)
    trace = rec.build([], {})
    assert trace.batches["end"].tolist() == [1.0, 2.5] and trace.batches["stage"].tolist() == [0, 1]
    assert trace.samples["kv_util"].tolist() == [0.3]
    assert np.shares_memory(trace.samples["waiting"].to_numpy(), np.frombuffer(rec._sample_cols[3], np.int64))
    with pytest.raises(BufferError):
        rec.sample(1.0, 3, 10, 1, 2, 1, 3)
