"""`pipetwin tune`: config checks, seeded and resumable studies, constraints, objectives,
the best setting as a config the other commands take."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

pytest.importorskip("optuna")

from experiments.config import ConfigError  # noqa: E402
from experiments.tune import run_tune  # noqa: E402
from experiments.tune_config import parse_tune  # noqa: E402

PROFILE = "qwen2.5-32b_a100-80gb_pp4"
WORKLOAD = {"num_requests": 30, "arrival": {"kind": "gamma", "rate": 2.0},
            "prompt_len": {"kind": "lognormal", "mean": 600, "spread": 0.8, "max": 4096},
            "output_len": {"kind": "lognormal", "mean": 30, "spread": 0.7, "max": 128}}


def small(**over) -> dict:
    d = {"name": "t", "policy": "token_throttling",
         "params": {"maxp": {"type": "int", "low": 128, "high": 4096, "log": True},
                    "minp": {"type": "int", "low": 0, "high": 1024, "step": 64},
                    "kvthresh": {"type": "float", "low": 0.0, "high": 0.3}},
         "constraints": ["minp <= maxp"],
         "base": {"profile": PROFILE, "workload": copy.deepcopy(WORKLOAD)},
         "objective": {"kind": "capacity"},
         "capacity": {"lo": 1, "hi": 17, "tol": 4, "slo": {"ttft_p99": 2.0, "tpot_p99": 0.2}},
         "trials": 6, "batch": 3, "startup_trials": 3, "seed": 1}
    d.update(over)
    return d


def tune(tmp_path: Path, d: dict, name: str = "out", **kw):
    return run_tune(parse_tune(d), tmp_path / name, progress=False, plots=False, log=lambda s: None, **kw)


def table(res) -> pd.DataFrame:
    return res.trials.reset_index(drop=True)


# ---------------------------------------------------------------- config errors

@pytest.mark.parametrize("mutate, named", [
    (lambda d: d["params"].update(maxq={"type": "int", "low": 1, "high": 2}), ["maxq", "maxp"]),
    (lambda d: d["params"]["maxp"].update(type="integer"), ["params.maxp.type", "int, float, categorical"]),
    (lambda d: d["params"]["maxp"].update(low=0), ["params.maxp.low", "log"]),
    (lambda d: d["params"]["kvthresh"].update(high=-1), ["params.kvthresh.high", "> low"]),
    (lambda d: d["params"]["minp"].update(stpe=2), ["stpe", "step"]),
    (lambda d: d.update(constraints=["minq <= maxp"]), ["constraints[0]", "minq", "minp"]),
    (lambda d: d.update(constraints=["minp =< maxp"]), ["constraints[0]", "<="]),
    (lambda d: d.update(objective={"kind": "capacit"}), ["objective.kind", "capacity"]),
    (lambda d: d.update(objective={"kind": "goodput", "rate": 2}, capacity=None), ["goodput", "base.slo"]),
    (lambda d: d.update(objective={"kind": "throughput"}, capacity=None), ["objective.rate"]),
    (lambda d: d.update(objective={"kind": "mix", "weights": {"capacity": 1, "latency": 1}}), ["latency", "objective.weights"]),
    (lambda d: d.update(objective={"kind": "capacity", "aggregate": "best"}), ["objective.aggregate", "worst"]),
    (lambda d: d.update(targets=[{"name": "a", "workload.arival.rate": 2}]), ["targets[0]", "arrival"]),
    (lambda d: d.update(fixed={"maxp": 512}), ["params.maxp", "fixed"]),
    (lambda d: d.update(batch=0), ["batch", ">= 1"]),
    (lambda d: d.update(trails=5), ["trails", "trials"]),
    (lambda d: d.update(first_trials=[{"maxq": 512}]), ["first_trials[0]", "maxq", "maxp"]),
    (lambda d: d.update(first_trials=[{"maxp": 100000}]), ["first_trials[0].maxp", "[128, 4096]"]),
    (lambda d: d.update(first_trials=[{"maxp": 512.5}]), ["first_trials[0].maxp", "an int"]),
    (lambda d: d.update(first_trials={"maxp": 512}), ["first_trials", "list"]),
])
def test_config_errors_name_the_field(mutate, named):
    d = small()
    mutate(d)
    with pytest.raises(ConfigError) as e:
        parse_tune(d)
    for word in named:
        assert word in str(e.value), str(e.value)


def test_missing_optuna_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ConfigError, match=r"pip install 'pipetwin\[tune\]'"):
        tune(tmp_path, small())


# ---------------------------------------------------------------- studies

def test_same_file_and_seed_same_trials_whatever_the_workers(tmp_path):
    a = tune(tmp_path, small(), "a", workers=1)
    b = tune(tmp_path, small(), "b", workers=2)
    pd.testing.assert_frame_equal(table(a), table(b))
    assert len(a.trials) == 6 and a.trials["state"].eq("COMPLETE").all()
    assert a.best_value == a.trials.loc[a.trials["feasible"], "objective"].max() > 0
    c = tune(tmp_path, small(seed=2), "c", workers=2)
    assert not table(c)["params.maxp"].equals(table(a)["params.maxp"])


def test_resumed_study_continues_with_the_trials_it_would_have_run(tmp_path):
    full = tune(tmp_path, small(), "full")
    first = tune(tmp_path, small(), "resumed", trials=3)
    assert len(first.trials) == 3
    again = tune(tmp_path, small(), "resumed")
    assert len(again.trials) == 6
    pd.testing.assert_frame_equal(table(again), table(full))
    assert (tmp_path / "resumed" / "study.db").is_file()
    # a different config in the same folder is refused rather than mixed in
    other = small()
    other["params"]["maxp"]["high"] = 2048
    with pytest.raises(ConfigError, match="different config"):
        tune(tmp_path, other, "resumed")


def test_first_trials_run_first_in_order_and_once(tmp_path):
    """A grid's best point or the defaults as the first trials; left-out params are drawn;
    a resumed study does not add them again."""
    first = [{"maxp": 2048, "minp": 64, "kvthresh": 0.05}, {"maxp": 512}]
    res = tune(tmp_path, small(first_trials=first), trials=3)
    t = table(res)
    assert t.loc[0, ["params.maxp", "params.minp", "params.kvthresh"]].tolist() == [2048, 64, 0.05]
    assert t.loc[1, "params.maxp"] == 512
    again = tune(tmp_path, small(first_trials=first))
    assert len(again.trials) == 6 and (table(again)["params.maxp"] == 512).sum() == 1
    # and the queue is part of what the study is: without it the first trial is drawn
    assert table(tune(tmp_path, small(), "plain", trials=1)).loc[0, "params.maxp"] != 2048


def test_constraint_breakers_are_not_simulated(tmp_path):
    d = small(params={"maxp": {"type": "int", "low": 64, "high": 256},
                      "minp": {"type": "int", "low": 0, "high": 512}}, trials=6)
    res = tune(tmp_path, d)
    bad = res.trials[~res.trials["feasible"]]
    assert len(bad) >= 1
    assert (bad["params.minp"] > bad["params.maxp"]).all()
    assert bad["infeasible"].eq("minp <= maxp").all() and bad["base.capacity"].isna().all()
    ok = res.trials[res.trials["feasible"]]
    assert (ok["params.minp"] <= ok["params.maxp"]).all() and ok["base.capacity"].notna().all()


def test_mix_objective_worst_over_two_targets(tmp_path):
    d = small(objective={"kind": "mix", "weights": {"capacity": 1.0, "throughput": 0.5}, "rate": 3.0,
                         "aggregate": "worst"},
              targets=[{"name": "light"}, {"name": "long", "workload.output_len.mean": 60}],
              trials=3, constraints=None)
    res = tune(tmp_path, d)
    t = res.trials
    for target in ("light", "long"):
        expect = t[f"{target}.capacity"] + 0.5 * t[f"{target}.throughput"]
        pd.testing.assert_series_equal(t[f"{target}.objective"], expect, check_names=False)
    pd.testing.assert_series_equal(t["objective"], t[["light.objective", "long.objective"]].min(axis=1),
                                   check_names=False)


def test_geomean_objective_weighs_each_target_by_its_relative_value(tmp_path):
    d = small(objective={"kind": "mix", "weights": {"capacity": 1.0, "throughput": 0.5}, "rate": 3.0,
                         "aggregate": "geomean"},
              targets=[{"name": "light"}, {"name": "long", "workload.output_len.mean": 60}],
              trials=3, constraints=None)
    t = tune(tmp_path, d).trials
    assert (t["light.objective"] != t["long.objective"]).all()
    expect = np.sqrt(t["light.objective"] * t["long.objective"])
    pd.testing.assert_series_equal(t["objective"], expect, check_names=False)


def test_aggregates_at_the_edges():
    from experiments.tune import aggregate

    assert aggregate("geomean", [2.0, 8.0]) == pytest.approx(4.0)
    assert aggregate("geomean", [0.0, 8.0]) == 0.0     # a target that fails every probe
    assert (aggregate("mean", [2.0, 8.0]), aggregate("worst", [2.0, 8.0])) == (5.0, 2.0)


def test_best_yaml_runs_as_a_sim_config_and_the_outputs(tmp_path):
    from cli.main import main

    res = run_tune(parse_tune(small(trials=3)), tmp_path / "out", progress=False, log=lambda s: None)
    best = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    assert best == {"policy": "token_throttling", "policy_params": res.best_params}
    assert main(["sim", str(tmp_path / "out" / "best.yaml"), "--num-requests", "10",
                 "--out", str(tmp_path / "sim")]) == 0
    assert yaml.safe_load((tmp_path / "sim" / "config.yaml").read_text())["policy_params"] == res.best_params
    names = {p.name for p in (tmp_path / "out").iterdir()} | {p.name for p in (tmp_path / "out" / "plots").iterdir()}
    assert {"trials.csv", "tune_report.md", "study.db", "history.png", "importance.png", "top2.png"} <= names


def test_best_yaml_keeps_categorical_choices_as_chosen(tmp_path):
    """A categorical of null and ints (time_balanced's max_chunk) comes back as the very
    choice, not as the trials table's float64 (NaN, 256.0), which the policy rejects."""
    from cli.main import main

    d = small(policy="time_balanced", trials=6,
              params={"maxp": {"type": "int", "low": 256, "high": 2048, "log": True},
                      "max_chunk": {"type": "categorical", "choices": [None, 64, 256]}},
              constraints=[])
    res = tune(tmp_path, d)
    assert table(res)["params.max_chunk"].dtype == float   # the table's view: floats and NaN
    chosen = res.best_params["max_chunk"]
    assert chosen is None or type(chosen) is int
    best = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    assert best["policy_params"]["max_chunk"] == chosen and type(best["policy_params"]["max_chunk"]) is type(chosen)
    assert main(["sim", str(tmp_path / "out" / "best.yaml"), "--num-requests", "10",
                 "--out", str(tmp_path / "sim")]) == 0


def test_tune_command_prints_the_best_and_resumes(tmp_path, capsys):
    from cli.main import main

    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump(small(trials=3)))
    out = tmp_path / "out"
    assert main(["tune", str(cfg), "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    best = yaml.safe_load((out / "best.yaml").read_text())["policy_params"]
    assert "best: trial" in printed and f"maxp={best['maxp']}" in printed and str(out / "best.yaml") in printed
    assert main(["tune", str(cfg), "--out", str(out), "--workers", "1", "--trials", "6"]) == 0
    assert "6 trials, " in capsys.readouterr().out
    assert len(pd.read_csv(out / "trials.csv")) == 6


def test_tune_command_errors_name_the_field_or_extra(tmp_path, capsys, monkeypatch):
    from cli.main import main

    cfg = tmp_path / "t.yaml"
    bad = small()
    bad["params"]["maxp"]["log"] = "yes"
    cfg.write_text(yaml.safe_dump(bad))
    with pytest.raises(SystemExit) as e:
        main(["tune", str(cfg)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "params.maxp.log" in err and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(SystemExit) as e:
        main(["tune", str(cfg)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.endswith("pip install 'pipetwin[tune]'") and len(err.splitlines()) == 1


def test_best_yaml_as_validate_policy_and_serve_policy_file(tmp_path, monkeypatch):
    from cli.main import build_parser
    from cli.serve import apply_policy_file
    from twin.validate.config import load_validation

    best = tmp_path / "tune_tt" / "best.yaml"
    best.parent.mkdir()
    best.write_text("# comment\npolicy: token_throttling\npolicy_params: {maxp: 313, minp: 37, kvthresh: 0.25}\n")
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "experiments" / "twin_cpu.yaml").read_text())
    cfg["policies"] = [str(best), {"name": "token_throttling", "label": "defaults"}]
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(cfg))
    v = load_validation(tmp_path / "v.yaml")
    assert v.policies[0] == {"name": "token_throttling", "label": "tune_tt",
                             "params": {"maxp": 313, "minp": 37, "kvthresh": 0.25}}
    args = build_parser().parse_args(["serve", "--model", "dummy:llama-32m", "--policy-file", str(best),
                                      "--param", "minp=16"])
    apply_policy_file(args)
    assert args.policy == "token_throttling" and dict(args.param) == {"maxp": 313, "minp": 16, "kvthresh": 0.25}
    args = build_parser().parse_args(["serve", "--model", "dummy:llama-32m", "--policy-file", str(tmp_path / "no.yaml")])
    with pytest.raises(ConfigError, match="--policy-file: no such file"):
        apply_policy_file(args)


@pytest.mark.parametrize("name", ["tune_tt.yaml", "tune_tt_cpu.yaml"])
def test_shipped_tune_configs_load(name):
    from experiments.tune_config import load_tune
    spec = load_tune(Path(__file__).resolve().parents[1] / "experiments" / name)
    assert spec.policy == "token_throttling" and spec.trials >= 20 and spec.params


@pytest.mark.parametrize("name,policy", [("tt", "token_throttling"), ("tb", "time_balanced"),
                                         ("sarathi", "sarathi"), ("vllm", "vllm")])
def test_issue17_tune_configs_load_with_equal_budgets(name, policy, monkeypatch):
    """experiments/tune_code: one config per policy, the same budget, seed and targets."""
    from experiments.tune_config import load_tune
    repo = Path(__file__).resolve().parents[1]
    if not (repo.parent / "shared/data/traces/azure_code_2023.csv").is_file():
        pytest.skip("the Azure code trace is not at ../shared (the configs read it from there)")
    monkeypatch.chdir(repo)
    spec = load_tune(Path("experiments/tune_code") / f"{name}.yaml")
    assert spec.policy == policy and (spec.trials, spec.seed, spec.batch) == (16, 0, 4)
    assert [t.name for t in spec.targets] == ["a100_pp4", "a100_pp8", "h100_pp4", "h100_pp8"]
    # two start points each (its grid's best), every tuned param set
    assert len(spec.first_trials) == 2 and all(set(f) == {p.name for p in spec.params} for f in spec.first_trials)


@pytest.mark.parametrize("folder,trace", [("tune_conv", "azure_conv_2023.csv"), ("tune_code_full", "azure_code_2023.csv")])
@pytest.mark.parametrize("name,policy", [("tt", "token_throttling"), ("tb_late", "time_balanced"),
                                         ("sarathi", "sarathi"), ("vllm", "vllm")])
def test_issue17_whole_trace_tune_configs_share_a_budget(folder, trace, name, policy, monkeypatch):
    """experiments/tune_conv and tune_code_full: the same budget, seed, targets, objective and
    capacity search within a folder, on the trace the folder is named for."""
    spec, = _issue17_tunes(monkeypatch, trace, f"{folder}/{name}.yaml")
    assert spec.policy == policy and (spec.trials, spec.seed, spec.batch, spec.startup_trials) == (12, 0, 4, 4)
    assert spec.name == f"{folder}_{name}" and spec.raw["base"]["workload"]["trace"].endswith(trace)
    assert [t.name for t in spec.targets] == ["a100_pp4", "a100_pp8", "h100_pp4", "h100_pp8"]
    assert spec.objective.aggregate == "geomean" and (spec.capacity.rel_tol, spec.capacity.tol) == (0.02, 0.0)
    assert len(spec.first_trials) == 2 and all(set(f) == {p.name for p in spec.params} for f in spec.first_trials)


def _issue17_tunes(monkeypatch, trace: str, *paths: str) -> list:
    """Load tune configs under experiments/ from the repository root; skip where the Azure
    trace they read is not at ../shared."""
    from experiments.tune_config import load_tune
    repo = Path(__file__).resolve().parents[1]
    if not (repo.parent / "shared/data/traces" / trace).is_file():
        pytest.skip(f"the Azure trace {trace} is not at ../shared (the configs read it from there)")
    monkeypatch.chdir(repo)
    return [load_tune(Path("experiments") / path) for path in paths]


def test_issue17_queue_only_ablation_shares_the_conversation_budget(monkeypatch):
    """experiments/tune_conv/tt_queue.yaml: Token Throttling's own plan (fill 0, no cap) with
    the order and late queue, on the same budget and search as time_balanced's tune."""
    ablation, full = _issue17_tunes(monkeypatch, "azure_conv_2023.csv", "tune_conv/tt_queue.yaml", "tune_conv/tb_late.yaml")
    assert ablation.fixed == {"fill": 0.0, "max_chunk": None}
    assert {p.name for p in ablation.params} == {p.name for p in full.params} - {"max_chunk"}
    for field in ("policy", "trials", "seed", "batch", "startup_trials", "objective", "capacity"):
        assert getattr(ablation, field) == getattr(full, field), field
    assert [t.name for t in ablation.targets] == [t.name for t in full.targets]


@pytest.mark.parametrize("folder,trace", [("tune_conv", "azure_conv_2023.csv"), ("tune_code_full", "azure_code_2023.csv")])
def test_issue17_seconds_budget_tune_shares_its_folders_budget(folder, trace, monkeypatch):
    """experiments/<folder>/tb_cycle.yaml: tb_late's search with maxp in seconds (maxp fixed
    as a ceiling), on the same budget; its first trials are tb_late's grid points restated in
    seconds, which on A100 pp4 come to the grid's 1,024 (and on conversation ~2,048) tokens."""
    from core.policies import make_policy
    from profiles.latency_model import SlowestStage
    seconds, tokens = _issue17_tunes(monkeypatch, trace, f"{folder}/tb_cycle.yaml", f"{folder}/tb_late.yaml")
    assert seconds.name == f"{folder}_tb_cycle" and seconds.raw["base"]["workload"]["trace"].endswith(trace)
    assert seconds.fixed == {"maxp": 16384}
    assert {p.name for p in seconds.params} == {p.name for p in tokens.params} - {"maxp"} | {"maxp_cycle_time"}
    for field in ("policy", "trials", "seed", "batch", "startup_trials", "objective", "capacity"):
        assert getattr(seconds, field) == getattr(tokens, field), field
    assert [t.name for t in seconds.targets] == [t.name for t in tokens.targets]
    a100_pp4 = SlowestStage.of_profile("qwen2.5-14b_a100-80gb_pp4")
    for restated, grid in zip(seconds.first_trials, tokens.first_trials):
        assert {k: v for k, v in restated.items() if k != "maxp_cycle_time"} == \
            {k: v for k, v in grid.items() if k != "maxp"}
        policy = make_policy("time_balanced", {**seconds.fixed, **restated})
        assert policy.effective_maxp(a100_pp4, 4) == pytest.approx(grid["maxp"], rel=0.01)


def test_issue17_bounded_seconds_budget_tune_differs_only_by_the_worst_ttft_bound(monkeypatch):
    """experiments/tune_conv/tb_cycle_bounded.yaml is tb_cycle.yaml with ttft_max: 30 in its SLO."""
    bounded, free = _issue17_tunes(monkeypatch, "azure_conv_2023.csv", "tune_conv/tb_cycle_bounded.yaml",
                                   "tune_conv/tb_cycle.yaml")
    assert bounded.capacity.slo == {**free.capacity.slo, "ttft_max": 30.0}
    for field in ("policy", "fixed", "params", "first_trials", "trials", "seed", "batch", "startup_trials",
                  "objective"):
        assert getattr(bounded, field) == getattr(free, field), field
    assert [t.config for t in bounded.targets] == [t.config for t in free.targets]
