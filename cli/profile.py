"""`pipetwin profile`: measure a latency table on this machine (profiles/measure)."""
from __future__ import annotations

import argparse

from profiles.measure import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    from profiles.measure.profiler import run_cli  # why: torch, only for this command
    return run_cli(args)
