"""`pipetwin serve`: serve a model over an OpenAI-compatible HTTP API (server/)."""
from __future__ import annotations

import argparse

from cli.common import UsageError, param
from server.serve import add_arguments as add_server_arguments
from server.serve import check_args, run_cli

HELP = "serve a model over an OpenAI-compatible HTTP API (needs the runtime and serve extras)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_arguments(p, param)


def run(args: argparse.Namespace) -> int:
    try:
        check_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return run_cli(args)
