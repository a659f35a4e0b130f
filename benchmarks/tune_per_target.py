"""One `pipetwin tune` study per target of a tune config, instead of one setting for all.

    .venv/bin/python benchmarks/tune_per_target.py experiments/tune_code/tt.yaml experiments/tune_code/tb.yaml \
        [--trials 40] [--workers 2] [--out results/tune_per_target] [--targets h100_pp8 ...]

A config's targets (platforms or workloads) share one setting, scored by the mean or the
worst over them; a mean is led by the targets with the largest objective (H100 pp8's
capacities are 8x A100 pp4's on the code trace). Asking "is policy A better than policy B
on each target, each tuned for it" needs a study per target, with the same budget each.
Prints a markdown table: per target and config, the best objective and setting.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from experiments.tune import run_tune
from experiments.tune_config import parse_tune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", help="tune config files with a `targets` list")
    ap.add_argument("--trials", type=int, default=None, help="trials per study (default: each config's own)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="results/tune_per_target")
    ap.add_argument("--targets", nargs="+", metavar="NAME", help="only these targets (default: every one)")
    args = ap.parse_args()
    rows = []
    for path in args.configs:
        raw = yaml.safe_load(Path(path).read_text())
        targets = raw.get("targets")
        if not targets:
            ap.error(f"{path}: no `targets` to tune one by one")
        if args.targets:
            unknown = sorted(set(args.targets) - {t["name"] for t in targets})
            if unknown:
                ap.error(f"--targets {', '.join(unknown)}: not in {path} (it has {', '.join(t['name'] for t in targets)})")
            targets = [t for t in targets if t["name"] in args.targets]
        for target in targets:
            name = f"{raw.get('name', Path(path).stem)}__{target['name']}"
            spec = parse_tune({**raw, "name": name, "targets": [target]})
            res = run_tune(spec, Path(args.out) / name, workers=args.workers, trials=args.trials,
                           progress=False, plots=False, log=lambda _: None)
            rows.append((target["name"], spec.policy, res.best_value,
                         ", ".join(f"{k}={_short(v)}" for k, v in res.best_params.items())))
    print("| target | policy | best objective | setting |")
    print("| --- | --- | ---: | --- |")
    for target, policy, value, params in sorted(rows):
        print(f"| {target} | {policy} | {value:.4g} | {params} |")


def _short(v):
    return f"{v:.3g}" if isinstance(v, float) else v


if __name__ == "__main__":
    main()
