"""The engine: owns the stage processes (or the in-process stage) and talks to the driver.

Process layout (pp > 1, Python API): the caller's process is a frontend; it spawns one
process per stage (torch.multiprocessing, spawn context, env:// rendezvous on a free
loopback port). The stage-0 process also runs the one authoritative `core.Scheduler`
(runtime.driver.Driver, started by runtime.processes): it takes generate jobs from the frontend over a queue, and returns
finished requests and trace rows. Keeping torch.distributed out of the caller's process
means a failed pipeline can simply be killed, and the next LLM starts clean.

Under torchrun (WORLD_SIZE = pp, env:// set by torchrun) there is no frontend: rank 0 runs
the driver in the caller's process and the other ranks serve their stage until rank 0
shuts down. pp = 1 runs in the caller's process without torch.distributed.

Failures: every stage process reports an exception on the events queue before it dies;
the frontend also polls `is_alive()` while it waits, so a stage that raises or is killed
makes `generate` raise an error naming the stage within about a second, never hang.
"""
from __future__ import annotations

import gc
import os
import queue
import threading
import time
import traceback
from typing import Any

import torch

from runtime.comm import free_port
from runtime.driver import Driver, GenerateJob, GenerateResult
from runtime.engine_config import EngineConfig
from runtime.pipes import LocalPipe
from runtime.processes import run_stage, stage_main
from runtime.worker import StageRunner


def _process_state(pid: int | None) -> str:
    """The state letter in /proc/PID/stat (R, S, T stopped, ...); '' where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


_COMM_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                "receiving sampled tokens from stage", "Socket Timeout", "ECONNRESET")


class StageFailure(RuntimeError):
    """A pipeline stage raised or died; the message names the stage."""


class OnlineChannel:
    """Commands to stage 0's online loop (runtime.driver.OnlineLoop) and its events back: over the spawned
    processes' queues, or to a thread running it in this process (pp = 1)."""

    def __init__(self, engine: "Engine", cmd: Any, events: Any, thread: Any = None) -> None:
        self.engine, self.cmd, self.events, self.thread = engine, cmd, events, thread

    def send(self, msg: tuple) -> None:
        self.cmd.put(msg)

    def recv(self, timeout: float) -> tuple | None:
        """The next event; None after `timeout` s; StageFailure (naming the stage) once the
        pipeline is dead."""
        return self.engine._next_event(timeout, self.events)


class Engine:
    """Owns the stages: in-process (pp = 1), spawned processes, or a torchrun rank."""

    def __init__(self, opts: EngineConfig) -> None:
        self.opts = opts
        self._driver: Driver | None = None
        self._procs: list[Any] = []
        self._failed: str | None = None
        self._closed = False
        self._online: tuple[Any, Any] | None = None  # pp = 1 online serving: (commands, thread)
        self.num_pages = 0
        if opts.pp == 1:
            self.mode = "local"
            threads = opts.threads_for(multi_process=False)
            if threads is not None:
                torch.set_num_threads(threads)
            runner = StageRunner(opts, 0)
            fit, how = runner.pages_that_fit()
            if fit < 1:
                raise ValueError(f"KV cache: stage 0 fits no page of {opts.page_size} tokens ({how}); "
                                 "give num_pages or more KV memory")
            runner.allocate(fit)
            self.num_pages = fit
            self._driver = Driver(opts, runner, LocalPipe(runner), fit)
        elif launched_by_torchrun():
            self.mode = "torchrun"
            world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
            if world != opts.pp:
                raise ValueError(f"launched with WORLD_SIZE={world} processes but pp={opts.pp}")
            driver = run_stage(rank, opts)
            if rank != 0:
                raise SystemExit(0)  # this rank served its stage until rank 0 shut down
            if driver is None:
                raise RuntimeError("stage 0 did not start")
            self._driver, self.num_pages = driver, driver.num_pages
        else:
            self.mode = "spawn"
            self._spawn()

    # ---- spawned stage processes ----
    def _spawn(self) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._events = ctx.Queue()
        self._cmd = ctx.Queue()
        port = free_port()
        self._procs = [ctx.Process(target=stage_main, name=f"pipetwin-stage{r}", daemon=True,
                                   args=(r, self.opts, "127.0.0.1", port, self._cmd if r == 0 else None,
                                         self._events))
                       for r in range(self.opts.pp)]
        for p in self._procs:
            p.start()
        info = self._wait_for("ready", self.opts.startup_timeout_s, "start-up")
        self.num_pages = info["num_pages"]

    def _wait_for(self, kind: str, timeout: float | None, what: str) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                ev = self._events.get(timeout=0.05)
            except queue.Empty:
                ev = None
            if ev is not None:
                if ev[0] == "error":
                    self._fail([ev])
                if ev[0] == kind:
                    return ev[1]
                continue
            if any(not p.is_alive() for p in self._procs):
                self._fail([])
            if deadline is not None and time.monotonic() > deadline:
                self._fail([], f"{what} took longer than {timeout:g} s")

    def _fail(self, events: list, why: str | None = None) -> None:
        """Gather what the stages reported (briefly: the first error usually drags the
        others down with connection errors), kill them all, raise naming the root cause."""
        grace = time.monotonic() + 0.5
        while time.monotonic() < grace and any(p.is_alive() for p in self._procs):
            try:
                ev = self._events.get(timeout=0.05)
                if ev[0] == "error":
                    events.append(ev)
            except queue.Empty:
                pass
        while True:
            try:
                ev = self._events.get_nowait()
            except (queue.Empty, OSError, ValueError):
                break
            if ev[0] == "error":
                events.append(ev)
        # exit codes before our own kill: a stage we terminate below did not die by itself
        codes = [p.exitcode for p in self._procs]
        self._kill()
        reported = {ev[1] for ev in events}
        causes, echoes = [], []
        for _, rank, tb in events:
            last = tb.strip().splitlines()[-1] if tb.strip() else "?"
            line = f"pipeline stage {rank} failed: {last}"
            (echoes if any(c in tb for c in _COMM_ERRORS) else causes).append((line, tb))
        dead = []
        for rank, (p, code) in enumerate(zip(self._procs, codes)):
            if rank not in reported and code not in (None, 0):
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                dead.append((f"pipeline stage {rank} (pid {p.pid}) died unexpectedly ({how})", ""))
        ordered = causes + dead + echoes
        if why is not None:
            ordered.insert(0, (f"pipeline {why}; stage processes killed", ""))
        if not ordered:
            ordered = [("pipeline stage processes stopped unexpectedly", "")]
        head, tb = ordered[0]
        extra = [line for line, _ in ordered[1:]]
        msg = head + (f"\n{tb.rstrip()}" if tb else "") + ("\nthen: " + "; ".join(extra) if extra else "")
        self._failed = head
        raise StageFailure(msg)

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        for p in self._procs:
            p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)

    def kill_hung(self, why: str) -> str:
        """The frontend's watchdog saw no progress: kill every stage (SIGKILL: a stopped
        process ignores SIGTERM until continued) and return the cause, naming the stages
        that were stopped. pp = 1 runs in a thread, which cannot be killed: it is abandoned."""
        stopped = [f"stage {r} (pid {p.pid}) was stopped" for r, p in enumerate(self._procs)
                   if _process_state(p.pid) in ("T", "t")]
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(2.0)
        self._failed = f"pipeline stage hung: {why}" + (f" ({'; '.join(stopped)})" if stopped else "")
        return self._failed

    def _next_event(self, timeout: float, events: Any) -> tuple | None:
        try:
            ev = events.get(timeout=timeout)
        except queue.Empty:
            ev = None
        if self.mode == "spawn":
            if ev is not None and ev[0] == "error":
                self._fail([ev])
            if ev is None and any(not p.is_alive() for p in self._procs):
                self._fail([])
        elif ev is not None and ev[0] == "error":
            self._failed = f"pipeline stage 0 failed: {ev[2].strip().splitlines()[-1]}"
            raise StageFailure(f"{self._failed}\n{ev[2].rstrip()}")
        return ev

    # ---- API ----
    def open_stream(self, policy: str, policy_params: dict[str, Any], stage_time_model: Any = None) -> OnlineChannel:
        """Switch the engine to online serving (runtime.driver.OnlineLoop); it serves until shutdown."""
        if self.mode == "torchrun":
            raise ValueError("online serving runs stages it spawns itself (or pp=1), not under torchrun")
        if self._closed or self._failed is not None:
            raise RuntimeError("the engine is shut down")
        if self.mode == "spawn":
            self._cmd.put(("serve", (policy, policy_params, stage_time_model)))
            return OnlineChannel(self, self._cmd, self._events)
        cmd, events = queue.Queue(), queue.Queue()

        def run() -> None:
            try:
                self._driver.serve(cmd, events, policy, policy_params, stage_time_model)
            except BaseException:  # noqa: BLE001 - reported to the frontend
                events.put(("error", 0, traceback.format_exc()))

        thread = threading.Thread(target=run, name="pipetwin-stage0", daemon=True)
        self._online = (cmd, thread)
        thread.start()
        return OnlineChannel(self, cmd, events, thread)

    def generate(self, job: GenerateJob) -> GenerateResult:
        if self._failed is not None:
            raise StageFailure(f"the pipeline is down after an earlier failure ({self._failed}); "
                               "create a new LLM")
        if self._closed:
            raise RuntimeError("the engine is shut down")
        if self.mode != "spawn":
            return self._driver.run(job)
        self._cmd.put(("generate", job))
        try:
            return self._wait_for("result", None, "generate")
        except StageFailure:
            raise
        except BaseException:
            # Interrupted (Ctrl-C): stage 0 would finish this job and its result would
            # answer the next call, so the pipeline cannot be trusted any more.
            self._failed = "a generate call was interrupted"
            self._kill()
            raise

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.mode != "spawn":
            if self._online is not None:
                cmd, thread = self._online
                cmd.put(("stop", None))
                thread.join(30.0 if self._failed is None else 0.5)   # a hung thread is abandoned
            if self._driver is not None:
                self._driver.close()
            self._driver = None
            if torch.device(self.opts.device).type == "cuda":
                # hand the KV cache back to the driver, not just torch's cache: the next
                # engine (maybe in stage processes) sizes its KV from the free memory
                gc.collect()
                torch.cuda.empty_cache()
            return
        if self._failed is None and all(p.is_alive() for p in self._procs):
            try:
                self._cmd.put(("stop", None))
                self._wait_for("stopped", 30.0, "shutdown")
            except StageFailure:
                pass
        for p in self._procs:
            p.join(5.0)
        self._kill()
        for q in (self._events, self._cmd):
            q.close()
            q.cancel_join_thread()
        # Drop the queues now: their semaphores unregister from multiprocessing's resource
        # tracker when collected, and a server killed by SIGTERM right after this would
        # otherwise leave the tracker warning about "leaked semaphore objects".
        self._events = self._cmd = None
        gc.collect()
