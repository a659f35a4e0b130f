"""The driver loop around the core scheduler, and the engine that owns the stage processes.

Process layout (pp > 1, Python API): the caller's process is a frontend; it spawns one
process per stage (torch.multiprocessing, spawn context, env:// rendezvous on a free
loopback port). The stage-0 process also runs the one authoritative `core.Scheduler`
(the `Driver`): it takes generate jobs from the frontend over a queue, and returns
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

import os
import queue
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from core.batch import MicroBatch
from core.policies import make_policy
from core.request import Request
from core.scheduler import Scheduler, SchedulerConfig
from core.trace import Trace, TraceRecorder
from runtime.comm import Groups, SendQueue, StepMeta, TokenReceiver, isend_obj, recv_obj
from runtime.config import ModelConfig, layer_split
from runtime.sampling import SamplingParams
from runtime.worker import StageRunner, destroy_groups_quietly, run_stage, stage_main

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True, frozen=True)
class EngineConfig:
    """Everything a stage process needs to build its part (pickled to each of them)."""
    model_path: str | None            # HF directory (None: dummy weights of `model_cfg`)
    model_cfg: ModelConfig
    load_format: str = "safetensors"  # "safetensors" | "dummy"
    pp: int = 1
    layer_split: tuple[int, ...] = ()  # layers per stage (filled from pp when empty)
    num_pages: int | None = None      # KV pages; None: sized from memory on every stage
    page_size: int = 16
    kv_cache_gib: float | None = None  # KV memory per stage; None: 1 GiB on CPU, see below on GPU
    gpu_memory_utilization: float = 0.9
    device: str = "cpu"
    dtype: str | None = None          # None: the config's torch_dtype
    seed: int = 0
    num_threads: int | None = None    # torch threads per stage process (None: 1 on CPU)
    dist_timeout_s: float = 7 * 24 * 3600.0  # idle stages block in recv between generate calls
    startup_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        def bad(name: str, want: str, value: Any) -> ValueError:
            return ValueError(f"{name} must be {want}, got {value!r}")

        if self.load_format not in ("safetensors", "dummy"):
            raise bad("load_format", "'safetensors' or 'dummy'", self.load_format)
        if self.load_format == "safetensors" and self.model_path is None:
            raise ValueError("load_format 'safetensors' needs a model directory")
        if not (isinstance(self.pp, int) and self.pp >= 1):
            raise bad("pp", "an int >= 1", self.pp)
        split = layer_split(self.model_cfg.num_layers, self.pp, list(self.layer_split) or None)
        object.__setattr__(self, "layer_split", tuple(split))
        if self.num_pages is not None and not (isinstance(self.num_pages, int) and self.num_pages >= 1):
            raise bad("num_pages", "an int >= 1 (or None to size the KV cache from memory)", self.num_pages)
        if not (isinstance(self.page_size, int) and self.page_size >= 1):
            raise bad("page_size", "an int >= 1", self.page_size)
        if self.kv_cache_gib is not None and not (isinstance(self.kv_cache_gib, (int, float)) and self.kv_cache_gib > 0):
            raise bad("kv_cache_gib", "a number > 0", self.kv_cache_gib)
        if not (isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1):
            raise bad("gpu_memory_utilization", "a number in (0, 1]", self.gpu_memory_utilization)
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise bad("dtype", f"one of {sorted(_DTYPES)} or None", self.dtype)
        if self.num_threads is not None and not (isinstance(self.num_threads, int) and self.num_threads >= 1):
            raise bad("num_threads", "an int >= 1 or None", self.num_threads)
        dev = torch.device(self.device)
        if dev.type not in ("cpu", "cuda"):
            raise bad("device", "'cpu' or 'cuda'", self.device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
            if self.pp > 1 and torch.cuda.device_count() < self.pp and "WORLD_SIZE" not in os.environ:
                raise ValueError(f"pp={self.pp} on CUDA needs one GPU per stage; "
                                 f"{torch.cuda.device_count()} visible")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else _DTYPES[self.dtype]

    @property
    def backend(self) -> str:
        return "nccl" if torch.device(self.device).type == "cuda" else "gloo"

    def stage_device(self, stage: int) -> str:
        dev = torch.device(self.device)
        if dev.type == "cpu":
            return "cpu"
        if self.pp == 1:
            return str(dev) if dev.index is not None else "cuda:0"
        return f"cuda:{int(os.environ.get('LOCAL_RANK', stage))}"  # one GPU per stage

    def threads_for(self, multi_process: bool) -> int | None:
        """torch threads: the explicit value, else 1 per stage process on CPU (measured:
        2 threads per process thrash when stages share a 2-core machine); in-process pp=1
        leaves the caller's setting alone."""
        if self.num_threads is not None:
            return self.num_threads
        return 1 if multi_process and torch.device(self.device).type == "cpu" else None


@dataclass(slots=True)
class GenerateJob:
    """One generate call, already tokenized and validated (runtime.llm builds it)."""
    prompts: list[list[int]]
    max_tokens: list[int]
    stop_token_ids: list[frozenset[int]]
    params: list[SamplingParams]
    arrivals: list[float] | None = None   # seconds after the start; None: all at 0
    policy: str = "token_throttling"
    policy_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.prompts)
        for name in ("max_tokens", "stop_token_ids", "params"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} prompts")
        if self.arrivals is not None and len(self.arrivals) != n:
            raise ValueError(f"arrival_times has {len(self.arrivals)} entries for {n} prompts")


# Per-micro-batch columns the runtime adds to every stage row of its batches table: the
# two attention features the latency model uses (so a runtime trace can be fitted like a
# profile), and when stage 0's driver took the sampled tokens back (token return time).
BATCH_EXTRA_COLUMNS = ["batch_id", "prefill_attention_work", "decode_context", "returned"]


@dataclass(slots=True)
class GenerateResult:
    requests: list[Request]            # in prompt order, with outputs and timings
    recorder: TraceRecorder            # scheduler samples + every stage's busy rows
    meta: dict[str, Any]
    batch_extras: list[tuple] = field(default_factory=list)   # BATCH_EXTRA_COLUMNS rows

    def trace(self) -> Trace:
        import pandas as pd

        trace = self.recorder.build(self.requests, self.meta)
        batches = trace.batches.sort_values(["batch_id", "stage"], kind="stable", ignore_index=True)
        if self.batch_extras:
            extra = pd.DataFrame(self.batch_extras, columns=BATCH_EXTRA_COLUMNS)
            batches = batches.merge(extra, on="batch_id", how="left", sort=False)
        trace.batches = batches
        return trace


# ------------------------------------------------------------------ pipes (stage 0's side)

class LocalPipe:
    """pp = 1: the one stage computes and samples at launch; results wait in a deque."""

    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner
        self._done: deque[tuple[int, list[int]]] = deque()

    def launch(self, m: StepMeta, ids: list[int]) -> float:
        """Run the batch; returns the perf_counter time its result was handed off."""
        r = self.runner
        r.check_fault(m.batch_id)
        x = torch.tensor(ids, dtype=torch.long, device=r.device)
        logits = r.forward(x, r.build_meta(m))
        self._done.append((m.batch_id, r.sample(logits, m)))
        return time.perf_counter()

    def poll(self, timeout: float | None) -> tuple[int, list[int]] | None:
        return self._done.popleft() if self._done else None

    def collect(self) -> list[tuple]:
        self.runner.reset()
        return []

    def stream_rows(self) -> None:
        pass  # online serving: stage 0 records its own rows

    def close(self) -> None:
        pass


class DistPipe:
    """pp > 1 on stage 0: metadata to every stage at launch, stage 0's layers here,
    activations to stage 1, sampled tokens back from the last stage on a thread."""

    def __init__(self, runner: StageRunner, g: Groups) -> None:
        self.runner, self.g = runner, g
        self.others = list(range(1, g.world))
        self.sends = SendQueue(keep=g.world + 1)
        self.receiver = TokenReceiver(g.world - 1, g.tokens)
        self._closed = False

    def launch(self, m: StepMeta, ids: list[int]) -> float:
        r = self.runner
        isend_obj(("batch", m), self.others, self.g.ctrl, self.sends)  # stages prepare early
        self.receiver.expect(m.batch_id, m.num_samples)
        r.check_fault(m.batch_id)
        x = torch.tensor(ids, dtype=torch.long, device=r.device)
        hidden, residual = r.forward(x, r.build_meta(m))
        x = torch.stack((hidden, residual))  # one message, not two: see runtime.comm
        r.sync()  # on GPU: the busy interval ends when the kernels are done
        self.sends.add(torch.distributed.isend(x, 1, group=self.g.next), x)
        end = time.perf_counter()  # handed off: stage 1 may start from here
        self.sends.close_launch()
        return end

    def poll(self, timeout: float | None) -> tuple[int, list[int]] | None:
        return self.receiver.get(timeout)

    def stream_rows(self) -> None:
        """Online serving: the other stages push their busy rows to the frontend."""
        isend_obj(("stream_rows", None), self.others, self.g.ctrl, self.sends)

    def collect(self) -> list[tuple]:
        """Every stage's busy rows of this generate call (epoch seconds)."""
        isend_obj(("collect", None), self.others, self.g.ctrl, self.sends)
        rows: list[tuple] = []
        for s in self.others:
            rows.extend(recv_obj(s, self.g.reply))
        self.sends.drain()
        self.runner.reset()
        return rows

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            isend_obj(("stop", None), self.others, self.g.ctrl, self.sends)
            self.sends.drain()
            self.receiver.close()
        finally:
            destroy_groups_quietly()


# ------------------------------------------------------------------ the driver loop

class Driver:
    """Stage 0's loop: inject arrivals, hand completions to the scheduler, launch what it
    decides, and wait (without spinning) only when nothing can be launched."""

    def __init__(self, opts: EngineConfig, runner: StageRunner, pipe: LocalPipe | DistPipe,
                 num_pages: int) -> None:
        self.opts, self.runner, self.pipe, self.num_pages = opts, runner, pipe, num_pages

    def run(self, job: GenerateJob) -> GenerateResult:
        o = self.opts
        recorder = TraceRecorder()
        sched = Scheduler(SchedulerConfig(o.pp, self.num_pages, o.page_size),
                          make_policy(job.policy, job.policy_params), recorder)
        n = len(job.prompts)
        arrivals = job.arrivals or [0.0] * n
        requests = [Request(id=i, prompt_len=len(p), max_output=job.max_tokens[i], arrival=float(arrivals[i]),
                            prompt_ids=list(p), stop_token_ids=job.stop_token_ids[i])
                    for i, p in enumerate(job.prompts)]
        order = sorted(range(n), key=lambda i: (requests[i].arrival, i))
        greedy = all(p.greedy for p in job.params)
        launched: dict[int, MicroBatch] = {}
        release: list[int] = []
        extras: list[tuple] = []
        t0 = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - t0

        def complete(got: tuple[int, list[int]]) -> None:
            batch = launched.pop(got[0])
            now = clock()
            extras.append((batch.id, batch.prefill_attention_work, batch.decode_context, now))
            release.extend(r.id for r in sched.complete(batch, now, got[1]))

        k = 0
        while True:
            now = clock()
            while k < n and requests[order[k]].arrival <= now:
                sched.add(requests[order[k]], now)
                k += 1
            while (got := self.pipe.poll(0)) is not None:
                complete(got)
            if sched.has_work:
                start = clock()
                batch = sched.next_batch(start)
                if batch is not None:
                    launched[batch.id] = batch
                    m, ids = self._meta(batch, job.params, greedy, release)
                    release = []
                    end = self.pipe.launch(m, ids) - t0
                    recorder.stage(batch.id, 0, start, end, batch.prefill_tokens,
                                   batch.decode_tokens, len(batch))
                    continue
            elif k == n and not launched:
                break
            # Nothing to launch: wait for the oldest micro-batch or the next arrival.
            timeout = max(0.0, requests[order[k]].arrival - clock()) if k < n else None
            if launched:
                if (got := self.pipe.poll(timeout)) is not None:
                    complete(got)
            elif timeout is not None:
                time.sleep(timeout)
            else:
                raise RuntimeError("scheduler holds unfinished requests but launched nothing "
                                   "with nothing in flight")
        t0_epoch = t0 + self.runner.offset
        recorder.add_stage_rows((b, s, start - t0_epoch, end - t0_epoch, *rest)
                                for b, s, start, end, *rest in self.pipe.collect())
        meta = {"world": "runtime", "pp": o.pp, "policy": job.policy, "policy_params": dict(job.policy_params),
                "seed": o.seed, "model": o.model_path or f"dummy:{o.model_cfg.model_type}",
                "model_type": o.model_cfg.model_type, "layer_split": list(o.layer_split),
                "num_pages": self.num_pages, "page_size": o.page_size, "device": o.device,
                "dtype": str(self.runner.model.dtype).removeprefix("torch."),
                "threads_per_stage": o.threads_for(o.pp > 1) or torch.get_num_threads(),
                "forced_batches": sched.forced_batches, "torch": torch.__version__}
        return GenerateResult(requests, recorder, meta, extras)

    def _meta(self, batch: MicroBatch, params: Sequence[SamplingParams], greedy: bool,
              release: list[int]) -> tuple[StepMeta, list[int]]:
        """The metadata every stage gets, and the packed token ids stage 0 embeds."""
        its, ps = batch.items, self.opts.page_size  # decodes first, then chunks: token order
        sample_ids = [it.request.id for it in its if it.samples]
        ids: list[int] = []
        for it in its:
            r, end = it.request, it.start + it.num_tokens
            p = r.prompt_len
            if it.start >= p:      # a decode (or a recompute past the prompt)
                ids.extend(r.output_ids[it.start - p:end - p])
            else:                  # prompt, maybe running on into generated tokens (recompute)
                ids.extend(r.prompt_ids[it.start:end])
                if end > p:
                    ids.extend(r.output_ids[:end - p])
        return StepMeta(
            batch_id=batch.id,
            starts=[it.start for it in its],
            lens=[it.num_tokens for it in its],
            # a copy of just the pages this pass reads: the request's list keeps growing
            pages=[it.request.pages[:-(-it.context_len // ps)] for it in its],
            samples=[it.samples for it in its],
            prefill_tokens=batch.prefill_tokens,
            decode_tokens=batch.decode_tokens,
            sample_ids=sample_ids,
            sample_params=None if greedy else [params[i] for i in sample_ids],
            release=tuple(release),
        ), ids

    def close(self) -> None:
        self.pipe.close()


# ------------------------------------------------------------------ the engine (frontend)

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


_COMM_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                "receiving sampled tokens from stage", "Socket Timeout", "ECONNRESET")


class StageFailure(RuntimeError):
    """A pipeline stage raised or died; the message names the stage."""


class OnlineChannel:
    """Commands to runtime.online.serve_online and its events back: over the spawned
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
        self._kill()
        reported = {ev[1] for ev in events}
        causes, echoes = [], []
        for _, rank, tb in events:
            last = tb.strip().splitlines()[-1] if tb.strip() else "?"
            line = f"pipeline stage {rank} failed: {last}"
            (echoes if any(c in tb for c in _COMM_ERRORS) else causes).append((line, tb))
        dead = []
        for rank, p in enumerate(self._procs):
            if rank not in reported and p.exitcode not in (None, 0):
                code = p.exitcode
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
    def open_stream(self, policy: str, policy_params: dict[str, Any]) -> OnlineChannel:
        """Switch the engine to online serving (runtime.online); it serves until shutdown."""
        from runtime.online import serve_online

        if self.mode == "torchrun":
            raise ValueError("online serving runs stages it spawns itself (or pp=1), not under torchrun")
        if self._closed or self._failed is not None:
            raise RuntimeError("the engine is shut down")
        if self.mode == "spawn":
            self._cmd.put(("serve", (policy, policy_params)))
            return OnlineChannel(self, self._cmd, self._events)
        import threading

        cmd, events = queue.Queue(), queue.Queue()

        def run() -> None:
            try:
                serve_online(self._driver, cmd, events, policy, policy_params)
            except BaseException:  # noqa: BLE001 - reported to the frontend
                import traceback
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
                thread.join(30.0)
            if self._driver is not None:
                self._driver.close()
            self._driver = None
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
