"""`pipetwin serve`: serve a model over an OpenAI-compatible HTTP API (server/)."""
from __future__ import annotations

import argparse

from cli.common import param
from cli.errors import UsageError
from server.serve import add_arguments as add_server_arguments
from server.serve import check_args, run_cli


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_arguments(p, param)
    p.add_argument("--policy-file", metavar="FILE", help="policy and its params from a {policy, policy_params} "
                                                          "YAML (a tune's best.yaml); --param values override")


def apply_policy_file(args: argparse.Namespace) -> None:
    """--policy-file: its policy, its params under any --param given."""
    if args.policy_file:
        from experiments.tune_config import read_policy_setting   # why: the config stack, only with the flag
        args.policy, params = read_policy_setting(args.policy_file, "--policy-file")
        args.param = [*params.items(), *args.param]


def run(args: argparse.Namespace) -> int:
    apply_policy_file(args)
    try:
        check_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return run_cli(args)
