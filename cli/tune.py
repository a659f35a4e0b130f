"""`pipetwin tune`: search a policy's parameters in the simulator (Optuna; experiments/tune.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from cli.errors import UsageError
from cli.executor import add_executor_flags, executor_from


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="tune YAML (see experiments/tune_tt.yaml)")
    p.add_argument("--out", help="results folder (default results/<name>); holds the study: rerun to resume")
    p.add_argument("--trials", type=int, help="trials in all (default: the file's `trials`)")
    p.add_argument("--workers", type=int, help="worker processes (default: all cores; with --executor ray: "
                                               "the local Ray's CPUs)")
    p.add_argument("--no-cache", action="store_true", help="recompute every simulation (the cache is rewritten)")
    p.add_argument("--validate", metavar="VALIDATE_YAML",
                   help="after the search, run the tuned setting and the policy's defaults on the real runtime "
                        "through this validate config (its model, pp, workload, loads; its policies are replaced) "
                        "and say whether the hardware agrees")
    add_executor_flags(p)


def run(args: argparse.Namespace) -> int:
    from experiments.tune import require_optuna, run_tune   # why: pandas and optuna load when a tune runs
    from experiments.tune_config import load_tune   # why: the sim config stack, for this command only

    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.trials is not None and args.trials < 1:
        raise UsageError(f"--trials must be >= 1, got {args.trials}")
    if args.validate is not None and not Path(args.validate).is_file():   # before a long search, not after
        raise UsageError(f"--validate {args.validate}: no such validation config")
    require_optuna()
    spec = load_tune(args.file)
    out = Path(args.out) if args.out else Path("results") / spec.name
    if args.validate is not None:   # the whole validate config, before a long search, not after
        from twin.tune_validate import check_tune_validation   # why: the runtime's config checks
        try:
            check_tune_validation(args.validate, spec.policy, out,
                                  {str(t.config.get("profile")) for t in spec.targets})
        except (OSError, ValueError) as e:
            raise UsageError(str(e)) from None
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
    if args.validate is not None:
        validate_tuned(args.validate, out)
    return 0


def validate_tuned(validate_file: str, out: Path) -> None:
    # why: torch and the runtime load only when the hardware side runs
    from twin.tune_validate import summary_lines, tune_validation_config
    from twin.validate.run import run_validation   # why: as above

    try:
        cfg = tune_validation_config(validate_file, out, out / "best.yaml")
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    print(f"validating on the runtime: {cfg.source} -> {cfg.out}")
    res = run_validation(cfg, log=print)
    print(res.table_text)
    print("\n".join(summary_lines(res.errors, res.ranking)))
    print(f"validate report: {res.report}")
