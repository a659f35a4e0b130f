"""Stage 0's side of a pipeline: the scheduler loop that drives it.

`Stage0Loop` (runtime.stage0_loop) is the cycle, written once: take new work, hand
returned micro-batches to the core scheduler, launch the next batch it decides (its
metadata to every stage, via the pipe, runtime.pipes), and wait without spinning only
when nothing can be launched. Two kinds of work feed it, both here:
- `GenerateLoop`: one offline generate job (`LLM.generate`): arrivals injected at their
  instants, ends when every request is finished; the result is the requests and trace.
- `OnlineLoop`: online serving (`AsyncLLM`): ("add" | "abort" | "stop", payload)
  commands come in on a queue; ("step", deltas, stats) after every finished micro-batch
  (also one that produced no token: the frontend's watchdog counts them as progress) and
  ("rows", busy rows) now and then go out; runs until "stop". A request whose token could
  not be sampled (runtime.sampling.FAILED) ends alone with finish reason "error".
`Driver` holds what both need (config, stage 0's runner, the pipe, the KV page count).
"""
from __future__ import annotations

import itertools
import multiprocessing
import queue
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from core.batch import MicroBatch
from core.policies import make_policy
from core.request import Request
from core.scheduler import Scheduler, SchedulerConfig
from core.trace import Trace, TraceRecorder
from runtime.engine_config import EngineConfig
from runtime.pipes import DistPipe, LocalPipe
from runtime.sampling import FAILED, SamplingParams
from runtime.stage0_loop import Stage0Loop, page_list
from runtime.worker import StageRunner

_POLL_S = 0.002        # online: how long stage 0 waits on the pipe before looking for new commands
_ROWS_EVERY_S = 0.5    # online: how often busy rows travel to the frontend
_FINISH = {"aborted": "abort"}  # core reasons -> OpenAI-style ones ("length", "stop" as is)


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
    # core.cost_model.StageTimeModel the policy may price batches with (time_balanced needs
    # one): the latency model of the table, measured or in situ, that describes this pipeline.
    stage_time_model: Any = None

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


class Driver:
    """Stage 0's part of the pipeline: runs generate jobs and online serving on it."""

    def __init__(self, opts: EngineConfig, runner: StageRunner, pipe: LocalPipe | DistPipe,
                 num_pages: int) -> None:
        self.opts, self.runner, self.pipe, self.num_pages = opts, runner, pipe, num_pages

    def scheduler(self, policy: str, policy_params: dict, recorder: TraceRecorder | None = None,
                  stage_time_model: Any = None) -> Scheduler:
        o = self.opts
        return Scheduler(SchedulerConfig(o.pp, self.num_pages, o.page_size), make_policy(policy, policy_params),
                         recorder, stage_time_model=stage_time_model)

    def run(self, job: GenerateJob) -> GenerateResult:
        """One offline generate job to completion."""
        loop = GenerateLoop(self, job)
        loop.run()
        return loop.result()

    def serve(self, inbox: Any, outbox: Any, policy: str, policy_params: dict, stage_time_model: Any = None) -> None:
        """Online serving until a ("stop", None) command on `inbox` (see OnlineLoop)."""
        OnlineLoop(self, inbox, outbox, policy, policy_params, stage_time_model).run()

    def close(self) -> None:
        self.pipe.close()


class GenerateLoop(Stage0Loop):
    """One generate job: arrivals at their instants, until every request is finished."""

    def __init__(self, driver: Driver, job: GenerateJob) -> None:
        self.job = job
        self.recorder = TraceRecorder()
        sched = driver.scheduler(job.policy, job.policy_params, self.recorder, job.stage_time_model)
        n = self.n = len(job.prompts)
        arrivals = job.arrivals or [0.0] * n
        self.requests = [Request(id=i, prompt_len=len(p), max_output=job.max_tokens[i], arrival=float(arrivals[i]),
                                 prompt_ids=list(p), stop_token_ids=job.stop_token_ids[i], pages=page_list())
                         for i, p in enumerate(job.prompts)]
        self.order = sorted(range(n), key=lambda i: (self.requests[i].arrival, i))
        self.k = 0                       # requests handed to the scheduler, in arrival order
        self.params = job.params
        self._greedy = all(p.greedy for p in job.params)
        self.extras: list[tuple] = []
        super().__init__(driver, sched)

    @property
    def greedy(self) -> bool:
        return self._greedy

    def take_work(self) -> bool:
        now = self.clock()
        while self.k < self.n and self.requests[self.order[self.k]].arrival <= now:
            self.sched.add(self.requests[self.order[self.k]], now)
            self.k += 1
        return True

    def completed(self, batch: MicroBatch, tokens: list[int]) -> None:
        if FAILED in tokens:
            failed = [it.request.id for it, t in zip([it for it in batch.items if it.samples], tokens) if t == FAILED]
            raise RuntimeError(f"micro-batch {batch.id}: non-finite logits, no token for request(s) {failed}")
        now = self.clock()
        self.extras.append((batch.id, batch.prefill_attention_work, batch.decode_context, now))
        self.release.extend(r.id for r in self.sched.complete(batch, now, tokens))

    def launched_row(self, batch: MicroBatch, start: float, end: float) -> None:
        self.recorder.stage(batch.id, 0, start, end, batch.prefill_tokens, batch.decode_tokens, len(batch))

    def wait(self, had_work: bool) -> bool:
        if not had_work and self.k == self.n and not self.launched:
            return False
        # wait for the oldest micro-batch or the next arrival
        timeout = max(0.0, self.requests[self.order[self.k]].arrival - self.clock()) if self.k < self.n else None
        if self.launched:
            if (got := self.pipe.poll(timeout)) is not None:
                self.complete(got)
        elif timeout is not None:
            time.sleep(timeout)
        else:
            raise RuntimeError("scheduler holds unfinished requests but launched nothing "
                               "with nothing in flight")
        return True

    def result(self) -> GenerateResult:
        """The finished requests, every stage's busy rows and the run's meta."""
        o, d = self.driver.opts, self.driver
        t0_epoch = self.t0 + d.runner.offset
        self.recorder.add_stage_rows((b, s, start - t0_epoch, end - t0_epoch, *rest)
                                     for b, s, start, end, *rest in self.pipe.collect())
        job = self.job
        meta = {"world": "runtime", "pp": o.pp, "policy": job.policy, "policy_params": dict(job.policy_params),
                "seed": o.seed, "model": o.model_path or f"dummy:{o.model_cfg.model_type}",
                "model_type": o.model_cfg.model_type, "layer_split": list(o.layer_split),
                "num_pages": d.num_pages, "page_size": o.page_size, "device": o.device,
                "dtype": str(d.runner.model.dtype).removeprefix("torch."),
                "threads_per_stage": o.threads_for(o.pp > 1) or torch.get_num_threads(),
                "forced_batches": self.sched.forced_batches, "torch": torch.__version__}
        return GenerateResult(self.requests, self.recorder, meta, self.extras)


class OnlineLoop(Stage0Loop):
    """Online serving: requests are added and aborted by commands at any time; token
    deltas, queue/KV stats and stage 0's busy rows stream out on `outbox`."""

    def __init__(self, driver: Driver, inbox: Any, outbox: Any, policy: str, policy_params: dict,
                 stage_time_model: Any = None) -> None:
        self.inbox, self.outbox = inbox, outbox
        sched = driver.scheduler(policy, policy_params, None, stage_time_model)
        self.live: dict[int, Request] = {}
        self.sent: dict[int, int] = {}          # output tokens already reported, per live request
        self.params: dict[int, SamplingParams] = {}
        self.non_greedy = 0
        self.deltas: list[tuple[int, tuple[int, ...], str | None]] = []
        self.rows: list[tuple] = []
        self.last_stats: tuple = ()
        self.progressed = False           # a micro-batch returned since the last "step"
        super().__init__(driver, sched)
        self.epoch0 = self.t0 + driver.runner.offset
        self.last_rows = self.t0
        self.pipe.stream_rows()

    @property
    def greedy(self) -> bool:
        return self.non_greedy == 0

    def take_work(self) -> bool:
        try:
            while True:
                if not self.handle(*self.inbox.get_nowait()):
                    self.flush()
                    return False
        except queue.Empty:
            return True

    def handle(self, cmd: str, payload: Any) -> bool:
        """Apply one command; False for "stop"."""
        if cmd == "add":
            rid, prompt, max_tokens, stop_ids, sp = payload
            r = Request(id=rid, prompt_len=len(prompt), max_output=max_tokens, arrival=self.clock(),
                        prompt_ids=prompt, stop_token_ids=stop_ids, pages=page_list())
            self.live[rid], self.sent[rid], self.params[rid] = r, 0, sp
            self.non_greedy += not sp.greedy
            if not self.sched.add(r, r.arrival):  # the frontend checks lengths first; never silent
                self.deltas.append((rid, (), r.finish_reason))
                self.forget(rid)
            # the scheduler's every-request history would grow for as long as we serve
            self.sched.requests.clear()
        elif cmd == "abort":
            r = self.live.get(payload)
            if r is not None:
                self.sched.abort(r, self.clock())
                self.deltas.append((payload, (), "abort"))
                self.forget(payload)
        elif cmd == "stop":
            return False
        else:
            raise ValueError(f"online serving: unknown command {cmd!r}")
        return True

    def forget(self, rid: int) -> None:
        self.live.pop(rid, None)
        self.sent.pop(rid, None)
        if not self.params.pop(rid).greedy:
            self.non_greedy -= 1
        self.release.append(rid)

    def completed(self, batch: MicroBatch, tokens: list[int]) -> None:
        self.progressed = True
        failed = []
        if FAILED in tokens:
            sampled = [it.request for it in batch.items if it.samples]
            failed = [r for r, t in zip(sampled, tokens) if t == FAILED]
            tokens = [0 if t == FAILED else t for t in tokens]   # a placeholder the request never reports
        now = self.clock()
        self.sched.complete(batch, now, tokens)
        for r in failed:
            if r.id in self.live:
                if not r.is_finished:
                    self.sched.abort(r, now)
                self.deltas.append((r.id, (), "error"))
                self.forget(r.id)
        for r in itertools.chain(batch.decodes, (it.request for it in batch.chunks)):
            k = self.sent.get(r.id)
            if k is None:   # aborted while in flight
                continue
            n = len(r.output_ids)
            if n > k or r.is_finished:
                reason = _FINISH.get(r.finish_reason, r.finish_reason) if r.is_finished else None
                self.deltas.append((r.id, tuple(r.output_ids[k:n]), reason))
                self.sent[r.id] = n
                if r.is_finished:
                    self.forget(r.id)

    def after_completions(self) -> None:
        self.flush()

    def flush(self) -> None:
        """Send new tokens, and the queue/KV state whenever it changed (an aborted
        request's pages come free only when its last in-flight batch returns)."""
        s = self.sched
        stats = (s.num_unfinished - s.num_waiting, s.num_waiting, s.total_pages - s.free_pages, s.total_pages)
        if self.deltas or stats != self.last_stats or self.progressed:
            self.outbox.put(("step", self.deltas, stats))
            self.deltas, self.last_stats, self.progressed = [], stats, False

    def launched_row(self, batch: MicroBatch, start: float, end: float) -> None:
        self.rows.append((batch.id, 0, self.epoch0 + start, self.epoch0 + end, batch.prefill_tokens,
                          batch.decode_tokens, len(batch)))

    def wait(self, had_work: bool) -> bool:
        if self.rows and time.perf_counter() - self.last_rows > _ROWS_EVERY_S:
            self.outbox.put(("rows", self.rows))
            self.rows, self.last_rows = [], time.perf_counter()
        if self.launched:
            if (got := self.pipe.poll(_POLL_S)) is not None:
                self.complete(got)
            return True
        try:
            cmd = self.inbox.get(timeout=_ROWS_EVERY_S)
        except queue.Empty:
            parent = multiprocessing.parent_process()
            # orphaned (the server was killed): end, and the stages shut down
            return parent is None or parent.is_alive()
        if not self.handle(*cmd):
            self.flush()
            return False
        return True
