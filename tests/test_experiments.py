"""experiments/: config validation and expansion, cache, capacity search, plots, report."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from experiments.capacity import find_capacity, meets_slo, slo_failures
from experiments.config import ConfigError, expand, load_experiment, parse_experiment
from experiments.runner import Runner, Task, run_hash, run_sweep

REPO = Path(__file__).resolve().parent.parent

SMALL_WORKLOAD = {"num_requests": 40, "arrival": {"kind": "gamma", "rate": 2.0},
                  "prompt_len": {"kind": "lognormal", "mean": 600, "spread": 0.8, "max": 4096},
                  "output_len": {"kind": "lognormal", "mean": 40, "spread": 0.7, "max": 256}}


def small(**over) -> dict:
    d = {"base": {"profile": "qwen2.5-32b_a100-80gb_pp4", "workload": copy.deepcopy(SMALL_WORKLOAD)},
         "grid": {"workload.arrival.rate": [2, 6]},
         "policies": [{"name": "token_throttling", "label": "TT"},
                      {"name": "sarathi", "label": "Sarathi", "params": {"budget": 2048}}],
         "report": {"plots": []}}
    d.update(over)
    return d


def write(tmp_path: Path, d: dict, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def error_of(d: dict) -> str:
    with pytest.raises(ConfigError) as e:
        expand(parse_experiment(d))
    return str(e.value)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("mutate, named, suggested", [
    (lambda d: d.update(polices=d.pop("policies")), "polices", "policies"),
    (lambda d: d["base"].update(profil="x"), "profil", "profile"),
    (lambda d: d["base"]["workload"].update(arival=d["base"]["workload"].pop("arrival")), "arival", "arrival"),
    (lambda d: d["base"]["workload"]["arrival"].update(burstines=1.0), "burstines", "burstiness"),
    (lambda d: d["grid"].update({"workload.arrival.rat": [1]}), "workload.arrival.rat", "workload.arrival.rate"),
    (lambda d: d["grid"].update({"num_page": [100]}), "num_page", "num_pages"),
    (lambda d: d.update(zip=[{"sed": [0, 1]}]), "sed", "seed"),
    (lambda d: d["policies"][0].update(parms={}), "parms", "params"),
    (lambda d: d["policies"][1]["params"].update(budgett=1), "budgett", "budget"),
    (lambda d: d["policies"][0].update(grid={"iterpp": [4]}), "iterpp", "iterp"),
    (lambda d: d["policies"][1].update(name="sarathy"), "sarathy", "sarathi"),
    (lambda d: d.update(capacity={"slos": {}}), "slos", "slo"),
    (lambda d: d.update(capacity={"slo": {"ttft_p95": 1.0}}), "ttft_p95", "ttft_p99"),
    (lambda d: d.update(report={"plot": []}), "plot", "plots"),
    (lambda d: d.update(report={"plots": ["bubbles"]}), "bubbles", "bubble"),
    (lambda d: d.update(report={"timeline": {"duraton": 1}}), "duraton", "duration"),
])
def test_unknown_keys_are_named_with_a_suggestion(mutate, named, suggested):
    d = small()
    mutate(d)
    msg = error_of(d)
    assert repr(named) in msg or named in msg
    assert f"did you mean {suggested!r}" in msg


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d["grid"].update({"workload.arrival.rate": [2, -1]}), ["run 1", "arrival.rate", "> 0"]),
    (lambda d: d["base"].update(memory_fraction=1.5), ["memory_fraction", "(0, 1]"]),
    (lambda d: d["policies"][1]["params"].update(budget=0), ["sarathi.budget", ">= 1"]),
    (lambda d: d["base"].update(pp=2), ["pp", "pp=4"]),
    (lambda d: d["grid"].update({"workload.arrival.rate": []}), ["grid.workload.arrival.rate", "non-empty list"]),
    (lambda d: d.update(zip=[{"seed": [0, 1], "page_size": [16]}]), ["zip[0]", "same length"]),
    (lambda d: d.update(capacity={"lo": 4, "hi": 2, "slo": {"ttft_p99": 1}}), ["capacity.hi", "> capacity.lo"]),
    (lambda d: d.update(capacity={"tol": -1, "slo": {"ttft_p99": 1}}), ["capacity.tol", "> 0"]),
    (lambda d: d.update(capacity={"rel_tol": 1.5, "slo": {"ttft_p99": 1}}), ["capacity.rel_tol", "[0, 1)"]),
    (lambda d: d.update(capacity={"rel_tol": -0.1, "slo": {"ttft_p99": 1}}), ["capacity.rel_tol", ">= 0"]),
    (lambda d: d.update(capacity={"lo": 1, "max_throughput": False}), ["capacity.slo", "at least one"]),
    (lambda d: d["grid"].update({"policy": ["vllm"]}), ["policies"]),
    (lambda d: d.update(policies=[{"name": "sarathi"}, {"name": "sarathi"}]), ["label", "twice"]),
    (lambda d: d["base"]["workload"].update(trace="no/such/trace.csv"), ["workload.trace", "no such file"]),
])
def test_bad_values_name_the_field_and_the_allowed_range(mutate, words):
    d = small()
    mutate(d)
    msg = error_of(d)
    for w in words:
        assert w in msg, (w, msg)


def test_grid_expansion_counts_with_zip_and_policy_grids():
    d = small(grid={"workload.arrival.rate": [1, 2, 3], "page_size": [16, 32]},
              zip=[{"seed": [0, 1], "workload.arrival.burstiness": [1.0, 0.5]}],
              policies=[{"name": "token_throttling", "grid": {"iterp": [4, 8], "maxp": [1024, 2048]}},
                        {"name": "sarathi"}])
    exp = parse_experiment(d)
    runs = expand(exp)
    assert exp.count() == len(runs) == (4 + 1) * 3 * 2 * 2
    labels = {r.label for r in runs}
    assert "token_throttling iterp=8,maxp=1024" in labels and "sarathi" in labels
    r = next(r for r in runs if r.label == "token_throttling iterp=8,maxp=1024" and r.settings["seed"] == 1)
    assert r.config["policy_params"] == {"iterp": 8, "maxp": 1024}
    assert r.config["workload"]["arrival"]["burstiness"] == 0.5      # zipped with seed 1
    assert r.config["seed"] == 1
    assert r.config["memory_fraction"] == 0.9                         # SimConfig defaults resolved
    # zipped keys vary together: no (seed 0, burstiness 0.5) run
    assert not any(r.settings["seed"] == 0 and r.settings["workload.arrival.burstiness"] == 0.5 for r in runs)


def test_shipped_configs_validate(monkeypatch):
    monkeypatch.chdir(REPO)
    exp = load_experiment("experiments/gllm_vs_sarathi.yaml")
    assert exp.count() == 24 and exp.capacity is not None
    assert {p.name for p in exp.policies} == {"token_throttling", "sarathi", "vllm"}
    exp = load_experiment("experiments/tt_params.yaml")
    assert exp.count() == (4 * 3 + 1) * 2 and exp.capacity.probes() == 0
    trace = REPO.parent / "shared/data/traces/azure_conv_2023.csv"
    if trace.is_file():
        exp = load_experiment("experiments/azure_conv_trace.yaml")
        assert all(Path(r.config["workload"]["trace"]).is_absolute() for r in expand(exp))
        # issue 17's comparisons: equal grids per policy, four platforms each
        for name, variants in [("time_balanced_conv", 16), ("time_balanced_code", 16), ("chunk_cap_code", 12),
                               ("queue_order_code", 20), ("queue_order_code_full", 20),
                               ("queue_order_conv_full", 6), ("late_conv_full", 10), ("late_code_full", 8),
                               ("late_conv_bounded", 4)]:
            exp = load_experiment(f"experiments/{name}.yaml")
            assert exp.count() == 4 * variants and exp.capacity is not None, name


def test_all_runs_are_validated_before_any_starts(tmp_path):
    d = small(grid={"workload.arrival.rate": [2, 3, "fast"]})
    with pytest.raises(ConfigError, match="run 2"):
        run_sweep(parse_experiment(d), tmp_path / "out", workers=1, progress=False, report=False)
    assert not list((tmp_path / "out").glob("cache/*.json"))


# ---------------------------------------------------------------- capacity

@pytest.mark.parametrize("threshold", [0.51, 1.0, 3.7, 7.99])
def test_find_capacity_on_a_monotone_function(threshold):
    calls = []

    def meets(rate: float) -> bool:
        calls.append(rate)
        return rate <= threshold

    lo, hi, tol = 0.5, 8.0, 0.05
    cap = find_capacity(meets, lo, hi, tol)
    assert threshold - tol <= cap <= threshold
    assert meets(cap)
    assert len(calls) - 1 <= 2 + math.ceil(math.log2((hi - lo) / tol))


def test_find_capacity_bounds_and_arguments():
    assert find_capacity(lambda r: True, 1, 4, 0.1) == 4
    assert find_capacity(lambda r: False, 1, 4, 0.1) == 0.0
    for lo, hi, tol, rel in ((4, 1, 0.1, 0), (1, 4, 0, 0), (-1, 4, 0.1, 0), (1, math.inf, 0.1, 0),
                             (0, 4, 0, 0.01), (1, 4, 0.1, -0.1)):
        with pytest.raises(ValueError):
            find_capacity(lambda r: True, lo, hi, tol, rel)


@pytest.mark.parametrize("threshold", [0.26, 0.7, 3.7, 12.9])
def test_find_capacity_to_a_relative_tolerance(threshold):
    """rel_tol 2%: within 2% of the capacity wherever it lies in [0.1, 24], where an
    absolute tolerance fine enough for 0.26 would spend probes at 12.9."""
    calls = []

    def meets(rate: float) -> bool:
        calls.append(rate)
        return rate <= threshold

    cap = find_capacity(meets, 0.1, 24, 0.0, 0.02)
    assert meets(cap) and threshold * (1 - 0.02) <= cap <= threshold
    # the relative rule stops sooner the larger the rate; the bound from CapacitySpec.probes
    from experiments.spec import CapacitySpec
    assert len(calls) - 1 <= CapacitySpec("k", 0.1, 24, 0.0, {"ttft_p99": 1}, rel_tol=0.02).probes()
    # with both, the larger step wins: an absolute 1.0 dominates at 3.7 and 12.9
    assert threshold - max(1.0, 0.02 * threshold) <= find_capacity(lambda r: r <= threshold, 0.1, 24, 1.0, 0.02)


def test_slo_check():
    row = {"ttft_p99": 2.0, "tpot_p99": 0.3, "rejected": 0, "unfinished": 0}
    assert meets_slo(row, {"ttft_p99": 2.0})
    assert not meets_slo(row, {"tpot_p99": 0.2})
    assert not meets_slo({**row, "ttft_p99": float("nan")}, {"ttft_p99": 5})
    assert slo_failures({**row, "unfinished": 3}, {"ttft_p99": 5}) == ["3 unfinished"]


# ---------------------------------------------------------------- runner and cache

def _table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv").drop(columns=["wall_s"])


def test_cache_reuse_and_extension(tmp_path):
    out = tmp_path / "out"
    d = small(capacity={"lo": 1, "hi": 9, "tol": 2, "slo": {"ttft_p99": 30, "tpot_p99": 1.0}})
    exp = parse_experiment(d)
    first = run_sweep(exp, out, workers=1, progress=False, report=False)
    assert first.computed > 4 and first.cached >= 0
    table = _table(out)
    assert len(table) == 4

    again = run_sweep(exp, out, workers=1, progress=False, report=False)
    assert again.computed == 0                       # nothing recomputed, capacity included
    pd.testing.assert_frame_equal(_table(out), table)

    d["grid"]["workload.arrival.rate"] = [2, 6, 4]
    more = run_sweep(parse_experiment(d), out, workers=1, progress=False, report=False)
    assert more.computed == 2                        # only the new rate, once per policy
    assert len(_table(out)) == 6
    # a run is one cache file, keyed by the resolved config
    assert len(list((out / "cache").glob("*.json"))) == first.computed + 2


def test_code_fingerprint_ignores_comments_and_docstrings_not_code():
    """The cache's code hash: a comment, a docstring or a layout change keeps cached runs;
    any change to what runs (a constant, an operator, a string that is not a docstring)
    invalidates them."""
    from experiments.task_runner import code_fingerprint
    base = code_fingerprint('"""Module."""\nclass A:\n    """Doc."""\n    def f(self, x):\n'
                            '        """Doc."""\n        return x + 1  # why\n')
    assert base == code_fingerprint('"""Another module doc."""\n\nclass A:\n    def f(self, x):\n'
                                    '        # a new comment\n        return (x +\n                1)\n')
    for changed in ('class A:\n    def f(self, x):\n        return x + 2\n',
                    'class A:\n    def f(self, x):\n        return x - 1\n'):
        assert code_fingerprint(changed) != base, changed
    assert code_fingerprint('"""Doc."""\nNAME = "a"\n') != code_fingerprint('"""Doc."""\nNAME = "b"\n')


def test_results_table_is_tidy_and_deterministic(tmp_path):
    d = small(policies=[{"name": "token_throttling", "label": "TT", "grid": {"iterp": [4, 8]}}])
    exp = parse_experiment(d)
    a = run_sweep(exp, tmp_path / "a", workers=1, progress=False, report=False)
    b = run_sweep(exp, tmp_path / "b", workers=2, progress=False, report=False, use_cache=False)
    assert a.computed == b.computed == 4
    ta, tb = _table(tmp_path / "a"), _table(tmp_path / "b")
    pd.testing.assert_frame_equal(ta, tb)
    for col in ("run", "series", "policy", "label", "policy_params.iterp", "workload.arrival.rate",
                "offered_rps", "throughput_rps", "ttft_p99", "tpot_p50", "bubble_ratio",
                "bubble_ratio_stage3", "hash"):
        assert col in ta.columns, col
    assert list(ta["workload.arrival.rate"]) == [2, 6, 2, 6]
    if (tmp_path / "a" / "results.parquet").exists():
        assert len(pd.read_parquet(tmp_path / "a" / "results.parquet")) == 4


def test_hash_depends_on_config_only():
    exp = parse_experiment(small())
    runs = expand(exp)
    assert run_hash(runs[0].config) == run_hash(copy.deepcopy(runs[0].config))
    assert len({run_hash(r.config) for r in runs}) == len(runs)


def test_runner_keeps_traces_on_request(tmp_path):
    runner = Runner(tmp_path, workers=1, progress=False)
    cfg = expand(parse_experiment(small()))[0].config
    task = Task(cfg, keep_trace=True)
    row = runner.run_one(task)
    assert (runner.trace_dir(task) / "meta.json").is_file()
    assert (runner.trace_dir(task) / "perfetto.json").is_file()
    assert row["requests"] == 40 and runner.computed == 1
    runner.run_one(task)
    assert runner.computed == 1 and runner.cached == 1


# ---------------------------------------------------------------- plots

def _rates_frame() -> pd.DataFrame:
    rows = []
    for s, series in enumerate(["A", "B", "C"]):
        for rate in (1.0, 2.0, 4.0, math.inf):
            rows.append({"series": series, "label": series, "workload.arrival.rate": rate,
                         "bubble_ratio": 0.1 * s + 0.01 * rate if rate < 9 else 0.0,
                         "throughput_rps": min(rate, 3.0), "ttft_p50": 0.1 * rate, "ttft_p99": 0.2 * rate,
                         "tpot_p50": 0.01 * rate, "tpot_p99": 0.02 * rate})
    return pd.DataFrame(rows)


def test_rate_plots_have_labels_and_one_line_per_policy(tmp_path):
    from experiments import plots

    df = _rates_frame()
    fig = plots.plot_bubble(df, "workload.arrival.rate")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "request rate (req/s)"
    assert "bubble ratio" in ax.get_ylabel()
    assert len(ax.get_lines()) == 3
    assert all(len(line.get_xdata()) == 3 for line in ax.get_lines())   # rate inf left out
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A", "B", "C"]

    fig = plots.plot_latency(df, "workload.arrival.rate")
    axes = [a for a in fig.axes if a.get_lines()]
    assert len(axes) == 4
    assert {a.get_ylabel() for a in axes} == {"P50 TTFT (s)", "P99 TTFT (s)", "P50 TPOT (ms)", "P99 TPOT (ms)"}
    assert all(a.get_xlabel() == "throughput (req/s)" and len(a.get_lines()) == 3 for a in axes)

    paths = plots.save(fig, tmp_path / "lat")
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 0 for p in paths)


def test_trace_plots(tmp_path):
    from experiments import plots
    from sim import SimConfig, simulate

    traces = {}
    for pol in ("token_throttling", "sarathi"):
        w = copy.deepcopy(SMALL_WORKLOAD)
        traces[pol] = simulate(SimConfig(policy=pol, workload=w)).trace
    fig = plots.plot_timeline(traces, 2.0, 1.0)
    gantt = [a for a in fig.axes if a.get_yticklabels() and a.get_xlim() == (2.0, 3.0)]
    assert len(gantt) == 2
    assert [t.get_text() for t in gantt[0].get_yticklabels()] == [f"stage {s}" for s in range(4)]
    assert gantt[-1].get_xlabel() == "time (s)"
    assert any("prefill share" in a.get_ylabel() for a in fig.axes)     # the colorbar

    fig = plots.plot_kv_queue(traces, window=(2.0, 3.0))
    kv, q = fig.axes[:2]
    assert kv.get_ylabel() == "KV cache used (%)" and q.get_ylabel() == "waiting requests"
    assert len(kv.get_lines()) == len(q.get_lines()) == 2

    fig = plots.plot_cdfs(traces)
    assert [a.get_xlabel() for a in fig.axes] == ["TTFT (s)", "TPOT (ms)"]
    assert all(len(a.get_lines()) == 2 for a in fig.axes)

    df = pd.DataFrame({"policy_params.iterp": [4, 4, 8, 8], "policy_params.maxp": [1024, 2048] * 2,
                       "bubble_ratio": [0.1, 0.2, 0.3, 0.4]})
    fig = plots.plot_heatmap(df, "policy_params.iterp", "policy_params.maxp", "bubble_ratio", "t")
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("iterp", "maxp")
    assert len(fig.axes[0].texts) == 4


# ---------------------------------------------------------------- report

def test_sweep_writes_report_with_capacity_and_plots(tmp_path):
    d = small(capacity={"lo": 1, "hi": 9, "tol": 2, "slo": {"ttft_p99": 30, "tpot_p99": 0.5}},
              report={"timeline": {"rate": 6, "duration": 1.0}})
    d["policies"][0]["grid"] = {"iterp": [4, 8], "maxp": [1024, 2048]}
    res = run_sweep(parse_experiment(d), tmp_path, workers=1, progress=False)
    text = res.report.read_text()
    assert "## Capacity" in text and "## Comparison" in text and "## Summary per policy and load" in text
    assert "bubble ratio" in text and "Sarathi" in text
    cap = pd.read_csv(tmp_path / "capacity.csv")
    assert len(cap) == 5 and {"capacity", "max_throughput_rps", "probes"} <= set(cap.columns)
    for line in text.splitlines():
        if line.startswith("!["):
            assert (tmp_path / line.split("](")[1].rstrip(")")).is_file()
    names = {p.name for p in (tmp_path / "plots").glob("*.png")}
    assert {"bubble_vs_rate.png", "throughput_latency.png", "timeline.png", "kv_queue.png",
            "latency_cdf.png", "heatmap_TT_bubble_ratio.png", "heatmap_TT_max_throughput.png"} <= names
    assert (tmp_path / "plots" / "timeline.svg").is_file()
    assert len(list((tmp_path / "runs").iterdir())) == 5      # traces kept only at the timeline rate


def test_max_throughput_without_slo(tmp_path):
    d = small(capacity={"max_throughput": True}, grid={"workload.arrival.rate": [3]})
    res = run_sweep(parse_experiment(d), tmp_path, workers=1, progress=False)
    assert res.computed == 2 + 2                   # the grid + one all-at-t=0 run per policy
    cap = pd.read_csv(tmp_path / "capacity.csv")
    assert cap["capacity"].isna().all() and (cap["max_throughput_rps"] > 0).all()
    text = res.report.read_text()
    assert "No SLO given" in text and "Max throughput (all requests at t=0)" in text
