"""Tune configs: load, validate every key and value (errors name the field, as
experiments/config.py's do), resolve the targets.

Schema (YAML):

    name: tune_tt                 # optional; default: the file's stem (also the output folder)
    description: free text
    policy: token_throttling      # a policy name or dotted path
    fixed: {maxd: null}           # policy params held constant (optional)
    params:                       # the search space: one entry per tuned policy param
      maxp: {type: int, low: 256, high: 8192, log: true}
      minp: {type: int, low: 0, high: 512, step: 32}
      kvthresh: {type: float, low: 0.0, high: 0.3}
      requeue_chunks: {type: categorical, choices: [false, true]}
    constraints: ["minp <= maxp"] # PARAM OP PARAM|NUMBER, OP in <, <=, >, >=; a trial that
                                  #   breaks one is not simulated and scores `infeasible`
    base: {profile: ..., workload: {...}, seed: 0}   # SimConfig fields, as a sweep's base
    targets:                      # optional: several workloads/platforms, each dotted keys over base
      - {name: a100, profile: qwen2.5-32b_a100-80gb_pp4}
      - {name: h100, profile: qwen2.5-32b_h100-80gb_pp4}
    objective:
      kind: capacity              # capacity | goodput | throughput | mix
      rate: 4.0                   # goodput, throughput: the offered rate (req/s) of the run
      weights: {capacity: 1.0, goodput: 0.5}   # mix: weighted sum of the other kinds
      aggregate: mean             # over the targets: mean | worst | geomean (scale-free)
    capacity: {lo: 0.5, hi: 8.5, tol: 0.125, slo: {ttft_p99: 5.0}, sustain: 0.05, max_throughput: true}
    trials: 100
    seed: 0                       # TPE's seed: same file + seed = same trials
    batch: 8                      # trials drawn together and run in parallel (part of what
                                  #   the trials are: not tied to the machine's cores)
    startup_trials: 10            # random trials before TPE models the results
    first_trials:                 # optional: settings tried first, in order (a grid's best, the
      - {maxp: 2048, minp: 32}    #   defaults); a tuned param left out is drawn as usual

Goodput uses the SimConfig `slo` (per-request ttft/tpot/e2e, in base or a target): an
objective `goodput` without one is an error.
"""
from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from core.policies import policy_class, policy_params
from core.validation import suggest
from experiments.config import parse_capacity
from experiments.config_keys import (SCHEMA, ConfigError, check_dotted, check_keys, check_tree, name_and_description,
                                     read_yaml, set_dotted)
from experiments.expand import describe_run, validate_config
from experiments.spec import CapacitySpec, Run
from sim.config import SimConfig, default_workload

TOP_KEYS = ("name", "description", "policy", "fixed", "params", "constraints", "base", "targets",
            "objective", "capacity", "trials", "seed", "batch", "startup_trials", "first_trials")
PARAM_TYPES = ("int", "float", "categorical")
PARAM_KEYS = {"int": ("type", "low", "high", "log", "step"), "float": ("type", "low", "high", "log", "step"),
              "categorical": ("type", "choices")}
OBJECTIVE_KEYS = ("kind", "rate", "weights", "aggregate")
KINDS = ("capacity", "goodput", "throughput", "mix")
AGGREGATES = ("mean", "worst", "geomean")
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w]*|-?[\d.]+(?:e-?\d+)?)\s*(<=|>=|<|>)\s*([A-Za-z_][\w]*|-?[\d.]+(?:e-?\d+)?)\s*$")


@dataclass
class ParamSpec:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)

    def suggest(self, trial: Any) -> Any:
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        if self.type == "float":
            return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log,
                                       step=self.step)
        return trial.suggest_categorical(self.name, self.choices)


@dataclass
class Constraint:
    text: str
    left: str | float
    op: str
    right: str | float

    def holds(self, params: Mapping[str, Any]) -> bool:
        a = params[self.left] if isinstance(self.left, str) else self.left
        b = params[self.right] if isinstance(self.right, str) else self.right
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[self.op]


@dataclass
class Objective:
    kind: str
    rate: float | None
    weights: dict[str, float]
    aggregate: str

    def terms(self) -> dict[str, float]:
        """kind -> weight of every term of the objective."""
        return dict(self.weights) if self.kind == "mix" else {self.kind: 1.0}


@dataclass
class Target:
    name: str
    config: dict[str, Any]        # resolved SimConfig dict, policy params left at `fixed`


@dataclass
class TuneSpec:
    name: str
    description: str
    policy: str
    fixed: dict[str, Any]
    params: list[ParamSpec]
    constraints: list[Constraint]
    targets: list[Target]
    objective: Objective
    capacity: CapacitySpec | None
    trials: int
    seed: int
    batch: int
    startup_trials: int
    first_trials: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def run_for(self, target: Target, params: Mapping[str, Any], index: int = 0) -> Run:
        """The sweep Run of one trial on one target (what the runner and capacity search take)."""
        cfg = copy.deepcopy(target.config)
        cfg["policy_params"] = {**self.fixed, **params}
        return Run(index, cfg, {}, self.policy, f"{self.policy} {target.name}", dict(cfg["policy_params"]),
                   target.name)


def load_tune(path: str | os.PathLike) -> TuneSpec:
    """Read and validate a tune YAML (every target resolved and checked)."""
    path = Path(path)
    raw = read_yaml(path, "tune config")
    try:
        spec = parse_tune(raw or {}, default_name=path.stem)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    spec.source = str(path)
    return spec


def _int(d: Mapping, key: str, default: int, low: int) -> int:
    v = d.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ConfigError(f"{key} must be an int >= {low}, got {v!r}")
    return v


def parse_tune(raw: Any, default_name: str = "tune", check_files: bool = True) -> TuneSpec:
    d = dict(check_keys(raw, TOP_KEYS, "tune config"))
    name, description = name_and_description(d, default_name)
    policy = d.get("policy")
    if not isinstance(policy, str):
        raise ConfigError(f"policy is required (a policy name or dotted path), got {policy!r}")
    try:
        allowed = policy_params(policy_class(policy))
    except ValueError as e:
        raise ConfigError(f"policy: {e}") from None
    fixed = dict(check_keys(d.get("fixed"), list(allowed), "fixed"))
    params = _parse_params(d.get("params"), allowed, fixed)
    constraints = _parse_constraints(d.get("constraints"), [p.name for p in params])
    base = dict(check_keys(d.get("base"), tuple(SCHEMA), "base"))
    check_tree(base, SCHEMA, "base")
    targets = _parse_targets(d.get("targets"), base, policy, fixed, params, check_files)
    objective = _parse_objective(d.get("objective"))
    capacity = None
    if "capacity" in objective.terms():
        capacity = parse_capacity(d.get("capacity"), base, [])
        if not capacity.slo:
            raise ConfigError("capacity.slo: the capacity objective needs at least one SLO, e.g. "
                              "{ttft_p99: 5.0, tpot_p99: 0.25}")
    elif d.get("capacity") is not None:
        raise ConfigError(f"capacity: only used by a capacity objective (objective.kind is {objective.kind!r})")
    if "goodput" in objective.terms():
        for t in targets:
            if not any(v is not None for v in (t.config.get("slo") or {}).values()):
                raise ConfigError(f"targets {t.name!r}: objective goodput needs a request SLO: set base.slo "
                                  "(or the target's slo), e.g. {ttft: 5.0, tpot: 0.25}")
    trials = _int(d, "trials", 100, 1)
    seed = _int(d, "seed", 0, 0)
    batch = _int(d, "batch", 8, 1)
    startup = _int(d, "startup_trials", 10, 0)
    first = _parse_first_trials(d.get("first_trials"), params)
    return TuneSpec(name, description, policy, fixed, params, constraints, targets, objective, capacity,
                    trials, seed, batch, startup, first, raw=copy.deepcopy(d))


def _parse_first_trials(raw: Any, params: list[ParamSpec]) -> list[dict[str, Any]]:
    """Settings to try first: each a mapping of tuned params to values inside their ranges
    (a value outside would be a trial the search could never draw)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"first_trials must be a list of {{param: value}} mappings, got {raw!r}")
    by_name = {p.name: p for p in params}
    out = []
    for i, entry in enumerate(raw):
        where = f"first_trials[{i}]"
        entry = dict(check_keys(entry, list(by_name), where))
        for name, v in entry.items():
            p = by_name[name]
            if p.type == "categorical":
                ok, allowed = v in p.choices and any(type(v) is type(c) for c in p.choices if c == v), \
                    f"one of {p.choices}"
            else:
                kind = int if p.type == "int" else (int, float)
                ok = isinstance(v, kind) and not isinstance(v, bool) and p.low <= v <= p.high
                allowed = f"{'an int' if p.type == 'int' else 'a number'} in [{p.low}, {p.high}]"
            if not ok:
                raise ConfigError(f"{where}.{name} must be {allowed} (params.{name}), got {v!r}")
        out.append(entry)
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_params(raw: Any, allowed: Mapping[str, Any], fixed: Mapping[str, Any]) -> list[ParamSpec]:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError("params must be a non-empty mapping of policy parameter -> "
                          "{type: int|float|categorical, ...}")
    out = []
    for pname, p in raw.items():
        where = f"params.{pname}"
        if pname not in allowed:
            raise ConfigError(f"params: unknown parameter {pname!r}{suggest(pname, allowed)} "
                              f"(parameters of this policy: {', '.join(allowed)})")
        if pname in fixed:
            raise ConfigError(f"{where}: also in fixed; a parameter is either tuned or fixed")
        if not isinstance(p, Mapping):
            raise ConfigError(f"{where} must be a mapping {{type, low, high, ...}} or {{type: categorical, "
                              f"choices: [...]}}, got {p!r}")
        kind = p.get("type")
        if kind not in PARAM_TYPES:
            raise ConfigError(f"{where}.type must be one of {', '.join(PARAM_TYPES)}, got {kind!r}")
        check_keys(p, PARAM_KEYS[kind], where)
        if kind == "categorical":
            choices = p.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}.choices must be a non-empty list, got {choices!r}")
            if any(not (c is None or isinstance(c, (bool, int, float, str))) for c in choices):
                raise ConfigError(f"{where}.choices: values must be null, bools, numbers or strings")
            out.append(ParamSpec(pname, kind, choices=list(choices)))
            continue
        low, high, log, step = p.get("low"), p.get("high"), p.get("log", False), p.get("step")
        for k, v in (("low", low), ("high", high)):
            if not _number(v) or (kind == "int" and not isinstance(v, int)):
                raise ConfigError(f"{where}.{k} must be a finite {'int' if kind == 'int' else 'number'}, got {v!r}")
        if not low < high:
            raise ConfigError(f"{where}.high must be > low ({low!r}), got {high!r}")
        if not isinstance(log, bool):
            raise ConfigError(f"{where}.log must be true or false, got {log!r}")
        if log and low <= 0:
            raise ConfigError(f"{where}.low must be > 0 with log: true, got {low!r}")
        if step is not None:
            if not _number(step) or step <= 0 or (kind == "int" and not isinstance(step, int)):
                raise ConfigError(f"{where}.step must be a {'positive int' if kind == 'int' else 'number > 0'}, got {step!r}")
            if log:
                raise ConfigError(f"{where}: step and log: true cannot be combined")
        out.append(ParamSpec(pname, kind, low, high, log, step))
    return out


def _parse_constraints(raw: Any, names: list[str]) -> list[Constraint]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"constraints must be a list of strings like 'minp <= maxp', got {raw!r}")
    out = []
    for i, text in enumerate(raw):
        m = _CONSTRAINT.match(text) if isinstance(text, str) else None
        if m is None:
            raise ConfigError(f"constraints[{i}]: expected 'PARAM OP PARAM' or 'PARAM OP NUMBER' with OP one of "
                              f"<, <=, >, >=, got {text!r}")
        sides: list[str | float] = []
        for side in (m.group(1), m.group(3)):
            if re.match(r"^[A-Za-z_]", side):
                if side not in names:
                    raise ConfigError(f"constraints[{i}]: {side!r} is not a tuned parameter{suggest(side, names)} "
                                      f"(tuned: {', '.join(names)})")
                sides.append(side)
            else:
                sides.append(float(side))
        if not any(isinstance(s, str) for s in sides):
            raise ConfigError(f"constraints[{i}]: {text!r} names no tuned parameter")
        out.append(Constraint(text.strip(), sides[0], m.group(2), sides[1]))
    return out


def _parse_targets(raw: Any, base: dict, policy: str, fixed: dict, params: list[ParamSpec],
                   check_files: bool) -> list[Target]:
    cfg0 = SimConfig().to_dict()
    cfg0["workload"] = default_workload()
    for k, v in base.items():
        cfg0[k] = copy.deepcopy(v)
    entries = [{}] if raw is None else raw
    if not isinstance(entries, list) or not entries:
        raise ConfigError("targets must be a non-empty list of {name?, dotted.key: value, ...}")
    out, names = [], set()
    for i, entry in enumerate(entries):
        where = f"targets[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a mapping of dotted keys (e.g. profile, workload.arrival.rate)")
        entry = dict(entry)
        tname = entry.pop("name", f"target{i}" if raw is not None else "base")
        if not isinstance(tname, str) or not tname or tname in names:
            raise ConfigError(f"{where}.name must be a unique non-empty string, got {tname!r}")
        names.add(tname)
        cfg = copy.deepcopy(cfg0)
        for k, v in entry.items():
            check_dotted(k, where)
            set_dotted(cfg, k, v)
        cfg["policy"] = policy
        # checked with every tuned parameter at its low end (or first choice): names and types
        probe = {p.name: (p.choices[0] if p.type == "categorical" else
                          int(p.low) if p.type == "int" else float(p.low)) for p in params}
        cfg["policy_params"] = {**fixed, **probe}
        resolved = validate_config(cfg, f"{where} ({describe_run(tname, entry)})", check_files)
        resolved["policy_params"] = dict(fixed)
        out.append(Target(tname, resolved))
    return out


def _parse_objective(raw: Any) -> Objective:
    o = dict(check_keys(raw if raw is not None else {"kind": "capacity"}, OBJECTIVE_KEYS, "objective"))
    kind = o.get("kind", "capacity")
    if kind not in KINDS:
        raise ConfigError(f"objective.kind must be one of {', '.join(KINDS)}, got {kind!r}{suggest(kind, KINDS)}")
    aggregate = o.get("aggregate", "mean")
    if aggregate not in AGGREGATES:
        raise ConfigError(f"objective.aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    weights: dict[str, float] = {}
    if kind == "mix":
        w = check_keys(o.get("weights"), ("capacity", "goodput", "throughput"), "objective.weights")
        if not w:
            raise ConfigError("objective.weights: a mix needs weights, e.g. {capacity: 1.0, goodput: 0.5}")
        for k, v in w.items():
            if not _number(v) or v == 0:
                raise ConfigError(f"objective.weights.{k} must be a non-zero number, got {v!r}")
        weights = {k: float(v) for k, v in w.items()}
    elif "weights" in o:
        raise ConfigError(f"objective.weights: only for kind mix (kind is {kind!r})")
    terms = weights if kind == "mix" else {kind: 1.0}
    rate = o.get("rate")
    if any(t in terms for t in ("goodput", "throughput")):
        if not _number(rate) or rate <= 0:
            raise ConfigError(f"objective.rate: goodput and throughput are measured at an offered rate; "
                              f"give a number > 0 (req/s), got {rate!r}")
    elif rate is not None:
        raise ConfigError("objective.rate: only for goodput and throughput objectives")
    return Objective(kind, None if rate is None else float(rate), weights, aggregate)


def read_policy_setting(path: str | os.PathLike, where: str) -> tuple[str, dict[str, Any]]:
    """(policy, policy_params) from a YAML of {policy, policy_params} (a tune's best.yaml, or
    any `pipetwin sim` config's two policy keys); errors name `where` and the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{where}: no such file {str(path)!r} (relative to {Path.cwd()})")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: {path} is not valid YAML: {e}") from None
    if not isinstance(d, Mapping) or not isinstance(d.get("policy"), str):
        raise ConfigError(f"{where}: {path} must be a mapping with policy (and policy_params), like a tune's best.yaml")
    params = d.get("policy_params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}: {path}: policy_params must be a mapping, got {params!r}")
    return d["policy"], dict(params)
