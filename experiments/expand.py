"""A parsed sweep expanded into resolved runs: every run's SimConfig validated (workload,
trace file, profile and pp) before any starts; the run that keeps traces for the
timeline plots; the capacity search's series and probe configs."""
from __future__ import annotations

import copy
import itertools
import math
import os
from pathlib import Path
from typing import Any, Mapping

from experiments.config_keys import ConfigError, as_float, fmt_value, set_dotted
from experiments.spec import Experiment, Run
from profiles import load_profile
from sim.config import SimConfig, default_workload

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
