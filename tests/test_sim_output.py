"""What `pipetwin sim` writes: default tables, the token table and Perfetto trace on request,
a Perfetto time window, and the lazily built token table behind the Python API."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core.metrics import inter_token_latencies, summarize
from core.trace import Trace
from sim import SimConfig, default_workload, simulate
from sim.output import parse_window, save_outputs

PROFILE = "qwen2.5-32b_a100-80gb_pp4"


@pytest.fixture(scope="module")
def result():
    return simulate(SimConfig(profile=PROFILE, policy="token_throttling", seed=3,
                              workload={**default_workload(), "num_requests": 60,
                                        "arrival": {"kind": "gamma", "rate": 4.0}}))


def test_token_gaps_without_the_table_match_the_table(result):
    # a fresh run: its token table is not built until read
    fresh = simulate(result.config)
    finished = fresh.trace.requests.query("status == 'finished'")["request_id"]
    lazy = fresh.trace.token_gaps(finished.iloc[::2])
    table = inter_token_latencies(fresh.trace.tokens, finished.iloc[::2])
    assert len(lazy) > 100
    np.testing.assert_array_equal(lazy, table)
    assert fresh.trace.tokens is fresh.trace.tokens          # built once, kept
    assert len(fresh.trace.tokens) == int(fresh.trace.requests["output_len"].sum())


def test_default_outputs_leave_out_tokens_and_perfetto(result, tmp_path):
    (tmp_path / "perfetto.json").write_text("{}")        # a previous run's files in the folder
    (tmp_path / "tokens.csv").write_text("stale")
    written = save_outputs(result, tmp_path, formats=("csv",))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["batches.csv", "config.yaml", "meta.json", "requests.csv", "samples.csv", "summary.json"]
    assert sorted(p.name for p in written) == names
    back = Trace.load(tmp_path)
    assert not back.has_tokens
    with pytest.raises(FileNotFoundError, match="no tokens table.*--tokens"):
        back.tokens
    pd.testing.assert_frame_equal(back.batches, result.trace.batches)
    assert json.loads((tmp_path / "summary.json").read_text())["requests"] == 60


def test_tokens_and_perfetto_on_request(result, tmp_path):
    save_outputs(result, tmp_path, formats=("csv",), tokens=True, perfetto=True)
    back = Trace.load(tmp_path)
    assert back.has_tokens
    pd.testing.assert_frame_equal(back.tokens, result.trace.tokens)
    assert summarize(back)["itl_p99"] == pytest.approx(result.summary["itl_p99"])
    doc = json.loads((tmp_path / "perfetto.json").read_text())
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(result.trace.batches)
    assert doc["otherData"]["policy"] == "token_throttling"


@pytest.mark.parametrize("chunk", [7, 100_000])
def test_perfetto_window_keeps_overlapping_rows_and_counters_from_before(result, tmp_path, chunk):
    b, sm = result.trace.batches, result.trace.samples
    lo, hi = 4.0, 6.0
    path = result.trace.to_perfetto(tmp_path / "w.json", window=(lo, hi), chunk=chunk)
    ev = json.loads(path.read_text())["traceEvents"]
    xs = [e for e in ev if e["ph"] == "X"]
    expect = b[(b["end"] >= lo) & (b["start"] <= hi)]
    assert 0 < len(xs) == len(expect) < len(b)
    assert sorted(e["args"]["batch_id"] for e in xs) == sorted(expect["batch_id"].tolist())
    kv_ts = [e["ts"] / 1e6 for e in ev if e["name"] == "kv_util"]
    inside = sm[(sm["time"] >= lo) & (sm["time"] <= hi)]
    assert len(kv_ts) == len(inside) + 1                     # + the last sample before the window
    assert min(kv_ts) < lo and max(kv_ts) <= hi
    assert sum(e["name"] == "queues" for e in ev) == len(kv_ts)


def test_perfetto_streamed_in_chunks_equals_one_piece(result, tmp_path):
    a = result.trace.to_perfetto(tmp_path / "a.json", chunk=5)
    b = result.trace.to_perfetto(tmp_path / "b.json", chunk=10**9)
    assert json.loads(a.read_text()) == json.loads(b.read_text())


@pytest.mark.parametrize("text", ["5", "3:2", "a:b", "-1:2", "1:inf"])
def test_window_parse_errors_say_what_is_allowed(text):
    with pytest.raises(ValueError, match="START:END"):
        parse_window(text)
    assert parse_window("1.5:20") == (1.5, 20.0)


def test_save_rejects_unknown_tables(result, tmp_path):
    with pytest.raises(ValueError, match="tables must include"):
        result.trace.save(tmp_path, tables=("batches", "requests", "samples", "kv"))


def test_token_gaps_match_the_table_with_empty_requests_and_any_subset():
    from array import array

    from core.trace import TokenTimes
    rng = np.random.default_rng(0)
    for _ in range(30):
        per = [(i, array("d", np.cumsum(rng.random(rng.integers(0, 5))))) for i in range(int(rng.integers(0, 40)))]
        tokens = TokenTimes(per)
        ids = [i for i, _ in per]
        for subset in (None, ids, ids[::3], []):
            np.testing.assert_array_equal(tokens.gaps(subset), inter_token_latencies(tokens.frame(), subset))


def test_sim_command_defaults_and_a_perfetto_window(tmp_path, capsys):
    from cli.main import main

    small = ["--num-requests", "40", "--rate", "4", "--policy", "token_throttling"]
    out = tmp_path / "default"
    assert main(["sim", *small, "--out", str(out)]) == 0
    assert "--perfetto" in capsys.readouterr().out
    fmt = "parquet" if pytest.importorskip("pyarrow") else "csv"
    assert {p.name for p in out.iterdir()} == {f"{t}.{fmt}" for t in ("batches", "requests", "samples")} | {
        "meta.json", "summary.json", "config.yaml"}
    win = tmp_path / "window"
    assert main(["sim", *small, "--out", str(win), "--perfetto-window", "2:4", "--formats", "csv"]) == 0
    ev = json.loads((win / "perfetto.json").read_text())["traceEvents"]
    b = pd.read_csv(win / "batches.csv")
    xs = [e for e in ev if e["ph"] == "X"]
    assert 0 < len(xs) == int(((b["end"] >= 2) & (b["start"] <= 4)).sum()) < len(b)
