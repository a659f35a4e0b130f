"""`pipetwin plot`: regenerate a sweep's plots and report."""
from __future__ import annotations

import argparse
from pathlib import Path

from cli.errors import UsageError
from experiments.config import load_experiment


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="a sweep's results folder (holds sweep.yaml and results.csv)")
    p.add_argument("--out", help="folder for the plots (default RESULTS/plots)")


def run(args: argparse.Namespace) -> int:

    from experiments.report import make_report  # why: matplotlib, only for this command

    folder = Path(args.results)
    if not (folder / "sweep.yaml").is_file():
        raise UsageError(f"{folder}: not a sweep results folder (no sweep.yaml)")
    exp = load_experiment(folder / "sweep.yaml", check_files=False)
    exp.source = str(folder / "sweep.yaml")
    report = make_report(folder, exp, args.out)
    print(f"plots in {args.out or folder / 'plots'}; report: {report}")
    return 0
