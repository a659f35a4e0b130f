"""`pipetwin bench`: the real runtime on a workload, written as a results folder like `sim`'s."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cli.common import add_workload_flags, formats, param, sim_config
from cli.errors import UsageError
from core.metrics import format_summary, summarize
from core.policies import make_policy
from core.validation import check_keys
from core.workloads import Workload
from runtime.engine_args import add_engine_args, check_engine_values
from twin.bench import Bench
from twin.results import write_results
from twin.workload import workload_requests


BENCH_KEYS = ("model", "pp", "policy", "policy_params", "workload", "seed", "num_pages", "page_size",
               "layer_split", "threads", "device", "dtype", "attention_backend", "enforce_eager")


def bench_config(args: argparse.Namespace) -> dict[str, Any]:
    """The bench config dict: YAML file, then flags (workload flags as `pipetwin sim`'s)."""
    for name in ("profile", "memory_fraction", "time_limit"):   # sim-only fields of sim_config
        setattr(args, name, None)
    d = sim_config(args)
    check_keys({k: v for k, v in d.items()}, BENCH_KEYS, "the bench config")
    for flag, key in (("model", "model"), ("layer_split", "layer_split"), ("threads", "threads"),
                      ("device", "device"), ("dtype", "dtype"), ("attention_backend", "attention_backend"),
                      ("enforce_eager", "enforce_eager")):
        if getattr(args, flag) is not None:
            d[key] = getattr(args, flag)
    if not d.get("model"):
        raise UsageError("--model is required (or `model:` in the config)")
    d.setdefault("pp", 1)
    d.setdefault("policy", "token_throttling")
    d.setdefault("policy_params", {})
    d.setdefault("seed", 0)
    d.setdefault("num_pages", None)
    d.setdefault("page_size", 16)
    d.setdefault("device", "cpu")
    d.setdefault("dtype", None)
    try:
        check_engine_values(d)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        make_policy(d["policy"], d["policy_params"])
    except (ValueError, TypeError) as e:
        raise UsageError(f"--policy/--param: {e}") from None
    try:
        Workload.from_dict({**d["workload"], "seed": d["seed"]})
    except (ValueError, TypeError) as e:
        raise UsageError(f"workload: {e}") from None
    return d


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML file (model, pp, policy, policy_params, workload, seed, "
                                             "num_pages, page_size, layer_split, threads, device, dtype); flags "
                                             "override it")
    add_engine_args(p, defaults=False, seed=False)   # the workload flags have --seed
    p.add_argument("--policy", help="token_throttling | sarathi | vllm | time_balanced | dotted.path.Class")
    p.add_argument("--param", type=param, action="append", default=[], metavar="KEY=VALUE",
                   help="policy parameter (repeatable); values parsed as YAML")
    add_workload_flags(p, "request rate in req/s, or inf")
    p.add_argument("--out", help="results folder (default results/bench/<policy>_<model>)")
    p.add_argument("--formats", type=formats, default=("csv",), help="trace tables: csv,parquet (default csv)")


def run(args: argparse.Namespace) -> int:
    d = bench_config(args)
    requests = workload_requests(d["workload"], d["seed"])
    with Bench(d["model"], d["pp"], d["policy"], d["policy_params"], num_pages=d["num_pages"],
               page_size=d["page_size"], layer_split=d.get("layer_split"), num_threads=d.get("threads"),
               seed=d["seed"], device=d["device"], dtype=d["dtype"],
               attention_backend=d.get("attention_backend", "auto"),
               enforce_eager=bool(d.get("enforce_eager", False))) as bench:
        trace = bench.run(requests, d["policy"], d["policy_params"], seed=d["seed"])
        d["num_pages"] = bench.num_pages
    summary = summarize(trace)
    summary["wall_s"] = trace.meta["wall_s"]
    print(f"runtime: model {trace.meta['model']}, pp={d['pp']}, policy {d['policy']} "
          f"{json.dumps(d['policy_params'])}; {d['num_pages']} KV pages; {len(requests)} requests in "
          f"{trace.meta['wall_s']:.1f} s")
    print(format_summary(summary))
    name = str(trace.meta["model"]).replace("dummy:", "").replace("/", "_")[:40]
    out = Path(args.out) if args.out else Path("results") / "bench" / f"{d['policy']}_{name}"
    write_results(out, trace, summary, d, formats=args.formats)
    print(f"results in {out}/ (perfetto.json opens in ui.perfetto.dev)")
    return 0
