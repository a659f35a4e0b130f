"""Where a sweep's or a tune's simulations run: this machine's process pool (default), or a
Ray cluster (`--executor ray [--address ADDR]`) when a study outgrows one machine.

An executor has `submit(fn, *args) -> concurrent.futures.Future`, `workers` (how many
simulations it runs at once) and `shutdown(kill)`. The Runner (experiments/task_runner.py) keeps
the cache on this machine either way: results and tables are the same whatever runs them.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Iterable

from sim import fitted_model

EXECUTORS = ("local", "ray")


class ExecutorError(ValueError):
    """A bad executor choice or a missing extra; the message names the flag and the fix."""


class LocalPool:
    """Worker processes on this machine. With fork (Linux) they inherit what the parent
    computed before `start` (the fitted latency models)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def start(self, warm: Callable[[], None] = lambda: None) -> None:
        warm()
        ctx = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
        self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)
        self._pool.submit(int).result()   # fork launches every worker on the first submit

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        assert self._pool is not None, "start() first"
        return self._pool.submit(fn, *args)

    def shutdown(self, kill: bool = False) -> None:
        if self._pool is None:
            return
        if kill:
            for p in list(getattr(self._pool, "_processes", {}).values()):
                p.terminate()
        self._pool.shutdown(wait=not kill, cancel_futures=True)
        self._pool = None


class RayPool:
    """Tasks on a Ray cluster: `address` None starts a local one (with `workers` CPUs), else
    connects (e.g. "auto" or "ray://head:10001"). The cluster needs pipetwin importable on
    every node (same version: results are cached by the code's hash)."""

    def __init__(self, workers: int | None, address: str | None = None) -> None:
        self.address = address
        self._cpus = workers
        self.workers = workers or 1
        self._remote: dict[Callable, Any] = {}
        self._owns = False

    def start(self, warm: Callable[[], None] = lambda: None) -> None:
        ray = require_ray()
        if not ray.is_initialized():
            kw: dict[str, Any] = {"address": self.address, "include_dashboard": False,
                                  "log_to_driver": False, "logging_level": "ERROR"}
            if self.address is None:
                kw["num_cpus"] = self._cpus or os.cpu_count() or 1
                # the workers import pipetwin from this checkout, as the local pool's do
                kw["runtime_env"] = {"env_vars": {"PYTHONPATH": _repo_root()}}
            ray.init(**kw)
            self._owns = True
        self.workers = max(1, int(ray.cluster_resources().get("CPU", self.workers)))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        ray = require_ray()
        if fn not in self._remote:
            self._remote[fn] = ray.remote(num_cpus=1)(fn)
        return self._remote[fn].remote(*args).future()

    def shutdown(self, kill: bool = False) -> None:
        if self._owns:
            require_ray().shutdown()
            self._owns = False


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ExecutorError("--executor ray needs Ray: pip install 'pipetwin[ray]'") from None
    return ray


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_executor(kind: str, workers: int | None, address: str | None = None) -> LocalPool | RayPool:
    """The executor named by `--executor` (local | ray), checked before anything runs."""
    if kind not in EXECUTORS:
        raise ExecutorError(f"--executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    if kind == "local":
        if address is not None:
            raise ExecutorError("--address is for --executor ray (a Ray cluster's address)")
        return LocalPool(max(1, workers or os.cpu_count() or 1))
    require_ray()
    return RayPool(workers, address)


def warm_profiles(profiles: Iterable[str]) -> Callable[[], None]:
    def warm() -> None:
        for p in profiles:
            fitted_model(p)
    return warm
