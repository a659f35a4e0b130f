"""`pipetwin validate` and `pipetwin bench` end to end on a tiny random Llama (pp=2, real
stage processes). The simulator side uses a stand-in latency table built in tmp_path (the
shipped 32M CPU table, latencies scaled down): numbers are not asserted, structure and
consistency are (same requests on both sides, every metric in the error table, report
and plots written, the same results folder layout as `pipetwin sim`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytest.importorskip("torch")

from core.metrics import summary_keys  # noqa: E402
from core.trace import Trace  # noqa: E402
from twin.workload import workload_requests  # noqa: E402
from cli.main import main  # noqa: E402
from twin.validate.compare import ERROR_COLUMNS, REL_METRICS  # noqa: E402
from profiles.in_situ import stage_turnaround  # noqa: E402
from profiles.schema import TABLES_DIR  # noqa: E402

TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
        "max_position_embeddings": 2048, "torch_dtype": "float32"}
MODEL = "dummy:" + json.dumps(TINY)
WORKLOAD = {"num_requests": 10, "arrival": {"kind": "gamma", "burstiness": 1.0},
            "prompt_len": {"kind": "lognormal", "mean": 40, "spread": 0.5, "max": 120},
            "output_len": {"kind": "lognormal", "mean": 8, "spread": 0.5, "max": 20}}
SEED = 3
PROFILE_PP1 = "llama-32m_cpu-1thread_pp1"   # any shipped pp 1 table: config checks load it
RATE = 25.0


@pytest.fixture(scope="module")
def standin_profile(tmp_path_factory):
    """The shipped 32M CPU table with every latency scaled by 0.1 (a tiny model's stand-in)."""
    out = tmp_path_factory.mktemp("prof") / "tiny_standin_pp2"
    shutil.copytree(TABLES_DIR / "llama-32m_cpu-1thread_pp2", out)
    st = pd.read_csv(out / "stages.csv")
    for c in ("latency_median", "latency_p10", "latency_p90"):
        st[c] = st[c] * 0.1
    st.to_csv(out / "stages.csv", index=False)
    return out


@pytest.fixture(scope="module")
def validated(standin_profile, tmp_path_factory):
    d = tmp_path_factory.mktemp("val")
    cfg = {"name": "tiny", "model": MODEL, "pp": 2, "profile": str(standin_profile), "num_pages": 128,
           "page_size": 16, "seed": SEED, "workload": WORKLOAD, "loads": [RATE],
           "policies": [{"name": "token_throttling", "label": "tt"}], "out": str(d / "out"),
           "calibrate": {"loads": [RATE]}, "repeats": 2, "sim_repeats": 3}
    (d / "v.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(d / "v.yaml")]) == 0
    return d / "out"


def test_both_sides_saw_the_same_requests(validated):
    want = workload_requests({**WORKLOAD, "arrival": {**WORKLOAD["arrival"], "rate": RATE}}, SEED)
    run = validated / "runs" / "tt_r25"
    sim, real = Trace.load(run / "sim"), Trace.load(run / "real")
    for trace in (sim, real):
        r = trace.requests.sort_values("request_id")
        assert r["request_id"].tolist() == [q.id for q in want]
        assert r["prompt_len"].tolist() == [q.prompt_len for q in want]
        assert r["output_len"].tolist() == [q.max_output for q in want]
        assert r["arrival"].to_numpy() == pytest.approx([q.arrival for q in want], abs=1e-9)
        assert (r["status"] == "finished").all()
        assert (r["first_scheduled"] >= r["arrival"] - 1e-9).all()
    assert max(q.arrival for q in want) > 0            # arrivals spread out, not all at once
    assert sim.meta["num_pages"] == real.meta["num_pages"] == 128
    assert sim.meta["source"] == "sim" and real.meta["world"] == "runtime"
    # fixed output lengths on the runtime: one token row per output token
    assert len(real.tokens) == sum(q.max_output for q in want)


def test_error_table_report_and_plots(validated):
    errors = pd.read_csv(validated / "errors.csv")
    assert len(errors) == 1 and errors["same_requests"].all()
    assert set(ERROR_COLUMNS) <= set(errors.columns)
    assert {f"{m}_err_pct" for m in REL_METRICS} == {"throughput_err_pct", "ttft_p50_err_pct", "ttft_p99_err_pct",
                                                      "tpot_p50_err_pct", "tpot_p99_err_pct", "e2e_p50_err_pct"}
    row = errors.iloc[0]
    assert row["throughput_err_pct"] == pytest.approx(
        100 * (row["sim_output_tps"] - row["real_output_tps"]) / row["real_output_tps"])
    assert row["bubble_diff_pts"] == pytest.approx(100 * (row["sim_bubble"] - row["real_bubble"]))
    assert row["e2e_mape_pct"] >= 0 and row["real_busy_s"] > 0 and row["sim_busy_s"] > 0
    assert row["sim_vs_table"] > 0 and row["real_vs_table"] > 0
    assert "## Diagnostics" in (validated / "report.md").read_text()
    for c in ERROR_COLUMNS:
        assert pd.notna(row[c]), c
    ranking = pd.read_csv(validated / "ranking.csv")
    assert list(ranking.columns) == ["metric", "load", "sim_order", "real_order", "same", "separated_pairs",
                                     "same_separated", "reversed_separated", "apart_by_chance"]
    assert ranking["metric"].tolist() == ["output_tps", "ttft_p50"]
    assert ranking["separated_pairs"].tolist() == [0, 0]   # one policy: no pairs
    report = (validated / "report.md").read_text()
    # issue 14: cells whose real stage time / table > 1.2 are flagged (or none is, in so many words)
    flagged = row["real_vs_table"] > 1.2
    assert ("Real stages slower than the table" in report) == flagged
    assert ("within 1.2x of the table's prediction" in report) == (not flagged)
    for text in ("thru %", "TTFT p50 %", "TTFT p99 %", "TPOT p50 %", "TPOT p99 %", "E2E p50 %", "bubble pts",
                 "E2E MAPE %", "## Goals", "ranking", "machine:"):
        assert text in report, text
    plots = validated / "plots"
    for stem in ("timeline_tt_r25", "cdf_tt_r25", "bubble_sim_vs_real"):
        assert (plots / f"{stem}.png").stat().st_size > 0
        assert f"plots/{stem}.png" in report


def test_repeats_run_the_same_requests_again_and_report_their_spread(validated):
    run = validated / "runs" / "tt_r25"
    first, second = Trace.load(run / "real"), Trace.load(run / "real_2")
    for col in ("request_id", "prompt_len", "output_len"):
        assert first.requests[col].tolist() == second.requests[col].tolist()
    row = pd.read_csv(validated / "errors.csv").iloc[0]
    s1 = json.loads((run / "real" / "summary.json").read_text())
    s2 = json.loads((run / "real_2" / "summary.json").read_text())
    assert row["repeats"] == 2
    assert row["real_output_tps"] == pytest.approx((s1["output_tps"] + s2["output_tps"]) / 2)
    mean = (s1["tpot_p50"] + s2["tpot_p50"]) / 2
    assert row["real_spread_tpot_p50_pct"] == pytest.approx(100 * abs(s1["tpot_p50"] - s2["tpot_p50"]) / mean)
    assert "## Spread over repeats" in (validated / "report.md").read_text()


def test_sim_repeats_draw_measured_jitter_and_are_compared_mean_to_mean(validated):
    """sim_repeats: 3 -> three simulator runs with the in-situ table's jitter (seeds 0-2),
    each with its summary in sim_repeats.csv; the error row holds their mean and spread."""
    run = validated / "runs" / "tt_r25"
    jitter = pd.read_csv(validated / "calibration" / "profile" / "jitter.csv")
    assert list(jitter.columns) == ["tokens", "stage_0", "stage_1"] and len(jitter) > 0
    reps = pd.read_csv(run / "sim_repeats.csv")
    assert reps["jitter_seed"].tolist() == [0, 1, 2]
    assert reps["tpot_p50"].nunique() > 1             # the draws differ, so the runs do
    row = pd.read_csv(validated / "errors.csv").iloc[0]
    assert row["sim_repeats"] == 3
    assert row["sim_output_tps"] == pytest.approx(reps["output_tps"].mean())
    assert row["sim_tpot_p50"] == pytest.approx(reps["tpot_p50"].mean())
    assert row["sim_spread_tpot_p50_pct"] == pytest.approx(
        100 * (reps["tpot_p50"].max() - reps["tpot_p50"].min()) / reps["tpot_p50"].mean())
    cfg = yaml.safe_load((run / "sim" / "config.yaml").read_text())
    assert cfg["stage_jitter"] is True and cfg["jitter_seed"] == 0
    sim = json.loads((run / "sim" / "summary.json").read_text())
    assert sim["tpot_p50"] == pytest.approx(reps["tpot_p50"].iloc[0])


def test_simulator_is_timed_by_an_in_situ_table_from_other_requests(validated):
    """calibrate: before each of its two real runs the runtime ran other requests (seed +
    1); the stage rows of both calibration runs became the simulator's latency table."""
    cal = Trace.load(validated / "calibration" / "runs" / "tt_r25")
    cal2 = Trace.load(validated / "calibration" / "runs" / "tt_r25_pass2")
    ours = Trace.load(validated / "runs" / "tt_r25" / "real")
    assert cal.requests["prompt_len"].tolist() != ours.requests["prompt_len"].tolist()
    assert cal.requests["prompt_len"].tolist() == cal2.requests["prompt_len"].tolist()
    table = validated / "calibration" / "profile"
    meta = yaml.safe_load((table / "meta.yaml").read_text())
    assert meta["measurement"]["tool"].startswith("profiles.in_situ") and meta["sched_overhead_s"] == 0
    stages = pd.read_csv(table / "stages.csv")
    assert len(stages) == sum((c.batches["end"] > c.batches["start"]).sum() for c in (cal, cal2))
    assert set(stages["stage"]) == {0, 1}
    # the stage turnaround measured on those same runs, "waiting" meaning finished upstream
    # over two of the table's slowest hops before
    margin = 2 * pd.read_csv(table / "transfer.csv")["latency_median"].max()
    assert meta["stage_turnaround_s"] == pytest.approx(stage_turnaround([cal.batches, cal2.batches], 2, margin))
    assert meta["stage_turnaround_s"][0] == 0.0 and meta["stage_turnaround_s"][1] >= 0.0
    sim_cfg = yaml.safe_load((validated / "runs" / "tt_r25" / "sim" / "config.yaml").read_text())
    assert sim_cfg["profile"] == str(table)
    assert "in-situ table" in (validated / "report.md").read_text()


def test_reuse_real_reruns_only_the_simulator_against_the_recorded_runs(validated, standin_profile, tmp_path,
                                                                        capsys):
    """--reuse-real: the real runs are read back, not run again; the in-situ table is
    rebuilt from the recorded calibration runs, the same table, so the simulator gives the
    same rows and the whole error table comes out the same."""
    out = tmp_path / "out"
    shutil.copytree(validated, out)
    real_rows = (out / "runs" / "tt_r25" / "real" / "batches.csv").read_bytes()
    cfg = yaml.safe_load((validated / "runs" / "tt_r25" / "sim" / "config.yaml").read_text())
    assert cfg["profile"] == str(validated / "calibration" / "profile")
    table = (out / "calibration" / "profile" / "stages.csv").read_bytes()
    v = {"name": "tiny", "model": MODEL, "pp": 2, "profile": str(standin_profile), "num_pages": 128,
         "page_size": 16, "seed": SEED, "workload": WORKLOAD, "loads": [RATE],
         "policies": [{"name": "token_throttling", "label": "tt"}], "calibrate": {"loads": [RATE]}, "repeats": 2,
         "sim_repeats": 3}
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(v))
    assert main(["validate", str(tmp_path / "v.yaml"), "--out", str(out), "--reuse-real"]) == 0
    assert (out / "runs" / "tt_r25" / "real" / "batches.csv").read_bytes() == real_rows
    # the in-situ table is rebuilt from the recorded calibration runs: the same table
    assert (out / "calibration" / "profile" / "stages.csv").read_bytes() == table
    before, after = pd.read_csv(validated / "errors.csv"), pd.read_csv(out / "errors.csv")
    same = [c for c in before.columns if not c.startswith("loadavg")]
    pd.testing.assert_frame_equal(before[same], after[same])
    assert "--reuse-real" in (out / "report.md").read_text()
    # a config that now asks for other requests, or for more runs than were recorded, is refused
    for change, named in (({"seed": SEED + 5, "calibrate": {"loads": [RATE], "seed": 99}}, "other requests"),
                          ({"repeats": 3}, "tt_r25_pass3")):
        (tmp_path / "w.yaml").write_text(yaml.safe_dump({**v, **change}))
        with pytest.raises(SystemExit) as e:
            main(["validate", str(tmp_path / "w.yaml"), "--out", str(out), "--reuse-real"])
        assert e.value.code == 2 and named in capsys.readouterr().err, named
    with pytest.raises(SystemExit) as e:
        main(["validate", str(tmp_path / "v.yaml"), "--out", str(tmp_path / "empty"), "--reuse-real"])
    assert e.value.code == 2 and "without --reuse-real first" in capsys.readouterr().err


def test_calibration_interleaves_and_repeats_spread_over_the_run(standin_profile, tmp_path):
    """In every pass, each cell's calibration run comes just before its real run, and the
    passes go over the cells in turn (the second in reverse), so slow drift of the machine
    reaches table and runs alike and no cell gets only the end of the run; a
    calibration-only load runs first, once."""
    out = tmp_path / "out"
    v = {"model": MODEL, "pp": 2, "profile": str(standin_profile), "num_pages": 128, "seed": SEED,
         "workload": {**WORKLOAD, "num_requests": 4}, "loads": [RATE, 2 * RATE],
         "policies": [{"name": "sarathi", "label": "s"}], "out": str(out),
         "calibrate": {"loads": [RATE / 2, RATE, 2 * RATE]}, "repeats": 2}
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(v))
    assert main(["validate", str(tmp_path / "v.yaml")]) == 0
    r1, r2, r0 = (f"s_r{RATE:g}", f"s_r{2 * RATE:g}", f"s_r{RATE / 2:g}")
    cal = out / "calibration" / "runs"
    written = {name: path.stat().st_mtime_ns for name, path in (
        ("cal0", cal / r0 / "summary.json"),
        ("cal1", cal / r1 / "summary.json"),
        ("real1", out / "runs" / r1 / "real" / "summary.json"),
        ("cal2", cal / r2 / "summary.json"),
        ("real2", out / "runs" / r2 / "real" / "summary.json"),
        ("cal2_again", cal / f"{r2}_pass2" / "summary.json"),
        ("real2_again", out / "runs" / r2 / "real_2" / "summary.json"),
        ("cal1_again", cal / f"{r1}_pass2" / "summary.json"),
        ("real1_again", out / "runs" / r1 / "real_2" / "summary.json"))}
    assert sorted(written, key=written.get) == ["cal0", "cal1", "real1", "cal2", "real2", "cal2_again",
                                                "real2_again", "cal1_again", "real1_again"]
    assert not (cal / f"{r0}_pass2").exists()
    stages = pd.read_csv(out / "calibration" / "profile" / "stages.csv")
    cal_rows = sum(int((Trace.load(cal / r).batches.eval("end > start")).sum())
                   for r in (r0, r1, r2, f"{r1}_pass2", f"{r2}_pass2"))
    assert len(stages) == cal_rows   # the table holds every calibration run's rows
    a, b = Trace.load(out / "runs" / r1 / "real"), Trace.load(out / "runs" / r1 / "real_2")
    assert a.requests["prompt_len"].tolist() == b.requests["prompt_len"].tolist()


def test_bench_writes_the_sim_results_folder(standin_profile, tmp_path, capsys):
    cfg = {"model": MODEL, "pp": 2, "workload": {**WORKLOAD, "num_requests": 6}}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "bench"
    assert main(["bench", str(tmp_path / "b.yaml"), "--policy", "sarathi", "--param", "budget=64",
                 "--rate", "40", "--seed", "2", "--num-pages", "96", "--out", str(out)]) == 0
    sim_out = tmp_path / "sim"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"workload": WORKLOAD}))
    assert main(["sim", str(tmp_path / "s.yaml"), "--profile", str(standin_profile), "--policy", "sarathi", "--rate", "40", "--seed", "2",
                 "--num-requests", "6", "--num-pages", "96", "--out", str(sim_out),
                 "--formats", "csv", "--tokens", "--perfetto"]) == 0   # sim's defaults leave the last two out
    files = {p.name for p in out.iterdir()}
    assert files == {p.name for p in sim_out.iterdir()}
    assert {"requests.csv", "batches.csv", "tokens.csv", "samples.csv", "summary.json", "config.yaml",
            "perfetto.json"} <= files
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary_keys(2)) <= set(summary) and summary["finished"] == 6
    conf = yaml.safe_load((out / "config.yaml").read_text())
    assert conf["policy"] == "sarathi" and conf["policy_params"] == {"budget": 64}
    assert conf["num_pages"] == 96 and conf["seed"] == 2 and conf["workload"]["arrival"]["rate"] == 40.0
    want = workload_requests(conf["workload"], 2)
    got = Trace.load(out).requests.sort_values("request_id")
    assert got["prompt_len"].tolist() == [q.prompt_len for q in want]
    assert got["output_len"].tolist() == [q.max_output for q in want]
    assert got["arrival"].to_numpy() == pytest.approx([q.arrival for q in want])
    assert json.loads((out / "perfetto.json").read_text())


@pytest.mark.parametrize("argv, named", [
    (["bench", "--model", MODEL, "--pp", "0"], "--pp"),
    (["bench", "--model", MODEL, "--num-pages", "0"], "--num-pages"),
    (["bench", "--model", MODEL, "--rate", "fast"], "--rate"),
    (["bench", "--model", MODEL, "--policy", "fifo"], "--policy"),
    (["bench", "--model", MODEL, "--param", "budget"], "--param"),
    (["bench", "--model", MODEL, "--num-requests", "x"], "--num-requests"),
    (["bench", "--rate", "2"], "--model"),
    (["bench", "--model", MODEL, "--bogus"], "--bogus"),
    (["bench", "--model", MODEL, "--device", "tpu"], "--device"),
    (["bench", "--model", MODEL, "--dtype", "int8"], "--dtype"),
    (["validate", "no/such.yaml"], "no/such.yaml"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert named in capsys.readouterr().err


def test_bad_validation_config_names_the_key(tmp_path, capsys):
    (tmp_path / "v.yaml").write_text(yaml.safe_dump({"model": MODEL, "profile": PROFILE_PP1, "workload": WORKLOAD,
                                                     "loads": [1.0], "policies": ["vllm"], "lodas": 3}))
    with pytest.raises(SystemExit) as e:
        main(["validate", str(tmp_path / "v.yaml")])
    assert e.value.code == 2 and "lodas" in capsys.readouterr().err
    (tmp_path / "w.yaml").write_text(yaml.safe_dump({"model": MODEL, "profile": PROFILE_PP1, "workload": WORKLOAD,
                                                     "loads": [-1], "policies": ["vllm"]}))
    with pytest.raises(SystemExit) as e:
        main(["validate", str(tmp_path / "w.yaml")])
    assert e.value.code == 2 and "loads[0]" in capsys.readouterr().err


def test_bad_repeats_and_calibrate_are_named(tmp_path, capsys):
    base = {"model": MODEL, "profile": PROFILE_PP1, "workload": WORKLOAD, "loads": [1.0], "policies": ["vllm"]}
    arrival_rate = {**WORKLOAD, "arrival": {**WORKLOAD["arrival"], "rate": 3.0}}
    for extra, named in (({"repeats": 0}, "repeats"), ({"calibrate": {"seed": 0}}, "calibrate.seed"),
                         # checked before the runtime starts: the table, its pp, goals, loads
                         ({"profile": "no_such_table"}, "profile: no_such_table: no such table"),
                         ({"pp": 2}, "pp is 2 but profile 'llama-32m_cpu-1thread_pp1' has pp=1"),
                         ({"goals": {"thruput": 5}}, "unknown key 'thruput' in goals"),
                         ({"goals": {"throughput_err_pct": "abc"}}, "goals.throughput_err_pct must be a number >= 0"),
                         ({"goals": {"bubble_diff_pts": -1}}, "goals.bubble_diff_pts must be a number >= 0"),
                         ({"loads": [8.0, 8]}, "loads must be distinct rates"),
                         ({"calibrate": {"loads": ["inf", "inf"]}}, "calibrate.loads must be distinct"),
                         ({"workload": arrival_rate}, "workload.arrival.rate: validate sets the arrival rate"),
                         ({"workload": {**WORKLOAD, "rate_scale": 2}}, "workload.rate_scale: validate sets"),
                         ({"policies": [{"name": "vllm", "lable": "x"}]},
                          "unknown key 'lable' in policies[0]; did you mean 'label'?"),
                         ({"calibrate": {"lods": [1.0]}}, "lods"), ({"device": "gpu"}, "device must be one of cpu, cuda"),
                         ({"dtype": "fp8"}, "dtype must be one of"),
                         ({"attention_backend": "cudnn"}, "attention_backend must be one of auto, torch, triton"),
                         ({"enforce_eager": "yes"}, "enforce_eager must be true or false")):
        (tmp_path / "v.yaml").write_text(yaml.safe_dump({**base, **extra}))
        with pytest.raises(SystemExit) as e:
            main(["validate", str(tmp_path / "v.yaml")])
        assert e.value.code == 2 and named in capsys.readouterr().err, named


def test_validation_config_takes_the_kernel_settings(tmp_path):
    """attention_backend and enforce_eager are the engine's settings, as in bench and serve."""
    from twin.validate.config import load_validation

    (tmp_path / "v.yaml").write_text(yaml.safe_dump(
        {"model": MODEL, "profile": "llama-32m_cpu-1thread_pp2", "pp": 2, "workload": WORKLOAD, "loads": [1.0],
         "policies": ["vllm"], "attention_backend": "torch", "enforce_eager": True}))
    cfg = load_validation(tmp_path / "v.yaml")
    assert (cfg.attention_backend, cfg.enforce_eager) == ("torch", True)


@pytest.mark.parametrize("name", ["twin_cpu", "twin_cpu_time_balanced", "twin_cpu_chunk_cap", "twin_cpu_pp3",
                                  "twin_cpu_queue_order", "twin_cpu_late", "twin_cpu_pp3_late"])
def test_shipped_validation_configs_load(name):
    """The CPU twin configs the docs' figures come from, with their policies' parameters checked."""
    from core.policies import make_policy
    from twin.validate.config import load_validation

    cfg = load_validation(Path(__file__).resolve().parents[1] / "experiments" / f"{name}.yaml")
    assert cfg.pp == (3 if "_pp3" in name else 2) and len(cfg.loads) == 3
    for p in cfg.policies:
        make_policy(p["name"], p.get("params") or {})


def test_sim_repeats_without_measured_jitter_are_refused(standin_profile, tmp_path, capsys):
    """More than one simulator run means drawing measured jitter: a table without
    jitter.csv and no calibrate is a named error, before anything runs."""
    base = {"model": MODEL, "pp": 2, "profile": str(standin_profile), "workload": WORKLOAD, "loads": [1.0],
            "policies": ["vllm"]}
    for extra, named in (({"sim_repeats": 0}, "sim_repeats must be an int >= 1"),
                         ({"sim_repeats": 4}, "no jitter.csv")):
        (tmp_path / "v.yaml").write_text(yaml.safe_dump({**base, **extra}))
        with pytest.raises(SystemExit) as e:
            main(["validate", str(tmp_path / "v.yaml")])
        assert e.value.code == 2 and named in capsys.readouterr().err, named


def test_goal_lines_say_which_misses_are_inside_the_hardwares_own_spread():
    """Two TPOT misses: -6% where the two real runs differed by 8% (inside their spread),
    +7% where they differed by 2% (outside); throughput met."""
    from twin.validate.report import goal_lines
    errors = pd.DataFrame({"policy": ["a", "b", "c"], "load": [1, 1, 1], "repeats": [2, 2, 2],
                           "tpot_p50_err_pct": [-6.0, 7.0, 1.0], "real_spread_tpot_p50_pct": [8.0, 2.0, 0.5],
                           "throughput_err_pct": [1.0, -2.0, 0.5], "real_spread_output_tps_pct": [0.1, 0.1, 0.1]})
    ranking = pd.DataFrame({"metric": ["output_tps"], "same": [True], "separated_pairs": [1],
                            "same_separated": [1]})
    lines = goal_lines(errors, ranking, {"tpot_p50_err_pct": 5, "throughput_err_pct": 3})
    assert lines[0] == ("- |tpot_p50_err_pct| <= 5 %: MISSED in 2/3 cells; worst +7.0 % (b @ 1 req/s); "
                        "1 of the 2 misses within the real runs' own spread of that cell")
    assert lines[1] == "- |throughput_err_pct| <= 3 %: met; worst -2.0 % (b @ 1 req/s)"
    # one real run per cell: no spread to speak of
    single = goal_lines(errors.assign(repeats=1), ranking, {"tpot_p50_err_pct": 5})
    assert "spread" not in single[0]


def test_ranking_counts_separated_pairs_and_names_the_reversed_ones():
    """At one load, four runs each: A's real runs (100-102) are clear of C's (95-97), and C's
    of B's (90-91). The simulator gets A above both but puts B above C: that pair is reversed
    and named with both sides' gaps."""
    from twin.validate.compare import ranking
    rows = pd.DataFrame({"policy": ["A", "B", "C"], "load": ["8", "8", "8"], "repeats": [4, 4, 4],
                         "real_output_tps": [101.0, 90.5, 96.0], "real_output_tps_min": [100.0, 90.0, 95.0],
                         "real_output_tps_max": [102.0, 91.0, 97.0], "sim_output_tps": [100.0, 99.0, 97.0]})
    r = ranking(rows).iloc[0]
    assert (r["separated_pairs"], r["same_separated"]) == (3, 2)
    assert r["sim_order"] == "A > B > C" and r["real_order"] == "A > C > B" and not r["same"]
    assert r["reversed_separated"] == "C > B (real +6.1%, sim -2.0%)"
    assert r["apart_by_chance"] == ""


def test_ranges_apart_with_two_runs_each_are_not_a_separation():
    """Two runs a policy: equal policies' ranges miss each other one time in three, so the
    same rows count no separated pair; they are listed with that chance instead. Three runs
    against five (chance 2/56) is enough."""
    from twin.validate.compare import chance_apart, ranking
    assert chance_apart(2, 2) == pytest.approx(1 / 3)
    assert chance_apart(4, 4) == pytest.approx(2 / 70)
    assert chance_apart(1, 1) == 1.0
    # the exact level: every order of 2 + 2 exchangeable runs, counted
    import itertools
    orders = set(itertools.permutations("aabb"))
    assert sum(o in {tuple("aabb"), tuple("bbaa")} for o in orders) / len(orders) == pytest.approx(chance_apart(2, 2))
    rows = pd.DataFrame({"policy": ["A", "B"], "load": ["8", "8"], "repeats": [2, 2],
                         "real_output_tps": [101.0, 90.5], "real_output_tps_min": [100.0, 90.0],
                         "real_output_tps_max": [102.0, 91.0], "sim_output_tps": [99.0, 100.0]})
    r = ranking(rows).iloc[0]
    assert (r["separated_pairs"], r["same_separated"], r["reversed_separated"]) == (0, 0, "")
    assert r["apart_by_chance"] == "A > B (real +11.6%, sim -1.0%, chance 0.33)"
    r = ranking(rows.assign(repeats=[3, 5])).iloc[0]
    assert (r["separated_pairs"], r["same_separated"]) == (1, 0) and r["apart_by_chance"] == ""


def test_goal_line_says_how_many_runs_a_separation_takes():
    from twin.validate.compare import ranking
    from twin.validate.report import goal_lines
    errors = pd.DataFrame({"policy": ["A", "B"], "load": ["8", "8"], "repeats": [2, 2],
                           "real_output_tps": [101.0, 90.5], "real_output_tps_min": [100.0, 90.0],
                           "real_output_tps_max": [102.0, 91.0], "sim_output_tps": [99.0, 100.0]})
    line = goal_lines(errors, ranking(errors), {})[1]
    assert line.startswith("- pairs of policies the hardware separates by throughput")
    assert "the simulator orders 0 of 0" in line
    assert "with 2 real runs per policy none can be: that takes 4 or more" in line
    lines = goal_lines(errors, ranking(errors), {})
    assert lines[0].endswith("MISSED (0/1 loads); the orders differ only in pairs the hardware does not separate")
    lines = goal_lines(errors.assign(repeats=4), ranking(errors.assign(repeats=4)), {})
    assert lines[0] == "- same throughput ranking as the hardware: MISSED (0/1 loads)"   # a separated pair reversed
    assert "the simulator orders 0 of 1 the same way" in lines[1] and "none can be" not in lines[1]


def test_ttft_ranking_puts_the_lower_first():
    """By TTFT P50 lower is better: B's runs (0.39-0.41 s) are clear of A's (0.50-0.53 s)
    with four runs each, and the simulator agrees; the gap is B's over A's (negative)."""
    from twin.validate.compare import rankings
    rows = pd.DataFrame({"policy": ["A", "B"], "load": ["8", "8"], "repeats": [4, 4],
                         "real_output_tps": [253.0, 252.0], "real_output_tps_min": [249.0, 246.0],
                         "real_output_tps_max": [259.0, 255.0], "sim_output_tps": [260.0, 260.5],
                         "real_ttft_p50": [0.52, 0.40], "real_ttft_p50_min": [0.50, 0.39],
                         "real_ttft_p50_max": [0.53, 0.41], "sim_ttft_p50": [0.505, 0.406]})
    r = rankings(rows).set_index("metric")
    assert r.loc["output_tps", "separated_pairs"] == 0 and r.loc["output_tps", "real_order"] == "A > B"
    assert r.loc["ttft_p50", "real_order"] == "B > A" and r.loc["ttft_p50", "sim_order"] == "B > A"
    assert (r.loc["ttft_p50", "separated_pairs"], r.loc["ttft_p50", "same_separated"]) == (1, 1)
    reversed_sim = rankings(rows.assign(sim_ttft_p50=[0.40, 0.45])).set_index("metric")
    assert reversed_sim.loc["ttft_p50", "reversed_separated"] == "B > A (real -23.1%, sim +12.5%)"
