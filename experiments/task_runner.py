"""One simulation per task, cached: the run hash, the worker-side `execute`, and `Runner`
(in this process, on a local process pool, or on another executor).

Cache: OUT/cache/<hash>.json per run, hash = sha256 of the canonical JSON of the resolved
SimConfig dict + `code_version()` (the simulation code, comments and docstrings aside) +
the inputs' fingerprints (profile table contents; a trace file's size and mtime). An
interrupted or extended sweep recomputes only what is missing. A run that must keep its
trace (timeline plots, `artefacts: true`) is a hit only when OUT/runs/<hash>/ holds it.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import os
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from core.table_io import default_formats
from experiments.capacity import sustainability
from experiments.errors import RunError
from experiments.executors import LocalPool, warm_profiles
from profiles.schema import resolve
from sim import SimConfig, simulate

PACKAGES = ("core", "sim", "profiles")   # code whose changes change simulation results
ROW_VERSION = 5   # the columns `execute` adds to a summary row; a change invalidates cached rows


# ---------------------------------------------------------------- hashing

@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """pipetwin's version + a hash of the simulation code (core/, sim/, profiles/ sources),
    comments and docstrings left out (`code_fingerprint`)."""
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
            h.update(code_fingerprint(f.read_text(encoding="utf-8")).encode())
    return f"{v}+{h.hexdigest()[:12]}"


def code_fingerprint(source: str) -> str:
    """What of a module's source can change a result: its syntax tree without docstrings
    (comments and layout are not in the tree). A comment edit in core/ used to change the
    hash and rerun every cached run (a 35-minute sweep, for a docstring)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


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
        result.trace.save(folder, formats=default_formats())
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
