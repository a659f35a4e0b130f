"""What the commands share: the policy-parameter and table-format flag
types, the workload flags and the sim-style config (YAML file, then flags)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import yaml

from cli.errors import UsageError
from core.trace import TABLE_FORMATS
from sim.config import default_workload


def param(text: str) -> tuple[str, Any]:
    """--param KEY=VALUE (the value parsed as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"cannot parse the value of {text!r}") from None


def formats(text: str) -> tuple[str, ...]:
    """--formats csv,parquet."""
    fmts = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in fmts if f not in TABLE_FORMATS]
    if bad or not fmts:
        raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {','.join(TABLE_FORMATS)}, got {text!r}")
    return fmts


def add_workload_flags(p: argparse.ArgumentParser, rate_help: str) -> None:
    """The workload flags `sim`, `bench` and `bench serve` share."""
    p.add_argument("--trace", help="replay a trace CSV (arrived_at, num_prefill_tokens, num_decode_tokens)")
    p.add_argument("--rate", help=rate_help)
    p.add_argument("--burstiness", type=float, help="gamma shape of the arrival gaps (1 = Poisson)")
    p.add_argument("--num-requests", type=int, help="number of requests (with --trace: the first N rows)")
    p.add_argument("--seed", type=int)


def sim_config(args: argparse.Namespace) -> dict[str, Any]:
    """The SimConfig dict: YAML file, then flags."""
    d: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"config: no such file {args.config!r}")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UsageError(f"config {args.config}: not valid YAML: {e}") from None
        if not isinstance(d, dict):
            raise UsageError(f"config {args.config}: must be a mapping of SimConfig fields")
    for flag, key in (("profile", "profile"), ("pp", "pp"), ("policy", "policy"), ("seed", "seed"),
                      ("num_pages", "num_pages"), ("memory_fraction", "memory_fraction"),
                      ("page_size", "page_size"), ("time_limit", "time_limit")):
        if getattr(args, flag) is not None:
            d[key] = getattr(args, flag)
    if args.param:
        params = dict(d.get("policy_params") or {})
        params.update(dict(args.param))
        d["policy_params"] = params
    w = dict(d.get("workload") or default_workload())
    if args.trace is not None:
        if not Path(args.trace).is_file():
            raise UsageError(f"--trace: no such file {args.trace!r} (relative to {Path.cwd()})")
        w = {"trace": str(Path(args.trace).resolve())}
    if args.rate is not None:
        rate: Any = args.rate
        try:
            rate = float(rate)
        except ValueError:
            raise UsageError(f"--rate must be a number > 0 or inf, got {args.rate!r}") from None
        if math.isinf(rate) and rate < 0:
            raise UsageError(f"--rate must be a number > 0 or inf, got {args.rate!r}")
        if math.isinf(rate):
            rate = "inf"
        if "trace" in w:
            w.pop("time_scale", None)
            w.pop("rate_scale", None)
        w["arrival"] = {**(w.get("arrival") or {"kind": "gamma"}), "rate": rate}
    if args.burstiness is not None:
        if "arrival" not in w:
            raise UsageError("--burstiness shapes synthetic arrivals; with a trace give --rate too")
        w["arrival"] = {**w["arrival"], "burstiness": args.burstiness}
    if args.num_requests is not None:
        w["limit" if "trace" in w else "num_requests"] = args.num_requests
    d["workload"] = w
    return d
