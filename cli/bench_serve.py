"""`pipetwin bench serve`: load-test an OpenAI-compatible server (twin/bench_serve.py)."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from cli.bench import BENCH_KEYS
from cli.common import add_workload_flags, formats, sim_config
from cli.errors import UsageError
from core.metrics import summarize
from core.validation import check_keys
from core.workloads import Workload
from twin import bench_serve as bs
from twin.results import write_results


def bench_serve_config(args: argparse.Namespace) -> dict[str, Any]:
    """{"url", "model", "workload", "seed", "max_concurrency", "ignore_eos", "slo"} from a YAML and flags."""
    for name in ("profile", "pp", "policy", "num_pages", "memory_fraction", "page_size", "time_limit"):
        setattr(args, name, None)
    args.param = []
    d = sim_config(args)
    check_keys(d, BENCH_KEYS, "the bench serve config")
    w = dict(d["workload"])
    for flag, key in (("--input-len", "input_len"), ("--output-len", "output_len")):
        v = getattr(args, key)
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be an integer >= 1, got {v}")
    if not 0 <= args.range_ratio < 1:
        raise UsageError(f"--range-ratio must be in [0, 1), got {args.range_ratio}")
    for key, flag, name in (("prompt_len", "--input-len", "input_len"), ("output_len", "--output-len", "output_len")):
        v = getattr(args, name)
        if v is None:
            continue
        lo, hi = max(1, round(v * (1 - args.range_ratio))), round(v * (1 + args.range_ratio))
        w[key] = {"kind": "fixed", "value": v} if lo == hi else {"kind": "uniform", "low": lo, "high": hi}
    seed = d.get("seed", 0)
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise UsageError(f"--seed must be an integer >= 0, got {seed!r}")
    try:
        Workload.from_dict({**w, "seed": seed})
    except (ValueError, TypeError) as e:
        raise UsageError(f"workload: {e}") from None
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise UsageError(f"--max-concurrency must be an integer >= 1, got {args.max_concurrency}")
    if not args.stats_every > 0:
        raise UsageError(f"--stats-every must be > 0 seconds, got {args.stats_every}")
    slo = {}
    for key in ("ttft", "tpot", "e2e"):
        v = getattr(args, f"{key}_slo")
        if v is not None:
            if not (math.isfinite(v) and v > 0):
                raise UsageError(f"--{key}-slo must be a number of milliseconds > 0, got {v}")
            slo[key] = v / 1e3
    if not args.url.startswith(("http://", "https://")):
        raise UsageError(f"--url must start with http:// or https://, got {args.url!r}")
    return {"url": args.url, "model": args.model, "workload": w, "seed": seed,
            "max_concurrency": args.max_concurrency, "ignore_eos": args.ignore_eos, "slo": slo}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML file with `workload` and `seed` (a `pipetwin bench` config "
                                             "works; its other keys are the server's business)")
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="model name to request (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("PIPETWIN_API_KEY") or None,
                   help="Bearer token for a server started with --api-key (default: $PIPETWIN_API_KEY)")
    add_workload_flags(p, "request rate in req/s, or inf (all at once)")
    p.add_argument("--input-len", type=int, help="synthetic prompt length (mean with --range-ratio)")
    p.add_argument("--output-len", type=int, help="synthetic output length (mean with --range-ratio)")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)] (default 0: fixed)")
    p.add_argument("--max-concurrency", type=int, help="most requests in flight at once (default: no limit)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly max_tokens (default on; --no-ignore-eos stops at EOS)")
    p.add_argument("--ttft-slo", type=float, metavar="MS", help="goodput SLO on TTFT, milliseconds")
    p.add_argument("--tpot-slo", type=float, metavar="MS", help="goodput SLO on TPOT, milliseconds")
    p.add_argument("--e2e-slo", type=float, metavar="MS", help="goodput SLO on E2E latency, milliseconds")
    p.add_argument("--stats-every", type=float, default=0.25, metavar="S",
                   help="poll the server's stats every S seconds for the samples table (default 0.25)")
    p.add_argument("--out", help="results folder (default results/bench_serve/<model>_r<rate>)")
    p.add_argument("--formats", type=formats, default=("csv",), help="trace tables: csv,parquet (default csv)")


def run(args: argparse.Namespace) -> int:
    d = bench_serve_config(args)
    try:
        trace, outcomes = bs.run(d["url"], d["workload"], d["seed"], model=d["model"],
                                 max_concurrency=d["max_concurrency"], ignore_eos=d["ignore_eos"],
                                 stats_every_s=args.stats_every, api_key=args.api_key, log=print)
    except bs.ServeBenchError as e:
        raise UsageError(str(e)) from None
    summary = summarize(trace, d["slo"] or None)
    summary["wall_s"] = trace.meta["wall_s"]
    print(bs.report(summary, outcomes, d["slo"]))
    rate = (d["workload"].get("arrival") or {}).get("rate", "trace")
    name = str(trace.meta.get("model") or "server").replace("dummy:", "").replace("/", "_")[:40]
    out = Path(args.out) if args.out else Path("results") / "bench_serve" / f"{name}_r{rate}"
    config = {**d, "server": {k: trace.meta.get(k) for k in ("pp", "policy", "policy_params", "num_pages",
                                                             "page_size")}}
    write_results(out, trace, summary, config, formats=args.formats)
    print(f"results in {out}/ (perfetto.json opens in ui.perfetto.dev)")
    return 0 if all(o.ok for o in outcomes) else 1
