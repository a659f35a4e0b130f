"""What every experiment-style config (sweep, tune) checks with: the SimConfig key tree a
dotted key may name, key and number checks, dotted get/set and the YAML reader (no
simulator, no pandas). ConfigError lives in experiments/errors.py and is importable from here."""
from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Any, Mapping

import yaml

from core import validation
from core.validation import suggest
from experiments.errors import ConfigError

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


def check_tree(d: Any, node: dict, where: str) -> None:
    """Walk a base mapping against SCHEMA so nested unknown keys are named with their path."""
    if not isinstance(d, Mapping):
        return  # the value check (SimConfig) reports the wrong type
    for k, v in d.items():
        if k not in node:
            raise ConfigError(f"{where}: unknown key {k!r}{suggest(k, list(node))} "
                              f"(allowed: {', '.join(node)})")
        if isinstance(node[k], dict) and isinstance(v, Mapping):
            check_tree(v, node[k], f"{where}.{k}")


def values_list(v: Any, where: str, distinct: bool = False) -> list:
    """A non-empty list; `distinct` (a grid axis): no value twice, which would only run a
    point twice (a zip column may repeat: its points pair with the other columns')."""
    if not isinstance(v, list) or not v:
        raise ConfigError(f"{where} must be a non-empty list of values, got {v!r}")
    if distinct:
        twice = [x for i, x in enumerate(v) if any(x == y for y in v[:i])]
        if twice:
            raise ConfigError(f"{where} lists {twice[0]!r} more than once: a grid axis takes distinct values")
    return v


def number(d: Mapping, key: str, where: str, default: Any, *, low: float | None = None,
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


def read_yaml(path: Path, what: str) -> Any:
    """A config file's YAML, or a ConfigError naming the file (`what`: the kind of config)."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def name_and_description(d: Mapping, default_name: str) -> tuple[str, str]:
    """A config's `name` (it names the results folder: no '/') and `description`."""
    name = d.get("name", default_name)
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"name must be a non-empty string without '/', got {name!r}")
    description = d.get("description", "") or ""
    if not isinstance(description, str):
        raise ConfigError(f"description must be a string, got {description!r}")
    return name, description


class AnyKey(tuple):
    """`check_keys` allowed-set that accepts every key (dotted keys are checked separately)."""
    def __contains__(self, item: object) -> bool:
        return True
