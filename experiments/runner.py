"""Sweep runner: every run of an experiment on a cached `Runner` (experiments/task_runner.py:
parallel worker processes, a per-run cache), the tidy results table, the capacity searches
(experiments/capacity_runs.py) and the report."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
import yaml

from experiments.capacity_runs import run_capacity
from experiments.errors import RunError
from experiments.expand import describe_run, expand
from experiments.spec import Experiment, Run
from experiments.tables import results_table, write_table
from experiments.task_runner import Runner, Task, code_version, execute, run_hash

# RunError, execute and run_hash: importable from here as before the split
__all__ = ["RunError", "Runner", "Task", "execute", "run_hash", "SweepResult", "run_sweep", "iter_preview"]


@dataclass
class SweepResult:
    out: Path
    results: pd.DataFrame
    capacity: pd.DataFrame | None
    computed: int
    cached: int
    wall_s: float
    report: Path | None = None
    runs: list[Run] = field(default_factory=list)


def run_sweep(exp: Experiment, out: str | Path, *, workers: int | None = None, use_cache: bool = True,
              progress: bool = True, report: bool = True, log: Callable[[str], None] = print,
              executor: Any = None) -> SweepResult:
    """Validate every run, run the grid (cached), the capacity searches, write results and report.
    `executor`: an experiments.executors pool (default: a local one with `workers` processes)."""
    t0 = time.perf_counter()
    runs = expand(exp)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(exp.raw | {"name": exp.name}, sort_keys=False))
    runner = Runner(out, workers, use_cache, progress, executor)
    try:
        runner.start(dict.fromkeys(r.config["profile"] for r in runs))
        tasks = [Task(r.config, r.artefacts, name=f"run {r.index} ({describe_run(r.label, r.settings)})")
                 for r in runs]
        rows = runner.run_many(tasks)
        df = results_table(runs, rows)
        write_table(df, out / "results")
        cap_df = run_capacity(exp, runs, runner, log) if exp.capacity else None
    except BaseException:
        runner.close(kill=True)
        raise
    runner.close()
    res = SweepResult(out, df, cap_df, runner.computed, runner.cached, time.perf_counter() - t0, runs=runs)
    (out / "sweep_meta.json").write_text(json.dumps(
        {"code_version": code_version(), "runs": len(runs), "computed": runner.computed,
         "cached": runner.cached, "workers": runner.workers, "wall_s": round(res.wall_s, 2)}, indent=2) + "\n")
    if report:
        from experiments.report import make_report  # why: matplotlib, only when a report is asked for
        res.report = make_report(out, exp)
    res.wall_s = time.perf_counter() - t0
    return res


def iter_preview(runs: Iterable[Run], n: int = 5) -> Iterable[str]:
    for r in list(runs)[:n]:
        yield f"  #{r.index}: {describe_run(r.label, r.settings)}"
