"""`pipetwin` command line: sim, sweep, tune, plot, profiles, profile, bench, bench serve, serve, validate.

A subcommand is a module of this package with HELP, add_arguments(parser) and
run(args) -> int, listed in COMMANDS. User errors (bad flags, values, configs, missing
files) exit 2 with one line naming the flag or field; no tracebacks. No command module
imports torch, matplotlib or fastapi when it is imported: every parser is built on each call.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable

from cli import bench, bench_serve, plot, profile, profiles, serve, sim, sweep, tune, validate
from cli.common import EXIT_USAGE, UsageError
from experiments.errors import ConfigError, RunError

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {name: (m.HELP, m.add_arguments, m.run) for name, m in (
    ("sim", sim), ("sweep", sweep), ("tune", tune), ("plot", plot), ("profiles", profiles), ("profile", profile),
    ("bench", bench), ("bench serve", bench_serve), ("validate", validate), ("serve", serve))}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipetwin", allow_abbrev=False, description="Scheduling policies for "
                                     "pipeline-parallel LLM serving: simulate, sweep, plot.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add, run) in COMMANDS.items():
        if " " in name:   # "bench serve": a form of `bench`, reached through main()'s argv rewrite
            p = sub.add_parser(name.replace(" ", "-"), help=f"(`{parser.prog} {name}`) {help_}",
                               description=help_, allow_abbrev=False, prog=f"{parser.prog} {name}")
        else:
            p = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False)
        add(p)
        p.set_defaults(_run=run, _parser=p, command=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "serve"]:   # `pipetwin bench serve ...` (a bench config named serve: ./serve)
        argv = ["bench-serve", *argv[2:]]
    args = build_parser().parse_args(argv)   # argparse exits 2 on bad flags, naming them
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
