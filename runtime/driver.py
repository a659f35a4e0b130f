"""Stage 0's side of a pipeline: the driver loop around the core scheduler and the pipes
it launches micro-batches into.

`Driver.run` serves one offline generate job: inject arrivals at their instants, hand
completions to the scheduler, launch what it decides, and wait (without spinning) only
when nothing can be launched. `LocalPipe` runs the one stage in-process (pp = 1);
`DistPipe` sends metadata to every stage, computes stage 0 here, passes activations on
and receives sampled tokens from the last stage on a thread. runtime.online reuses the
same driver and pipes for online serving.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from core.batch import MicroBatch
from core.policies import make_policy
from core.request import Request
from core.scheduler import Scheduler, SchedulerConfig
from core.trace import Trace, TraceRecorder
from runtime.comm import Groups, SendQueue, StepMeta, TokenReceiver, isend_obj, recv_obj
from runtime.sampling import SamplingParams
from runtime.worker import StageRunner, destroy_groups_quietly

if TYPE_CHECKING:
    from runtime.engine import EngineConfig


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
        end = time.perf_counter()  # before posting the send, as the other stages (runtime.worker)
        self.sends.add(torch.distributed.isend(x, 1, group=self.g.next), x)
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

    def __init__(self, opts: "EngineConfig", runner: StageRunner, pipe: LocalPipe | DistPipe,
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
                    m, ids = self.step_meta(batch, job.params, greedy, release)
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

    def step_meta(self, batch: MicroBatch, params: Sequence[SamplingParams], greedy: bool,
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
