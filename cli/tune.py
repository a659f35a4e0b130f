"""`pipetwin tune`: search a policy's parameters in the simulator (Optuna; experiments/tune.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from cli.common import UsageError
from cli.executor import add_executor_flags, executor_from

HELP = "search a policy's parameters in the simulator (Optuna TPE, resumable), best setting as YAML"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="tune YAML (see experiments/tune_tt.yaml)")
    p.add_argument("--out", help="results folder (default results/<name>); holds the study: rerun to resume")
    p.add_argument("--trials", type=int, help="trials in all (default: the file's `trials`)")
    p.add_argument("--workers", type=int, help="worker processes (default: all cores; with --executor ray: "
                                               "the local Ray's CPUs)")
    p.add_argument("--no-cache", action="store_true", help="recompute every simulation (the cache is rewritten)")
    add_executor_flags(p)


def run(args: argparse.Namespace) -> int:
    from experiments.tune import require_optuna, run_tune   # why: pandas and optuna load when a tune runs
    from experiments.tune_config import load_tune   # why: the sim config stack, for this command only

    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.trials is not None and args.trials < 1:
        raise UsageError(f"--trials must be >= 1, got {args.trials}")
    require_optuna()
    spec = load_tune(args.file)
    out = Path(args.out) if args.out else Path("results") / spec.name
    executor = executor_from(args)
    names = ", ".join(p.name for p in spec.params)
    print(f"{spec.name}: {spec.policy} over {names}; objective {spec.objective.kind} "
          f"({spec.objective.aggregate} over {len(spec.targets)} target(s)); "
          f"{args.trials or spec.trials} trials in batches of {spec.batch}, seed {spec.seed}; study in {out / 'study.db'}")
    res = run_tune(spec, out, executor=executor, workers=args.workers, trials=args.trials,
                   use_cache=not args.no_cache)
    print(f"{len(res.trials)} trials, {res.computed} simulations computed, {res.cached} from cache, {res.wall_s:.1f} s")
    print(f"best: trial {res.best_trial}, objective {res.best_value:.4g}: "
          + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.best_params.items()))
    print(f"best setting: {out / 'best.yaml'}")
    print(f"report:       {out / 'tune_report.md'}")
    return 0
