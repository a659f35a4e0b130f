"""`pipetwin sim` end to end on a real trace: wall time and peak RSS of the whole command
(interpreter start, imports, profile fit, simulation, metrics, writing the results folder).

    python benchmarks/sim_cli_trace.py --trace ../shared/data/traces/azure_conv_2023.csv \
        [--pp 4] [--policies token_throttling sarathi vllm] [--extra "--tokens --perfetto"]

Each command is a fresh child process; its peak RSS is the child's own ru_maxrss (os.wait4),
its wall time is measured around it, and its CPU time (user + system: on a shared machine
the wall time of a one-process command is at least this). The output folder's size too.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """(wall s, peak RSS MB, CPU s: user + system) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--policies", nargs="+", default=["token_throttling", "sarathi", "vllm"])
    ap.add_argument("--extra", default="", help="more `pipetwin sim` flags, e.g. \"--tokens --perfetto\"")
    ap.add_argument("--repeats", type=int, default=1, help="runs per policy (the best wall is shown too)")
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("pipetwin"))
    print(f"{'policy':17} {'wall s':>7} {'best s':>7} {'CPU s':>6} {'peak MB':>8} {'output MB':>9}   "
          f"flags: {args.extra or '(defaults)'}")
    for policy in args.policies:
        with tempfile.TemporaryDirectory() as out:
            cmd = [exe, "sim", "--trace", args.trace, "--pp", str(args.pp), "--policy", policy,
                   "--out", out, *shlex.split(args.extra)]
            runs = [measure(cmd) for _ in range(args.repeats)]
            size = sum(f.stat().st_size for f in Path(out).iterdir()) / 1e6
        walls = [w for w, _, _ in runs]
        print(f"{policy:17} {sum(walls) / len(walls):>7.2f} {min(walls):>7.2f} {min(c for _, _, c in runs):>6.2f} "
              f"{max(r for _, r, _ in runs):>8.0f} {size:>9.1f}")


if __name__ == "__main__":
    main()
