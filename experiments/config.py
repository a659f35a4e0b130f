"""Experiment configs: load and validate every key and value (experiments/expand.py expands
them into resolved runs; experiments/config_keys.py holds the checks the tune config shares).

Schema (YAML; every key is checked, an unknown one is an error naming the closest valid one):

    name: my_sweep                # optional; default: the file's stem (also the output folder)
    description: free text        # optional; copied into the report
    base:                         # shared settings: any SimConfig field except policy/policy_params
      profile: qwen2.5-32b_a100-80gb_pp4
      workload: {num_requests: 800, arrival: {kind: gamma, rate: 1.0}, ...}
      seed: 0
    grid:                         # dotted keys -> lists; runs = cartesian product
      workload.arrival.rate: [1, 2, 3]
    zip:                          # groups of keys whose lists vary together (one axis each)
      - {seed: [0, 1], workload.arrival.burstiness: [1.0, 0.5]}
    policies:                     # each entry: name, label?, params?, grid? (its own param grid)
      - {name: token_throttling, grid: {iterp: [4, 8], maxp: [1024, 2048]}}
      - {name: sarathi, label: "Sarathi (2048)", params: {budget: 2048}}
    capacity:                     # optional: per series, the highest rate meeting the SLOs
      key: workload.arrival.rate  # the dotted key searched (default: the rate key)
      lo: 0.5
      hi: 8.0
      tol: 0.1
      slo: {ttft_p99: 5.0, tpot_p99: 0.4}   # summarize() metric -> upper limit (none: no search)
      max_throughput: true        # also one run per series with every request at t=0 (no
                                  #   capacity above it is reported)
      sustain: 0.05               # a probe must keep up: its queue grows by <= sustain x the
                                  #   arrival rate (experiments/capacity.py)
    report:
      plots: [bubble, latency, timeline, kv_queue, cdf, heatmap]
      x: workload.arrival.rate    # x axis of the per-rate plots (default: the swept rate key)
      timeline: {rate: 4.0, start: null, duration: 2.0}   # which run and window to draw
      heatmap: {metric: bubble_ratio, rate: null}          # for policies with a 2-param grid
    artefacts: false              # keep every run's trace (else only the timeline runs')

Runs = sum over policy entries of (product of its param grid) x (product of the grid) x
(length of each zip group). Every resolved run is validated (SimConfig, workload spec,
profile, trace file) before any starts.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping

from core.metrics import SUMMARY_KEYS
from core.policies import policy_class, policy_params
from core.validation import suggest
from experiments.config_keys import (SCHEMA, AnyKey, ConfigError, check_dotted, check_keys, check_tree,
                                     name_and_description, number, read_yaml, values_list)
from experiments.expand import expand, probe_config
from experiments.spec import PLOTS, CapacitySpec, Experiment, PolicySpec, ReportSpec

__all__ = ["ConfigError", "expand", "probe_config", "load_experiment", "parse_experiment", "parse_capacity"]

TOP_KEYS = ("name", "description", "base", "grid", "zip", "policies", "capacity", "report", "artefacts")
POLICY_KEYS = ("name", "label", "params", "grid")
CAPACITY_KEYS = ("key", "lo", "hi", "tol", "rel_tol", "slo", "max_throughput", "sustain")
REPORT_KEYS = ("plots", "x", "timeline", "heatmap")
TIMELINE_KEYS = ("rate", "start", "duration")
HEATMAP_KEYS = ("metric", "rate")
RATE_KEYS = ("workload.arrival.rate", "workload.rate_scale", "workload.time_scale")
CAPACITY_METRICS = tuple(k for k in SUMMARY_KEYS if k not in ("requests",))


def load_experiment(path: str | os.PathLike, *, check_files: bool = True) -> Experiment:
    """Read and validate a YAML experiment config (runs are validated by `expand`)."""
    path = Path(path)
    raw = read_yaml(path, "experiment config")
    try:
        exp = parse_experiment(raw or {}, default_name=path.stem)
        exp.source = str(path)
        if check_files:
            expand(exp)  # validates every run now, before anything starts
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return exp


def parse_experiment(raw: Any, default_name: str = "experiment") -> Experiment:
    d = check_keys(raw, TOP_KEYS, "config")
    name, description = name_and_description(d, default_name)

    base = check_keys(d.get("base"), tuple(SCHEMA) + ("policy", "policy_params"), "base")
    for k in ("policy", "policy_params"):
        if k in base:
            raise ConfigError(f"base.{k}: set policies under policies: (name, params, grid), not in base")
    check_tree(base, SCHEMA, "base")

    grid = {}
    for k, v in check_keys(d.get("grid"), AnyKey(), "grid").items():
        grid[check_dotted(k, "grid")] = values_list(v, f"grid.{k}", distinct=True)
    zraw = d.get("zip") or []
    if isinstance(zraw, Mapping):
        zraw = [zraw]
    if not isinstance(zraw, list):
        raise ConfigError(f"zip must be a list of groups ({{key: [values], ...}}), got {type(zraw).__name__}")
    zips = []
    seen = set(grid)
    for i, group in enumerate(zraw):
        where = f"zip[{i}]"
        g = {}
        for k, v in check_keys(group, AnyKey(), where).items():
            check_dotted(k, where)
            if k in seen:
                raise ConfigError(f"{where}: {k!r} is already swept (in grid or another zip group)")
            seen.add(k)
            g[k] = values_list(v, f"{where}.{k}")
        if not g:
            raise ConfigError(f"{where}: empty group")
        lengths = {k: len(v) for k, v in g.items()}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"{where}: lists must have the same length, got "
                              + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
        zips.append(g)

    policies = _parse_policies(d.get("policies"))
    swept = [*grid, *(k for z in zips for k in z)]
    capacity = parse_capacity(d.get("capacity"), base, swept)
    report = _parse_report(d.get("report"), swept)
    artefacts = d.get("artefacts", False)
    if not isinstance(artefacts, bool):
        raise ConfigError(f"artefacts must be true or false, got {artefacts!r}")
    return Experiment(name, description, base, grid, zips, policies, capacity, report, artefacts,
                      raw=copy.deepcopy(dict(d)))


def _parse_policies(raw: Any) -> list[PolicySpec]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("policies must be a non-empty list of {name, label?, params?, grid?}")
    out: list[PolicySpec] = []
    labels: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"policies[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        e = check_keys(entry, POLICY_KEYS, where)
        name = e.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"{where}.name is required (a policy name or dotted path), got {name!r}")
        try:
            allowed = list(policy_params(policy_class(name)))
        except ValueError as err:
            raise ConfigError(f"{where}.name: {err}") from None
        params = check_keys(e.get("params"), allowed if allowed else AnyKey(), f"{where}.params")
        pgrid = {k: values_list(v, f"{where}.grid.{k}", distinct=True)
                 for k, v in check_keys(e.get("grid"), allowed if allowed else AnyKey(),
                                        f"{where}.grid").items()}
        label = e.get("label", name)
        if not isinstance(label, str) or not label:
            raise ConfigError(f"{where}.label must be a non-empty string, got {label!r}")
        spec = PolicySpec(name, label, params, pgrid)
        for lab, _ in spec.variants():
            if lab in labels:
                raise ConfigError(f"{where}: label {lab!r} is used twice; give each entry its own label")
            labels.add(lab)
        out.append(spec)
    return out


def parse_capacity(raw: Any, base: dict, swept: list[str]) -> CapacitySpec | None:
    if raw is None or raw is False:
        return None
    c = check_keys(raw, CAPACITY_KEYS, "capacity")
    default_key = next((k for k in RATE_KEYS if k in swept), None)
    if default_key is None:
        default_key = "workload.rate_scale" if "trace" in (base.get("workload") or {}) else RATE_KEYS[0]
    key = check_dotted(c.get("key", default_key), "capacity.key")
    if key == "workload.time_scale":
        raise ConfigError("capacity.key: time_scale grows as the rate falls; search workload.rate_scale")
    lo = number(c, "lo", "capacity", 0.5, low=0)
    hi = number(c, "hi", "capacity", 8.0, low=0)
    if hi <= lo:
        raise ConfigError(f"capacity.hi must be > capacity.lo ({lo:g}), got {hi!r}")
    # A search stops within tol, or within rel_tol x the rate, whichever is larger; with
    # rel_tol alone the absolute tolerance is off, not its default 0.1.
    rel_tol = number(c, "rel_tol", "capacity", 0.0, low=0, strict=False)
    if rel_tol >= 1:
        raise ConfigError(f"capacity.rel_tol must be a fraction in [0, 1) of the rate, got {rel_tol!r}")
    tol = number(c, "tol", "capacity", 0.1, low=0) if "tol" in c or not rel_tol else 0.0
    slo = check_keys(c.get("slo"), CAPACITY_METRICS, "capacity.slo")
    for m in slo:
        number(slo, m, "capacity.slo", None, low=0)
    mt = c.get("max_throughput", True)
    if not isinstance(mt, bool):
        raise ConfigError(f"capacity.max_throughput must be true or false, got {mt!r}")
    if not slo and not mt:
        raise ConfigError("capacity.slo must name at least one metric limit, e.g. "
                          "{ttft_p99: 5.0, tpot_p99: 0.4} (seconds), unless max_throughput is true")
    sustain = number(c, "sustain", "capacity", 0.05, low=0)
    if sustain >= 1:
        raise ConfigError(f"capacity.sustain must be a fraction in (0, 1), got {sustain!r}")
    return CapacitySpec(key, float(lo), float(hi), float(tol), {k: float(v) for k, v in slo.items()}, mt,
                        float(sustain), float(rel_tol))


def _parse_report(raw: Any, swept: list[str]) -> ReportSpec:
    r = check_keys(raw, REPORT_KEYS, "report")
    plots = r.get("plots", list(PLOTS))
    if not isinstance(plots, list):
        raise ConfigError(f"report.plots must be a list drawn from {list(PLOTS)}, got {plots!r}")
    for p in plots:
        if p not in PLOTS:
            raise ConfigError(f"report.plots: unknown plot {p!r}{suggest(p, PLOTS)} "
                              f"(allowed: {', '.join(PLOTS)})")
    x = r.get("x", next((k for k in RATE_KEYS if k in swept), None))
    if x is not None:
        check_dotted(x, "report.x")
        if x not in swept:
            raise ConfigError(f"report.x: {x!r} is not swept (swept: {', '.join(swept) or 'nothing'})")
    t = check_keys(r.get("timeline"), TIMELINE_KEYS, "report.timeline")
    start = number(t, "start", "report.timeline", None, low=0, strict=False, allow_none=True)
    duration = number(t, "duration", "report.timeline", 2.0, low=0)
    h = check_keys(r.get("heatmap"), HEATMAP_KEYS, "report.heatmap")
    metric = h.get("metric", "bubble_ratio")
    if metric not in SUMMARY_KEYS:
        raise ConfigError(f"report.heatmap.metric: unknown metric {metric!r}{suggest(metric, SUMMARY_KEYS)}")
    return ReportSpec(tuple(plots), x, t.get("rate"), start, float(duration), metric, h.get("rate"))
