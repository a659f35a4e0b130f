"""`--executor local|ray [--address ADDR]`, shared by `sweep` and `tune`."""
from __future__ import annotations

import argparse
from typing import Any

from cli.errors import UsageError
from experiments.executors import EXECUTORS, ExecutorError, make_executor


def add_executor_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where simulations run: this machine's process pool (default) or Ray "
                        "(pip install 'pipetwin[ray]')")
    p.add_argument("--address", help="with --executor ray: the cluster to join (e.g. auto, ray://head:10001); "
                                     "default: start a local Ray")


def executor_from(args: argparse.Namespace) -> Any:
    """None for the default local pool (the runner makes it), else the chosen executor."""
    if args.executor == "local" and args.address is None:
        return None
    try:
        return make_executor(args.executor, args.workers, args.address)
    except ExecutorError as e:
        raise UsageError(str(e)) from None
