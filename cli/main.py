"""`pipetwin` command line: sim, sweep, tune, plot, profiles, profile, bench, bench serve, serve, validate.

A subcommand is a module of this package with add_arguments(parser) and run(args) -> int,
listed in COMMANDS with its help line. A command's module is imported only when that
command runs or its own --help is asked, so `pipetwin --help` loads no simulator, pandas
or torch. User errors (bad flags, values, configs, missing files) exit 2 with one line
naming the flag or field; no tracebacks. No command module imports torch, matplotlib or
fastapi when it is imported: every parser is built on each call.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import Iterable

from cli.errors import EXIT_USAGE, UsageError
from experiments.errors import ConfigError, RunError

# command -> (its module, its help line); the order is `pipetwin --help`'s
COMMANDS: dict[str, tuple[str, str]] = {
    "sim": ("cli.sim", "simulate one configuration and write a results folder"),
    "sweep": ("cli.sweep", "run an experiment grid (cached, parallel), capacity search, plots, report"),
    "tune": ("cli.tune", "search a policy's parameters in the simulator (Optuna TPE, resumable), best setting as YAML"),
    "plot": ("cli.plot", "regenerate a sweep's plots and report"),
    "profiles": ("cli.profiles", "list the shipped latency tables"),
    "profile": ("cli.profile", "measure a latency table on this machine (torch runtime, needs the runtime extra)"),
    "bench": ("cli.bench", "run the real runtime on a workload and write a results folder like `sim`'s"),
    "bench serve": ("cli.bench_serve", "load-test an OpenAI-compatible server (`pipetwin serve`): vLLM-style "
                                       "report and a results folder like `bench`'s"),
    "validate": ("cli.validate", "simulator vs runtime on the same workloads: error table, plots, report"),
    "serve": ("cli.serve", "serve a model over an OpenAI-compatible HTTP API (needs the runtime and serve extras)"),
}


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The `pipetwin` parser: every command listed with its help line, the flags of `commands`
    (default: all of them) added from their modules."""
    wanted = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(prog="pipetwin", allow_abbrev=False, description="Scheduling policies for "
                                     "pipeline-parallel LLM serving: simulate, sweep, plot.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        if " " in name:   # "bench serve": a form of `bench`, reached through main()'s argv rewrite
            p = sub.add_parser(name.replace(" ", "-"), help=f"(`{parser.prog} {name}`) {help_}",
                               description=help_, allow_abbrev=False, prog=f"{parser.prog} {name}")
        else:
            p = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False)
        p.set_defaults(_parser=p, command=name)
        if name in wanted:
            # why: a command's module (the simulator, pandas, ...) loads only for that command
            command = importlib.import_module(module)
            command.add_arguments(p)
            p.set_defaults(_run=command.run)
    return parser


def named_command(argv: list[str]) -> list[str]:
    """The command `argv` names (its first word that is not a flag), as a COMMANDS key."""
    word = next((a for a in argv if not a.startswith("-")), None)
    name = next((n for n in COMMANDS if n.replace(" ", "-") == word), None)
    return [name] if name else []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "serve"]:   # `pipetwin bench serve ...` (a bench config named serve: ./serve)
        argv = ["bench-serve", *argv[2:]]
    args = build_parser(named_command(argv)).parse_args(argv)   # argparse exits 2 on bad flags, naming them
    try:
        return args._run(args)
    except (UsageError, ConfigError, FileNotFoundError) as e:
        args._parser.exit(EXIT_USAGE, f"pipetwin {args.command}: error: {e}\n")
    except ValueError as e:  # e.g. ProfileError, a bad value caught late
        args._parser.exit(EXIT_USAGE, f"pipetwin {args.command}: error: {e}\n")
    except RunError as e:  # a simulation raised: not a user error, show where
        if e.__cause__ is not None:
            traceback.print_exception(e.__cause__, file=sys.stderr)
        print(f"pipetwin {args.command}: {e} (finished runs are cached)", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `pipetwin profiles | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("interrupted (finished runs are cached; run again to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
