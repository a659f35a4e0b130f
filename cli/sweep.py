"""`pipetwin sweep`: run an experiment grid (cached, parallel), capacity search, plots, report."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from cli.errors import UsageError
from cli.executor import add_executor_flags, executor_from
from experiments.config import load_experiment
from experiments.expand import capacity_groups, expand
from experiments.runner import iter_preview, run_sweep


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="experiment YAML (see experiments/gllm_vs_sarathi.yaml)")
    p.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    p.add_argument("--out", help="results folder (default results/<config stem>)")
    p.add_argument("--no-cache", action="store_true", help="recompute every run (the cache is rewritten)")
    p.add_argument("--dry-run", action="store_true", help="validate, print the run count and the first runs")
    add_executor_flags(p)


def run(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    exp = load_experiment(args.file)
    out = Path(args.out) if args.out else Path("results") / exp.name
    runs = expand(exp)
    print(f"{exp.name}: {len(runs)} runs ({len({r.label for r in runs})} policy variants x "
          f"{len(runs) // max(1, len({r.label for r in runs}))} settings)"
          + (f"; capacity search for {len(capacity_groups(exp, runs))} series (<= {exp.capacity.probes()} "
             f"probes each{', + max throughput' if exp.capacity.max_throughput else ''})" if exp.capacity else ""))
    if args.dry_run:
        for line in iter_preview(runs):
            print(line)
        print("first run, resolved:")
        print("  " + yaml.safe_dump(runs[0].config, sort_keys=False).replace("\n", "\n  ").rstrip())
        return 0
    executor = executor_from(args)
    t0 = time.perf_counter()
    res = run_sweep(exp, out, workers=args.workers, use_cache=not args.no_cache, executor=executor)
    print(f"{res.computed} runs computed, {res.cached} from cache, {time.perf_counter() - t0:.1f} s")
    print(f"results: {out / 'results.csv'}")
    print(f"report:  {res.report}")
    return 0
