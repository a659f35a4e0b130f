"""Sweeps and tunes on Ray give the same tables as on the local process pool; a missing
Ray or a bad executor choice is one clear error."""
from __future__ import annotations

import copy
import sys

import pandas as pd
import pytest

from experiments.config import parse_experiment
from experiments.executors import ExecutorError, LocalPool, make_executor
from experiments.runner import run_sweep

PROFILE = "qwen2.5-32b_a100-80gb_pp4"
WORKLOAD = {"num_requests": 30, "arrival": {"kind": "gamma", "rate": 2.0},
            "prompt_len": {"kind": "lognormal", "mean": 600, "spread": 0.8, "max": 4096},
            "output_len": {"kind": "lognormal", "mean": 30, "spread": 0.7, "max": 128}}
SWEEP = {"base": {"profile": PROFILE, "workload": WORKLOAD}, "grid": {"workload.arrival.rate": [2, 6]},
         "policies": [{"name": "token_throttling", "label": "TT", "grid": {"iterp": [2, 8]}},
                      {"name": "sarathi", "label": "Sarathi", "params": {"budget": 512}}],
         "capacity": {"lo": 1, "hi": 17, "tol": 4, "slo": {"ttft_p99": 2.0}}, "report": {"plots": []}}


def test_executor_choice_errors():
    with pytest.raises(ExecutorError, match="--executor must be one of local, ray"):
        make_executor("dask", 2)
    with pytest.raises(ExecutorError, match="--address is for --executor ray"):
        make_executor("local", 2, "auto")
    assert isinstance(make_executor("local", 3), LocalPool) and make_executor("local", 3).workers == 3


def test_missing_ray_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ExecutorError, match=r"^--executor ray needs Ray: pip install 'pipetwin\[ray\]'$"):
        make_executor("ray", 2)


def _tables(out):
    return (pd.read_csv(out / "results.csv").drop(columns=["wall_s"]),
            pd.read_csv(out / "capacity.csv"),
            pd.read_csv(out / "capacity_runs.csv").drop(columns=["wall_s"], errors="ignore"))


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray (2 CPUs) for the module: the pools use it and leave it running."""
    ray = pytest.importorskip("ray")
    from experiments.executors import _repo_root
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": _repo_root()}})
    yield ray
    ray.shutdown()


def test_sweep_and_tune_on_ray_match_the_local_pool(tmp_path, ray_local):
    exp = parse_experiment(copy.deepcopy(SWEEP))
    run_sweep(exp, tmp_path / "local", workers=2, progress=False, report=False, log=lambda s: None)
    ray_pool = make_executor("ray", 2)
    res = run_sweep(exp, tmp_path / "ray", progress=False, report=False, log=lambda s: None, executor=ray_pool)
    assert res.computed == len(list((tmp_path / "ray" / "cache").glob("*.json"))) > 8
    for a, b in zip(_tables(tmp_path / "local"), _tables(tmp_path / "ray")):
        pd.testing.assert_frame_equal(a, b)

    pytest.importorskip("optuna")
    from experiments.tune import run_tune
    from tests.test_tune import small
    from experiments.tune_config import parse_tune
    spec = small(trials=3)
    local = run_tune(parse_tune(spec), tmp_path / "tl", workers=2, progress=False, plots=False)
    on_ray = run_tune(parse_tune(spec), tmp_path / "tr", executor=make_executor("ray", 2),
                      progress=False, plots=False)
    pd.testing.assert_frame_equal(local.trials, on_ray.trials)
