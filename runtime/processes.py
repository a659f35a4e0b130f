"""Process entry points: what a stage process runs, from joining the process group to
shutdown. The top of the stage side of runtime/ (runtime.engine starts these).

`stage_main` is the target of a spawned stage process; `run_stage` joins the group, sizes
the KV cache with the other stages, then serves stage >= 1 (`runtime.worker.serve`) or
builds stage 0's `Driver`, which under a spawned engine takes commands from the frontend:
("generate", job) -> ("result", GenerateResult); ("serve", (policy, params, stage_time_model)) -> online
serving until "stop"; ("stop", None) -> shut the pipeline down.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import traceback
from typing import Any

import torch

from runtime.comm import destroy_groups_quietly, init_groups
from runtime.driver import Driver
from runtime.engine_config import EngineConfig
from runtime.pipes import DistPipe
from runtime.worker import StageRunner, negotiate_pages, serve


def stage_main(rank: int, opts: EngineConfig, addr: str, port: int, cmd_q: Any, events: Any) -> None:
    """Entry point of a spawned stage process (torch.multiprocessing, spawn context).
    Reports ("error", rank, traceback) on `events` before dying, so the engine can name
    the stage; exit without a report (a kill) is caught by the engine's liveness checks."""
    try:
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(opts.pp), LOCAL_RANK=str(rank))
        run_stage(rank, opts, cmd_q, events)
    except BaseException:  # noqa: BLE001 - reported, then the process dies
        events.put(("error", rank, traceback.format_exc()))
        events.close()
        events.join_thread()  # make sure the report leaves before the sockets close
        os._exit(1)
    events.close()
    events.join_thread()
    # Everything is flushed; skip interpreter teardown (torch + gloo take ~1 s to unwind).
    os._exit(0)


def run_stage(rank: int, opts: EngineConfig, cmd_q: Any = None, events: Any = None) -> Driver | None:
    """Join the process group and run stage `rank`. Stages >= 1 serve until told to stop.
    Stage 0 builds the driver; with `cmd_q` (spawned) it serves commands from the
    engine, else (torchrun, in the user's process) it returns the driver."""
    threads = opts.threads_for(multi_process=True)
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(opts.stage_device(rank))
    g = init_groups(opts.backend, opts.dist_timeout_s, device if device.type == "cuda" else None)
    try:
        runner = StageRunner(opts, rank)
        n = negotiate_pages(runner, g)
        if n < 1:
            return None  # stage 0 reports why
        runner.allocate(n)
        if rank != 0:
            serve(runner, g, events)
            destroy_groups_quietly()
            return None
        driver = Driver(opts, runner, DistPipe(runner, g), n)
    except BaseException:
        destroy_groups_quietly()
        raise
    if cmd_q is None:
        return driver
    events.put(("ready", {"num_pages": n}))
    serve_commands(driver, cmd_q, events)
    return None


def serve_commands(driver: Driver, cmd_q: Any, events: Any) -> None:
    """Stage 0 of a spawned engine: run the frontend's commands until "stop"."""
    parent = multiprocessing.parent_process()
    while True:
        try:
            cmd, payload = cmd_q.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                driver.close()  # orphaned: take the other stages down with us
                return
            continue
        if cmd == "generate":
            events.put(("result", driver.run(payload)))
        elif cmd == "serve":  # online until a "stop" command, then shut down as below
            driver.serve(cmd_q, events, *payload)
            cmd = "stop"
        if cmd == "stop":
            driver.close()
            events.put(("stopped", None))
            return
