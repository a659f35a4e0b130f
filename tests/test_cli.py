"""`pipetwin` CLI: sim results folder, flag/YAML merging, exit 2 with a named flag or field."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli.main import COMMANDS, main

SMALL = ["--num-requests", "30", "--rate", "4"]
SIM_FILES = {"batches.csv", "requests.csv", "samples.csv", "meta.json", "summary.json", "config.yaml"}


def run_exit(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


def test_sim_writes_results_folder(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["sim", *SMALL, "--policy", "sarathi", "--param", "budget=1024", "--out", str(out),
                 "--formats", "csv", "--tokens", "--perfetto"]) == 0
    printed = capsys.readouterr().out
    assert "throughput" in printed and "bubble" in printed and "latency fit" in printed
    assert {p.name for p in out.iterdir()} == SIM_FILES | {"tokens.csv", "perfetto.json"}
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["policy"] == "sarathi" and cfg["policy_params"] == {"budget": 1024}   # int, via YAML
    assert cfg["workload"]["num_requests"] == 30 and cfg["workload"]["arrival"]["rate"] == 4.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == 30 and 0 <= summary["bubble_ratio"] <= 1
    perfetto = json.loads((out / "perfetto.json").read_text())
    assert any(e.get("ph") == "X" for e in perfetto["traceEvents"])


def test_sim_yaml_then_flags(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"policy": "sarathi", "seed": 3, "page_size": 32,
                                   "workload": {"num_requests": 20, "arrival": {"kind": "gamma", "rate": 2.0},
                                                "prompt_len": {"kind": "fixed", "value": 100},
                                                "output_len": {"kind": "fixed", "value": 10}}}))
    out = tmp_path / "o"
    assert main(["sim", str(cfg), "--policy", "vllm", "--param", "max_num_seqs=8", "--burstiness", "0.5",
                 "--num-pages", "500", "--formats", "csv,parquet", "--out", str(out)]) == 0
    res = yaml.safe_load((out / "config.yaml").read_text())
    assert res["policy"] == "vllm" and res["seed"] == 3 and res["page_size"] == 32 and res["num_pages"] == 500
    assert res["workload"]["arrival"] == {"kind": "gamma", "rate": 2.0, "burstiness": 0.5}
    assert (out / "requests.parquet").is_file()


def test_sim_trace_replay(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                     + "".join(f"{i * 0.3},{200 + 10 * i},{5 + i}\n" for i in range(12)))
    out = tmp_path / "o"
    assert main(["sim", "--trace", str(trace), "--num-requests", "10", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == 10 and summary["finished"] == 10


@pytest.mark.parametrize("argv, words", [
    (["sim", "--param", "budgett=5", "--policy", "sarathi"], ["budgett", "did you mean 'budget'"]),
    (["sim", "--policy", "sarathy"], ["sarathy", "sarathi"]),
    (["sim", "--memory-fraction", "1.5"], ["memory_fraction", "(0, 1]"]),
    (["sim", "--param", "budget=0", "--policy", "sarathi"], ["budget", ">= 1"]),
    (["sim", "--rate", "fast"], ["--rate", "inf"]),
    (["sim", "--rate", "-2"], ["rate", "> 0"]),
    (["sim", "--rate=-inf"], ["--rate must be a number > 0 or inf", "-inf"]),
    (["sim", "--profile", "no_such_table"], ["no_such_table", "shipped"]),
    (["sim", "--pp", "2"], ["pp", "pp=4"]),
    (["sim", "--trace", "missing.csv"], ["--trace", "missing.csv"]),
    (["sim", "--formats", "xml"], ["--formats", "csv,parquet"]),
    (["sim", "--perfetto-window", "5"], ["--perfetto-window", "START:END"]),
    (["sim", "--perfetto-window", "3:1"], ["--perfetto-window", "START < END"]),
    (["sweep", "x.yaml", "--executor", "dask"], ["--executor", "local", "ray"]),
    (["tune", "no_such.yaml"], ["no_such.yaml"]),
    (["tune", "x.yaml", "--trials", "0"], ["--trials", ">= 1"]),
    (["sim", "--param", "budget"], ["--param", "key=value"]),
    (["sim", "--rat", "3"], ["--rat"]),
    (["sim", "--num-pages", "10", "--memory-fraction", "0.5"], ["--memory-fraction", "--num-pages"]),
    (["sim", "--num-requests", "0"], ["num_requests", ">= 1"]),
    (["sweep", "no_such.yaml"], ["no_such.yaml"]),
    (["sweep", "x.yaml", "--workers", "0"], ["--workers"]),
    (["plot", "no_such_dir"], ["no_such_dir"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_bad_flags_exit_2_naming_them(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_exit(argv, capsys)
    assert code == 2
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def test_sim_yaml_unknown_key_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("polcy: sarathi\n")
    code, err = run_exit(["sim", str(cfg)], capsys)
    assert code == 2 and "polcy" in err and "did you mean 'policy'" in err


def _sweep_yaml(tmp_path: Path, **over) -> Path:
    d = {"name": "tiny",
         "base": {"workload": {"num_requests": 30, "arrival": {"kind": "gamma", "rate": 2.0},
                               "prompt_len": {"kind": "fixed", "value": 300},
                               "output_len": {"kind": "fixed", "value": 20}}},
         "grid": {"workload.arrival.rate": [2, 5]},
         "policies": [{"name": "token_throttling"}, {"name": "sarathi"}],
         "capacity": {"lo": 1, "hi": 9, "tol": 4, "slo": {"ttft_p99": 10, "tpot_p99": 1}},
         "report": {"plots": ["bubble"]}}
    d.update(over)
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_sweep_dry_run_plot_and_default_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _sweep_yaml(tmp_path)
    assert main(["sweep", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs" in out and "#0: token_throttling, workload.arrival.rate=2" in out and "policy:" in out
    assert not (tmp_path / "results").exists()

    assert main(["sweep", str(cfg), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "results" / "tiny"
    assert "report:" in out and str(Path("results") / "tiny" / "report.md") in out
    assert {"results.csv", "capacity.csv", "report.md", "sweep.yaml"} <= {p.name for p in folder.iterdir()}
    (folder / "plots" / "bubble_vs_rate.png").unlink()
    assert main(["plot", str(folder), "--out", str(tmp_path / "replot")]) == 0
    assert (tmp_path / "replot" / "bubble_vs_rate.png").is_file()
    assert (tmp_path / "replot" / "bubble_vs_rate.svg").is_file()


def test_sweep_bad_config_exit_2(tmp_path, capsys):
    cfg = _sweep_yaml(tmp_path, grid={"workload.arival.rate": [1]})
    code, err = run_exit(["sweep", str(cfg), "--dry-run"], capsys)
    assert code == 2 and "workload.arival.rate" in err and "did you mean 'workload.arrival.rate'" in err
    cfg = _sweep_yaml(tmp_path, grid={"workload.arrival.rate": [1, 2, 1.0]})
    code, err = run_exit(["sweep", str(cfg), "--dry-run"], capsys)
    assert code == 2 and "grid.workload.arrival.rate lists 1.0 more than once" in err


def test_profiles_lists_tables(capsys, monkeypatch):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-32b_a100-80gb_pp4" in out and "KV pages" in out
    import profiles
    monkeypatch.setattr(profiles, "list_tables", lambda: ["llama-3-8b_h100-80gb_pp2"])
    assert main(["profiles", "--fit"]) == 0
    out = capsys.readouterr().out
    assert "fit MAPE" in out and "llama-3-8b_h100-80gb_pp2" in out and "%" in out


def test_subcommand_table_and_console_script():
    assert {"sim", "sweep", "tune", "plot", "profiles"} <= set(COMMANDS)
    exe = Path(sys.executable).with_name("pipetwin")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "cli"]
    r = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "sweep" in r.stdout and "profiles" in r.stdout
