"""Sweep runner: parallel worker processes, a per-run cache, the tidy results table, and the
capacity searches.

Cache: OUT/cache/<hash>.json per run, hash = sha256 of the canonical JSON of the resolved
SimConfig dict + `code_version()` + the inputs' fingerprints (profile table contents; a
trace file's size and mtime). An interrupted or extended sweep recomputes only what is
missing. A run that must keep its trace (timeline plots, `artefacts: true`) is a hit only
when OUT/runs/<hash>/ holds it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
import yaml

from core.metrics import summary_keys
from core.trace import _has_pyarrow
from core.workloads import Workload
from experiments.capacity import SUSTAIN_KEYS, binding_condition, find_capacity, probe_failures, sustainability
from experiments.config_keys import as_float, fmt_value
from experiments.expand import capacity_groups, describe_run, expand, max_throughput_config, probe_config
from experiments.spec import Experiment, Run
from experiments.executors import LocalPool, warm_profiles
from profiles.schema import resolve
from sim import SimConfig, simulate

PACKAGES = ("core", "sim", "profiles")   # code whose changes change simulation results
ROW_VERSION = 2   # the columns `execute` adds to a summary row; a change invalidates cached rows


# ---------------------------------------------------------------- hashing

@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """pipetwin's version + a hash of the simulation code (core/, sim/, profiles/ sources)."""
    try:
        from importlib.metadata import version
        v = version("pipetwin")
    except Exception:  # not installed (running from a checkout)
        v = "0+unknown"
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return f"{v}+{h.hexdigest()[:12]}"


@functools.lru_cache(maxsize=64)
def _profile_fingerprint(profile: str) -> str:
    try:
        folder = resolve(profile)
    except ValueError:
        return "missing"
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _file_fingerprint(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def run_hash(config: dict[str, Any]) -> str:
    inputs = {"profile": _profile_fingerprint(config["profile"])}
    trace = (config.get("workload") or {}).get("trace")
    if trace:
        inputs["trace"] = _file_fingerprint(trace)
    payload = {"config": config, "code": code_version(), "inputs": inputs, "row": ROW_VERSION}
    return hashlib.sha256(canonical(payload).encode()).hexdigest()[:24]


# ---------------------------------------------------------------- one run (worker side)

def execute(config: dict[str, Any], artefact_dir: str | None = None) -> dict[str, Any]:
    """Simulate one resolved config; the summary row (+ offered_rps). Runs in a worker."""
    result = simulate(SimConfig.from_dict(config))
    row = dict(result.summary)
    arrivals = result.trace.requests["arrival"]
    span = float(arrivals.max() - arrivals.min()) if len(arrivals) > 1 else 0.0
    row["offered_rps"] = (len(arrivals) - 1) / span if span > 0 else math.inf
    row.update(sustainability(result.trace.requests))
    if artefact_dir is not None:
        folder = Path(artefact_dir)
        result.trace.save(folder, formats=("parquet",) if _has_pyarrow() else ("csv",))
        result.trace.to_perfetto(folder / "perfetto.json")
    return row


@dataclass
class Task:
    config: dict[str, Any]
    keep_trace: bool = False
    name: str = ""
    hash: str = ""

    def __post_init__(self) -> None:
        self.hash = self.hash or run_hash(self.config)


class RunError(RuntimeError):
    """A simulation raised; the message names the run."""


class Runner:
    """Runs tasks with a cache under `out`: in this process (`workers` 1), on a local process
    pool (`workers` processes, the default), or on `executor` (experiments/executors.py,
    e.g. a Ray cluster). The cache and the result rows are the same whichever runs them."""

    def __init__(self, out: Path, workers: int | None = None, use_cache: bool = True,
                 progress: bool = True, executor: Any = None) -> None:
        self.out = Path(out)
        self.executor = executor
        self.workers = executor.workers if executor is not None else max(1, workers or os.cpu_count() or 1)
        if executor is None and self.workers > 1:
            self.executor = LocalPool(self.workers)
        self.use_cache = use_cache
        self.progress = progress
        self.computed = 0
        self.cached = 0
        self._lock = threading.Lock()
        self._started = False
        (self.out / "cache").mkdir(parents=True, exist_ok=True)

    # -- cache
    def trace_dir(self, task: Task) -> Path:
        return self.out / "runs" / task.hash

    def lookup(self, task: Task) -> dict[str, Any] | None:
        if not self.use_cache:
            return None
        path = self.out / "cache" / f"{task.hash}.json"
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if task.keep_trace and not (self.trace_dir(task) / "meta.json").is_file():
            return None
        return entry["row"]

    def store(self, task: Task, row: dict[str, Any]) -> None:
        path = self.out / "cache" / f"{task.hash}.json"
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps({"hash": task.hash, "code": code_version(), "config": task.config,
                                   "row": row}, sort_keys=True, default=str))
        os.replace(tmp, path)

    # -- execution
    @property
    def in_process(self) -> bool:
        return self.executor is None

    def start(self, profiles: Iterable[str] = ()) -> None:
        """Fit the profiles here, then start the executor (call from the main thread, before
        any other thread: with fork the workers inherit the fitted models, and no thread can
        hold a lock while the process forks)."""
        if self.in_process or self._started:
            return
        self.executor.start(warm_profiles(profiles))
        self.workers = self.executor.workers
        self._started = True

    def _submit(self, task: Task) -> Future:
        if not self._started:
            self.start([task.config["profile"]])
        art = str(self.trace_dir(task)) if task.keep_trace else None
        return self.executor.submit(execute, task.config, art)

    def _done(self, task: Task, row: dict[str, Any]) -> dict[str, Any]:
        self.store(task, row)
        with self._lock:
            self.computed += 1
        return row

    def run_one(self, task: Task) -> dict[str, Any]:
        """One task (thread-safe): from the cache, or computed."""
        row = self.lookup(task)
        if row is not None:
            with self._lock:
                self.cached += 1
            return row
        try:
            if self.in_process:
                row = execute(task.config, str(self.trace_dir(task)) if task.keep_trace else None)
            else:
                row = self._submit(task).result()
        except Exception as e:
            raise RunError(f"{task.name or task.hash} failed: {type(e).__name__}: {e}") from e
        return self._done(task, row)

    def run_many(self, tasks: list[Task], desc: str = "runs") -> list[dict[str, Any]]:
        """All tasks, cached ones served first, the rest in parallel; rows in task order."""
        from tqdm import tqdm

        rows: list[dict[str, Any] | None] = [None] * len(tasks)
        todo = []
        for i, t in enumerate(tasks):
            rows[i] = self.lookup(t)
            if rows[i] is None:
                todo.append(i)
        self.cached += len(tasks) - len(todo)
        bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=desc, unit="run",
                   disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        try:
            if self.in_process:
                for i in todo:
                    rows[i] = self.run_one(tasks[i])
                    bar.update()
            elif todo:
                futures = {self._submit(tasks[i]): i for i in todo}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        i = futures[f]
                        try:
                            rows[i] = self._done(tasks[i], f.result())
                        except Exception as e:
                            for p in pending:
                                p.cancel()
                            raise RunError(f"{tasks[i].name} failed: {type(e).__name__}: {e}") from e
                        bar.update()
        finally:
            bar.close()
        return rows  # type: ignore[return-value]

    def close(self, kill: bool = False) -> None:
        """Stop the workers; `kill` (on an interrupt or error) ends running simulations too
        instead of waiting for them (finished runs are already cached)."""
        if self.executor is not None and self._started:
            self.executor.shutdown(kill)
            self._started = False


# ---------------------------------------------------------------- the sweep

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


def _plain(v: Any) -> Any:
    """Swept values for the table: 'inf' strings become floats so a column stays numeric."""
    if isinstance(v, str) and math.isinf(as_float(v)):
        return math.inf
    return v


def results_table(runs: list[Run], rows: list[dict[str, Any]]) -> pd.DataFrame:
    recs = []
    metric_order: list[str] = []
    for run, row in zip(runs, rows):
        pp = sum(1 for k in row if k.startswith("bubble_ratio_stage"))
        for k in [*summary_keys(pp), *row]:
            if k not in metric_order and k not in ("wall_s", "offered_rps", *SUSTAIN_KEYS):
                metric_order.append(k)
        rec: dict[str, Any] = {"run": run.index, "series": run.series, "policy": run.policy,
                               "label": run.label}
        rec.update({f"policy_params.{k}": v for k, v in run.params.items()})
        rec.update({k: _plain(v) for k, v in run.settings.items()})
        rec["offered_rps"] = row.get("offered_rps")
        rec.update({k: row.get(k) for k in SUSTAIN_KEYS})
        rec.update(row)
        task_hash = run_hash(run.config)
        rec["trace"] = f"runs/{task_hash}" if run.artefacts else ""
        rec["hash"] = task_hash
        recs.append(rec)
    df = pd.DataFrame(recs)
    head = [c for c in df.columns if c not in metric_order and c not in ("wall_s", "trace", "hash")]
    return df[head + [c for c in metric_order if c in df.columns] + ["wall_s", "trace", "hash"]]


def write_table(df: pd.DataFrame, path_stem: Path) -> list[Path]:
    """CSV always; Parquet too when pyarrow is importable (skipped, with a note, if a column
    mixes types Parquet cannot store)."""
    paths = [path_stem.with_suffix(".csv")]
    df.to_csv(paths[0], index=False)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return paths
    try:
        df.to_parquet(path_stem.with_suffix(".parquet"), index=False)
        paths.append(path_stem.with_suffix(".parquet"))
    except Exception as e:  # pyarrow.ArrowInvalid etc.: mixed-type columns
        print(f"note: {path_stem.name}.parquet not written ({e})", file=sys.stderr)
    return paths


def offered_rps(config: dict[str, Any]) -> float:
    """A run's offered rate as `execute` reports it, from its workload alone (no simulation)."""

    arrivals = [r.arrival for r in Workload.from_dict(SimConfig.from_dict(config).workload_spec()).requests()]
    span = max(arrivals) - min(arrivals) if len(arrivals) > 1 else 0.0
    return (len(arrivals) - 1) / span if span > 0 else math.inf


def search_capacity(name: str, run: Run, cap: Any, runner: Runner,
                    on_run: Callable[[], None] = lambda: None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One series' capacity record and its probe rows: the max-throughput run first (when
    asked), then bisection on `cap.key` (experiments/capacity.py says what a probe must meet;
    a probe offering more than the max throughput fails without being simulated).
    `on_run` is called after each simulation (progress bars)."""
    rec: dict[str, Any] = {"series": name, "label": run.label, "policy": run.policy, "key": cap.key}
    probes: list[dict[str, Any]] = []
    max_rps = None
    mt: dict[str, Any] = {}
    if cap.max_throughput:
        row = runner.run_one(Task(max_throughput_config(run), name=f"max throughput {name}"))
        on_run()
        max_rps = row["throughput_rps"]
        mt = {"max_throughput_rps": max_rps, "max_output_tps": row["output_tps"],
              "max_total_tps": row["total_tps"], "max_bubble_ratio": row["bubble_ratio"],
              "max_ttft_p99": row["ttft_p99"], "max_tpot_p99": row["tpot_p99"]}
    evaluated: list[tuple[float, dict[str, list[str]]]] = []

    def meets(rate: float) -> bool:
        task = Task(probe_config(run, cap.key, rate), name=f"capacity probe {name}, {cap.key}={rate:g}")
        if max_rps is not None:
            offered = offered_rps(task.config)
            if offered > max_rps:   # fails whatever the simulation says: not simulated
                fails = probe_failures({"offered_rps": offered}, {}, cap.sustain, max_rps)
                evaluated.append((rate, fails))
                probes.append({"series": name, "label": run.label, "policy": run.policy, cap.key: rate,
                               "meets": False, "failed": "max_throughput", "simulated": False,
                               "failures": fails["max_throughput"][0], "offered_rps": offered,
                               "hash": task.hash})
                on_run()
                return False
        row = runner.run_one(task)
        on_run()
        fails = probe_failures(row, cap.slo, cap.sustain, max_rps)
        evaluated.append((rate, fails))
        probes.append({"series": name, "label": run.label, "policy": run.policy, cap.key: rate,
                       "meets": not fails, "failed": ",".join(fails), "simulated": True,
                       "failures": "; ".join(m for ms in fails.values() for m in ms),
                       **row, "hash": task.hash})
        return not fails

    capacity = find_capacity(meets, cap.lo, cap.hi, cap.tol) if cap.slo else math.nan
    at = [p for p in probes if p[cap.key] == capacity]
    rec.update({"capacity": capacity,
                "capacity_rps": at[0]["offered_rps"] if at else math.nan,
                "bound": binding_condition(evaluated, capacity, cap.lo, cap.hi) if cap.slo else "",
                "lo": cap.lo, "hi": cap.hi, "tol": cap.tol, "sustain": cap.sustain,
                "probes": len(evaluated), **{f"slo.{k}": v for k, v in cap.slo.items()}, **mt})
    return rec, probes


def run_capacity(exp: Experiment, runs: list[Run], runner: Runner,
                 log: Callable[[str], None] = print) -> pd.DataFrame:
    """Per series: `search_capacity`; writes capacity.csv and capacity_runs.csv."""
    cap = exp.capacity
    assert cap is not None
    from tqdm import tqdm

    groups = capacity_groups(exp, runs)
    probes: dict[str, list[dict[str, Any]]] = {}
    messages: dict[str, str] = {}
    bar = tqdm(total=len(groups) * (cap.probes() + cap.max_throughput), desc="capacity", unit="run",
               disable=not runner.progress, file=sys.stderr, dynamic_ncols=True)

    def search(name: str, run: Run) -> dict[str, Any]:
        rec, probes[name] = search_capacity(name, run, cap, runner, bar.update)
        capacity = rec["capacity"]
        unit = "req/s" if cap.key == "workload.arrival.rate" else f"({cap.key})"
        extra = f"; max throughput {rec['max_throughput_rps']:.2f} req/s" if cap.max_throughput else ""
        messages[name] = (f"capacity {name}: {fmt_value(capacity)} {unit}"
                          f"{' (bound by ' + rec['bound'] + ')' if rec['bound'] else ''} after "
                          f"{rec['probes']} probes{extra}" if cap.slo else f"{name}: {extra[2:]}")
        return rec

    try:
        if runner.in_process or len(groups) == 1:
            recs = [search(n, r) for n, r in groups]
        else:
            with ThreadPoolExecutor(max_workers=min(len(groups), runner.workers * 2)) as tp:
                recs = list(tp.map(lambda g: search(*g), groups))
    finally:
        bar.close()
    for name, _ in groups:
        log(messages[name])
    rows = [p for name, _ in groups for p in sorted(probes.get(name, []), key=lambda p: p[cap.key])]
    if rows:
        write_table(pd.DataFrame(rows).drop(columns=["wall_s"], errors="ignore"), runner.out / "capacity_runs")
    df = pd.DataFrame(recs)
    write_table(df, runner.out / "capacity")
    return df


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
