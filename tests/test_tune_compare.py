"""benchmarks/tune_compare.py: finished tunes side by side, and each best setting at the
baseline's capacity (the goal's equal load)."""
from __future__ import annotations

import copy

import pytest
import yaml

pytest.importorskip("optuna")

from experiments.tune import run_tune  # noqa: E402
from experiments.tune_config import parse_tune  # noqa: E402
from tests.helpers import load_benchmark  # noqa: E402

SLO = {"ttft_p99": 2.0, "tpot_p99": 0.2}
TUNE = {"name": "tt", "policy": "token_throttling",
        "params": {"maxp": {"type": "int", "low": 128, "high": 4096, "log": True}},
        "base": {"profile": "qwen2.5-32b_a100-80gb_pp4",
                 "workload": {"num_requests": 120, "arrival": {"kind": "gamma", "rate": 2.0},
                              "prompt_len": {"kind": "lognormal", "mean": 300, "spread": 0.8, "max": 2048},
                              "output_len": {"kind": "lognormal", "mean": 30, "spread": 0.7, "max": 128}}},
        "targets": [{"name": "short"}, {"name": "long", "workload.output_len.mean": 60}],
        "objective": {"kind": "capacity"},
        "capacity": {"lo": 1, "hi": 33, "tol": 4, "slo": SLO},
        "trials": 2, "batch": 2, "startup_trials": 2, "seed": 1}


@pytest.fixture(scope="module")
def compare_module():
    return load_benchmark("tune_compare")


@pytest.fixture(scope="module")
def two_tunes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tunes")
    sarathi = copy.deepcopy(TUNE) | {"name": "sarathi", "policy": "sarathi",
                                     "params": {"budget": {"type": "int", "low": 128, "high": 4096, "log": True}}}
    for d in (TUNE, sarathi):
        run_tune(parse_tune(copy.deepcopy(d)), tmp / d["name"], progress=False, plots=False, log=lambda s: None)
    (tmp / "tt.yaml").write_text(yaml.safe_dump(TUNE))
    return tmp


def rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def test_compare_lists_each_policy_against_the_baseline(compare_module, two_tunes):
    table = rows(compare_module.compare([two_tunes / "tt", two_tunes / "sarathi"]))
    assert [r[0] for r in table] == ["token_throttling (tt)", "sarathi (sarathi)"]
    assert table[0][4] == "+0.0%"        # the baseline against itself


def test_equal_load_runs_every_best_setting_at_the_baselines_capacity(compare_module, two_tunes):
    import pandas as pd
    base = compare_module.best_row(pd.read_csv(two_tunes / "tt" / "trials.csv"))
    table = rows(compare_module.equal_load([two_tunes / "tt", two_tunes / "sarathi"], two_tunes / "tt.yaml", 1))
    assert [(r[0], r[2]) for r in table] == [("short", "token_throttling (tt)"), ("short", "sarathi (sarathi)"),
                                           ("long", "token_throttling (tt)"), ("long", "sarathi (sarathi)")]
    for r in table:
        assert float(r[1]) == pytest.approx(base[f"{r[0]}.capacity"], rel=1e-3)
    # At its own capacity the baseline's best setting passed the capacity search's SLO probe:
    # the same simulation here must meet it too (a wrong load or setting would show).
    for r in table[::2]:
        assert float(r[3]) <= SLO["ttft_p99"] and float(r[5]) <= SLO["tpot_p99"] * 1000
    # Sarathi's own capacity is below that load, where its search saw the SLO fail: so must this.
    sarathi = compare_module.best_row(pd.read_csv(two_tunes / "sarathi" / "trials.csv"))
    for r in table[1::2]:
        assert sarathi[f"{r[0]}.capacity"] < base[f"{r[0]}.capacity"]
        assert float(r[3]) > SLO["ttft_p99"] or float(r[5]) > SLO["tpot_p99"] * 1000


def test_equal_load_needs_a_capacity_tune(compare_module, two_tunes, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(copy.deepcopy(TUNE) | {"objective": {"kind": "throughput", "rate": 2.0},
                                                          "capacity": None}))
    with pytest.raises(SystemExit, match="no capacity section"):
        compare_module.equal_load([two_tunes / "tt"], bad, 1)


def test_equal_load_names_a_missing_tune_config(compare_module, two_tunes, tmp_path):
    with pytest.raises(SystemExit, match="--equal-load: .*no such tune config"):
        compare_module.equal_load([two_tunes / "tt"], tmp_path / "nope.yaml", 1)


def test_at_capacity_runs_each_best_setting_at_its_own_capacity_where_it_meets_the_slo(compare_module, two_tunes):
    import pandas as pd
    table = rows(compare_module.equal_load([two_tunes / "tt", two_tunes / "sarathi"], two_tunes / "tt.yaml", 1,
                                           own_capacity=True))
    for r, folder in zip(table, ["tt", "sarathi"] * 2):
        own = compare_module.best_row(pd.read_csv(two_tunes / folder / "trials.csv"))
        assert float(r[1]) == pytest.approx(own[f"{r[0]}.capacity"], rel=1e-3)
        # the capacity search's last passing probe ran this very simulation
        assert float(r[3]) <= SLO["ttft_p99"] and float(r[5]) <= SLO["tpot_p99"] * 1000


def test_at_capacity_without_equal_load_is_a_flag_error(compare_module, two_tunes, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["tune_compare.py", str(two_tunes / "tt"), "--at-capacity"])
    with pytest.raises(SystemExit):
        compare_module.main()
    assert "--at-capacity needs --equal-load" in capsys.readouterr().err
