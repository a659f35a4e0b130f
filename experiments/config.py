"""Experiment configs: load, validate every key and value, expand into resolved runs.

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
      sustain: 0.05               # a probe must keep up: delivered >= (1 - sustain) x offered and
                                  #   queue growth <= sustain x arrival rate (experiments/capacity.py)
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
import difflib
import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from core import validation
from core.metrics import SUMMARY_KEYS
from core.validation import suggest
from core.policies import policy_class, policy_params
from profiles import load_profile
from sim.config import SimConfig, default_workload

TOP_KEYS = ("name", "description", "base", "grid", "zip", "policies", "capacity", "report", "artefacts")
POLICY_KEYS = ("name", "label", "params", "grid")
CAPACITY_KEYS = ("key", "lo", "hi", "tol", "slo", "max_throughput", "sustain")
REPORT_KEYS = ("plots", "x", "timeline", "heatmap")
TIMELINE_KEYS = ("rate", "start", "duration")
HEATMAP_KEYS = ("metric", "rate")
PLOTS = ("bubble", "latency", "timeline", "kv_queue", "cdf", "heatmap")
RATE_KEYS = ("workload.arrival.rate", "workload.rate_scale", "workload.time_scale")
CAPACITY_METRICS = tuple(k for k in SUMMARY_KEYS if k not in ("requests",))

_LENGTH = {k: None for k in ("kind", "value", "low", "high", "mean", "spread", "min", "max", "values")}
# Nested keys a dotted key may name (None = leaf). Mirrors SimConfig and Workload.from_dict.
SCHEMA: dict[str, Any] = {
    "profile": None, "workload": {
        "num_requests": None, "seed": None, "trace": None, "time_scale": None, "rate_scale": None,
        "start": None, "limit": None, "arrival": {"kind": None, "rate": None, "burstiness": None},
        "prompt_len": _LENGTH, "output_len": _LENGTH},
    "seed": None, "pp": None, "num_pages": None, "memory_fraction": None, "page_size": None,
    "time_limit": None, "stage_model": None,
    "slo": {k: None for k in ("ttft", "tpot", "e2e", "ttft_slo", "tpot_slo", "e2e_slo")},
}


class ConfigError(ValueError):
    """A user error in an experiment config; the message says where and what is allowed."""


def check_keys(d: Any, allowed: tuple[str, ...] | list[str], where: str) -> dict:
    return {} if d is None else dict(validation.check_keys(d, allowed, where, ConfigError))


def check_dotted(key: Any, where: str) -> str:
    """A dotted key must name a path in SCHEMA (policy settings go under policies:)."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{where}: keys must be dotted strings, got {key!r}")
    if key.split(".")[0] in ("policy", "policy_params"):
        raise ConfigError(f"{where}: {key!r} is set per entry of policies: (name, params, grid), "
                          "not here")
    node: Any = SCHEMA
    done: list[str] = []
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(done)!r} is a single value; {key!r} goes below it")
        if part not in node:
            close = difflib.get_close_matches(part, list(node), n=1)
            hint = f"; did you mean {'.'.join([*done, close[0], *parts[i + 1:]])!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint} "
                              f"(allowed {'after ' + repr('.'.join(done)) if done else 'at the top level'}: {', '.join(node)})")
        node = node[part]
        done.append(part)
    return key


def _check_tree(d: Any, node: dict, where: str) -> None:
    """Walk a base mapping against SCHEMA so nested unknown keys are named with their path."""
    if not isinstance(d, Mapping):
        return  # the value check (SimConfig) reports the wrong type
    for k, v in d.items():
        if k not in node:
            raise ConfigError(f"{where}: unknown key {k!r}{suggest(k, list(node))} "
                              f"(allowed: {', '.join(node)})")
        if isinstance(node[k], dict) and isinstance(v, Mapping):
            _check_tree(v, node[k], f"{where}.{k}")


def _values(v: Any, where: str) -> list:
    if not isinstance(v, list) or not v:
        raise ConfigError(f"{where} must be a non-empty list of values, got {v!r}")
    return v


def _number(d: Mapping, key: str, where: str, default: Any, *, low: float | None = None,
            strict: bool = True, allow_none: bool = False) -> Any:
    v = d.get(key, default)
    if v is None and allow_none:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (low is not None and (v <= low if strict else v < low)):
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ConfigError(f"{where}.{key} must be a finite number{bound}"
                          f"{' or null' if allow_none else ''}, got {v!r}")
    return v


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[parts[-1]] = copy.deepcopy(value)


def get_dotted(d: Mapping, key: str, default: Any = None) -> Any:
    for p in key.split("."):
        if not isinstance(d, Mapping) or p not in d:
            return default
        d = d[p]
    return d


def as_float(v: Any) -> float:
    """Rates may be 'inf' strings; everything numeric becomes a float (NaN if not numeric)."""
    if isinstance(v, str) and v.strip().lower() in ("inf", "+inf", "infinity"):
        return math.inf
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:g}"
    return str(v)


# ---------------------------------------------------------------- specs

@dataclass
class PolicySpec:
    name: str
    label: str
    params: dict[str, Any]
    grid: dict[str, list]

    def variants(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, params) per point of the policy's own parameter grid."""
        if not self.grid:
            return [(self.label, dict(self.params))]
        out = []
        for combo in itertools.product(*self.grid.values()):
            point = dict(zip(self.grid, combo))
            label = f"{self.label} " + ",".join(f"{k}={fmt_value(v)}" for k, v in point.items())
            out.append((label, {**self.params, **point}))
        return out


@dataclass
class CapacitySpec:
    key: str
    lo: float
    hi: float
    tol: float
    slo: dict[str, float]
    max_throughput: bool = True
    sustain: float = 0.05

    def probes(self) -> int:
        """Most simulations one bisection needs (both ends + halvings); 0 without an SLO."""
        return 2 + max(0, math.ceil(math.log2((self.hi - self.lo) / self.tol))) if self.slo else 0


@dataclass
class ReportSpec:
    plots: tuple[str, ...] = PLOTS
    x: str | None = None
    timeline_rate: Any = None
    timeline_start: float | None = None
    timeline_duration: float = 2.0
    heatmap_metric: str = "bubble_ratio"
    heatmap_rate: Any = None


@dataclass
class Run:
    index: int
    config: dict[str, Any]        # resolved SimConfig.to_dict()
    settings: dict[str, Any]      # swept dotted key -> value (grid and zip)
    policy: str
    label: str
    params: dict[str, Any]        # policy params as given (entry params + its grid point)
    series: str                   # label + the swept settings other than the x key
    x: Any = None                 # value of the report's x key (None when not swept)
    artefacts: bool = False       # keep the trace (runs/<hash>/)


@dataclass
class Experiment:
    name: str
    description: str
    base: dict[str, Any]
    grid: dict[str, list]
    zips: list[dict[str, list]]
    policies: list[PolicySpec]
    capacity: CapacitySpec | None
    report: ReportSpec
    artefacts: bool
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def swept(self) -> list[str]:
        return [*self.grid, *(k for z in self.zips for k in z)]

    def count(self) -> int:
        points = math.prod(len(v) for v in self.grid.values()) * math.prod(
            len(next(iter(z.values()))) for z in self.zips)
        return points * sum(len(p.variants()) for p in self.policies)


# ---------------------------------------------------------------- loading

def read_yaml(path: Path, what: str) -> Any:
    """A config file's YAML, or a ConfigError naming the file (`what`: the kind of config)."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


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


def name_and_description(d: Mapping, default_name: str) -> tuple[str, str]:
    """A config's `name` (it names the results folder: no '/') and `description`."""
    name = d.get("name", default_name)
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"name must be a non-empty string without '/', got {name!r}")
    description = d.get("description", "") or ""
    if not isinstance(description, str):
        raise ConfigError(f"description must be a string, got {description!r}")
    return name, description


def parse_experiment(raw: Any, default_name: str = "experiment") -> Experiment:
    d = check_keys(raw, TOP_KEYS, "config")
    name, description = name_and_description(d, default_name)

    base = check_keys(d.get("base"), tuple(SCHEMA) + ("policy", "policy_params"), "base")
    for k in ("policy", "policy_params"):
        if k in base:
            raise ConfigError(f"base.{k}: set policies under policies: (name, params, grid), not in base")
    _check_tree(base, SCHEMA, "base")

    grid = {}
    for k, v in check_keys(d.get("grid"), _AnyKey(), "grid").items():
        grid[check_dotted(k, "grid")] = _values(v, f"grid.{k}")
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
        for k, v in check_keys(group, _AnyKey(), where).items():
            check_dotted(k, where)
            if k in seen:
                raise ConfigError(f"{where}: {k!r} is already swept (in grid or another zip group)")
            seen.add(k)
            g[k] = _values(v, f"{where}.{k}")
        if not g:
            raise ConfigError(f"{where}: empty group")
        lengths = {k: len(v) for k, v in g.items()}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"{where}: lists must have the same length, got "
                              + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
        zips.append(g)

    policies = _parse_policies(d.get("policies"))
    swept = [*grid, *(k for z in zips for k in z)]
    capacity = _parse_capacity(d.get("capacity"), base, swept)
    report = _parse_report(d.get("report"), swept)
    artefacts = d.get("artefacts", False)
    if not isinstance(artefacts, bool):
        raise ConfigError(f"artefacts must be true or false, got {artefacts!r}")
    return Experiment(name, description, base, grid, zips, policies, capacity, report, artefacts,
                      raw=copy.deepcopy(dict(d)))


class _AnyKey(tuple):
    """`check_keys` allowed-set that accepts every key (dotted keys are checked separately)."""
    def __contains__(self, item: object) -> bool:
        return True


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
        params = check_keys(e.get("params"), allowed if allowed else _AnyKey(), f"{where}.params")
        pgrid = {k: _values(v, f"{where}.grid.{k}")
                 for k, v in check_keys(e.get("grid"), allowed if allowed else _AnyKey(),
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


def _parse_capacity(raw: Any, base: dict, swept: list[str]) -> CapacitySpec | None:
    if raw is None or raw is False:
        return None
    c = check_keys(raw, CAPACITY_KEYS, "capacity")
    default_key = next((k for k in RATE_KEYS if k in swept), None)
    if default_key is None:
        default_key = "workload.rate_scale" if "trace" in (base.get("workload") or {}) else RATE_KEYS[0]
    key = check_dotted(c.get("key", default_key), "capacity.key")
    if key == "workload.time_scale":
        raise ConfigError("capacity.key: time_scale grows as the rate falls; search workload.rate_scale")
    lo = _number(c, "lo", "capacity", 0.5, low=0)
    hi = _number(c, "hi", "capacity", 8.0, low=0)
    if hi <= lo:
        raise ConfigError(f"capacity.hi must be > capacity.lo ({lo:g}), got {hi!r}")
    tol = _number(c, "tol", "capacity", 0.1, low=0)
    slo = check_keys(c.get("slo"), CAPACITY_METRICS, "capacity.slo")
    for m in slo:
        _number(slo, m, "capacity.slo", None, low=0)
    mt = c.get("max_throughput", True)
    if not isinstance(mt, bool):
        raise ConfigError(f"capacity.max_throughput must be true or false, got {mt!r}")
    if not slo and not mt:
        raise ConfigError("capacity.slo must name at least one metric limit, e.g. "
                          "{ttft_p99: 5.0, tpot_p99: 0.4} (seconds), unless max_throughput is true")
    sustain = _number(c, "sustain", "capacity", 0.05, low=0)
    if sustain >= 1:
        raise ConfigError(f"capacity.sustain must be a fraction in (0, 1), got {sustain!r}")
    return CapacitySpec(key, float(lo), float(hi), float(tol), {k: float(v) for k, v in slo.items()}, mt,
                        float(sustain))


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
    start = _number(t, "start", "report.timeline", None, low=0, strict=False, allow_none=True)
    duration = _number(t, "duration", "report.timeline", 2.0, low=0)
    h = check_keys(r.get("heatmap"), HEATMAP_KEYS, "report.heatmap")
    metric = h.get("metric", "bubble_ratio")
    if metric not in SUMMARY_KEYS:
        raise ConfigError(f"report.heatmap.metric: unknown metric {metric!r}{suggest(metric, SUMMARY_KEYS)}")
    return ReportSpec(tuple(plots), x, t.get("rate"), start, float(duration), metric, h.get("rate"))


# ---------------------------------------------------------------- expansion

def _base_config(exp: Experiment) -> dict[str, Any]:
    cfg = SimConfig().to_dict()
    cfg["workload"] = default_workload()
    for k, v in exp.base.items():
        cfg[k] = copy.deepcopy(v)   # a workload given in base replaces the default whole
    return cfg


def _resolve_trace(cfg: dict, check_files: bool) -> None:
    w = cfg.get("workload")
    if isinstance(w, dict) and isinstance(w.get("trace"), (str, os.PathLike)):
        p = Path(w["trace"]).expanduser()
        full = p if p.is_absolute() else Path.cwd() / p
        if check_files and not full.is_file():
            raise ConfigError(f"workload.trace: no such file {str(w['trace'])!r} (relative paths are "
                              f"resolved against the current directory, {Path.cwd()})")
        w["trace"] = os.path.normpath(str(full))


_PROFILE_PP: dict[str, int] = {}


def validate_config(cfg: dict[str, Any], where: str, check_files: bool = True) -> dict[str, Any]:
    """SimConfig + workload spec + profile (+ pp) checks; returns the resolved SimConfig dict."""
    try:
        _resolve_trace(cfg, check_files)
        sc = SimConfig.from_dict(cfg)  # validates the workload too
        if check_files:
            if sc.profile not in _PROFILE_PP:
                _PROFILE_PP[sc.profile] = load_profile(sc.profile).pp
            pp = _PROFILE_PP[sc.profile]
            if sc.pp is not None and sc.pp != pp:
                raise ValueError(f"pp is {sc.pp} but profile {sc.profile!r} has pp={pp}")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None
    return sc.to_dict()


def expand(exp: Experiment, *, check_files: bool = True) -> list[Run]:
    """Every run of the sweep, validated, in order: policy entry, its param grid, then the grid
    axes (grid keys in order, then zip groups), the last axis varying fastest."""
    base = _base_config(exp)
    axes: list[list[dict[str, Any]]] = [[{k: v} for v in vals] for k, vals in exp.grid.items()]
    for z in exp.zips:
        n = len(next(iter(z.values())))
        axes.append([{k: vals[i] for k, vals in z.items()} for i in range(n)])
    x = exp.report.x
    tl_rate = timeline_rate(exp)
    runs: list[Run] = []
    for spec in exp.policies:
        for label, params in spec.variants():
            for combo in itertools.product(*axes):
                settings: dict[str, Any] = {}
                for part in combo:
                    settings.update(part)
                cfg = copy.deepcopy(base)
                for k, v in settings.items():
                    set_dotted(cfg, k, v)
                cfg["policy"], cfg["policy_params"] = spec.name, copy.deepcopy(params)
                where = f"run {len(runs)} ({describe_run(label, settings)})"
                resolved = validate_config(cfg, where, check_files)
                xv = settings.get(x) if x else None
                series = label + "".join(f", {k}={fmt_value(v)}" for k, v in settings.items() if k != x)
                keep = exp.artefacts or (tl_rate is not None and as_float(xv) == as_float(tl_rate)) \
                    or (x is None and _wants_traces(exp))
                runs.append(Run(len(runs), resolved, settings, spec.name, label, params, series, xv, keep))
    return runs


def describe_run(label: str, settings: Mapping[str, Any]) -> str:
    return ", ".join([label, *(f"{k}={fmt_value(v)}" for k, v in settings.items())])


def _wants_traces(exp: Experiment) -> bool:
    return any(p in exp.report.plots for p in ("timeline", "kv_queue", "cdf"))


def timeline_rate(exp: Experiment) -> Any:
    """The x value whose runs keep traces for the timeline, KV/queue and CDF plots: the
    configured one, else the finite x value just above the middle of the swept ones."""
    if not _wants_traces(exp) or exp.report.x is None:
        return None
    if exp.report.timeline_rate is not None:
        return exp.report.timeline_rate
    xs = [v for v in _x_values(exp) if math.isfinite(as_float(v))]
    if not xs:
        return None
    xs = sorted(xs, key=as_float)
    return xs[len(xs) // 2]


def _x_values(exp: Experiment) -> list:
    x = exp.report.x
    if x in exp.grid:
        return list(exp.grid[x])
    for z in exp.zips:
        if x in z:
            return list(z[x])
    return []


def capacity_groups(exp: Experiment, runs: list[Run]) -> list[tuple[str, Run]]:
    """(series name, a representative run) per distinct setting other than the capacity key."""
    assert exp.capacity is not None
    key = exp.capacity.key
    seen: dict[str, Run] = {}
    for r in runs:
        name = r.label + "".join(f", {k}={fmt_value(v)}" for k, v in r.settings.items() if k != key)
        seen.setdefault(name, r)
    return list(seen.items())


def probe_config(run: Run, key: str, value: float) -> dict[str, Any]:
    """The run's config with the capacity key set to `value` (scaling replaces nothing else)."""
    cfg = copy.deepcopy(run.config)
    w = cfg["workload"]
    if key.startswith("workload.arrival.") and "trace" in w:
        w.pop("time_scale", None)   # synthetic arrivals replace the trace's (lengths stay real)
        w.pop("rate_scale", None)
        w.setdefault("arrival", {"kind": "gamma", "rate": value, "burstiness": 1.0})
    set_dotted(cfg, key, value)
    return cfg


def max_throughput_config(run: Run) -> dict[str, Any]:
    """Every request at t=0 (rate inf): the usual max-throughput run."""
    cfg = copy.deepcopy(run.config)
    w = cfg["workload"]
    for k in ("time_scale", "rate_scale"):
        w.pop(k, None)
    w["arrival"] = {"kind": "all_at_once", "rate": "inf"}
    return cfg
