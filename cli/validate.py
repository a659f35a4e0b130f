"""`pipetwin validate`: simulator against runtime on the same workloads (twin/validate/)."""
from __future__ import annotations

import argparse

from twin.validate.config import load_validation
from twin.validate.run import run_validation


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="validation YAML (see experiments/twin_cpu.yaml)")
    p.add_argument("--out", help="results folder (default: the file's out, else results/<file stem>)")
    p.add_argument("--reuse-real", action="store_true",
                   help="skip the hardware: rebuild the in-situ table from the calibration runs an earlier run "
                        "of this config left in the results folder and run the simulator against its real "
                        "runs (iterate on the model without the hardware)")


def run(args: argparse.Namespace) -> int:
    cfg = load_validation(args.file)
    if args.out:
        cfg.out = args.out
    res = run_validation(cfg, log=print, reuse_real=args.reuse_real)
    print(res.table_text)
    print(f"report: {res.report}")
    return 0
