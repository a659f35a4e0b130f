"""SimPy model of one pipeline-parallel replica around the core Scheduler.

Actors (one generator each, as in SimPy's examples):
  arrivals   injects requests at their arrival instants;
  scheduler  the core Scheduler on stage 0's host: woken by arrivals and completions, it
             forms micro-batches while fewer than `pp` are in flight, paying the profiled
             scheduling overhead per micro-batch;
  pipeline   `pp` FIFO stages joined by FIFO links; the last stage returns sampled tokens
             to stage 0, and then the batch completes in the scheduler.

Same-instant order (tested): events at one instant fire in the order they were scheduled.
Arrivals and completions wake the scheduler through an event, which SimPy queues behind
every event already due at that instant; so the decision at time t sees every arrival and
completion at t, whatever their order.

Stage timing: each stage and link is a single FIFO server, and a micro-batch's service
times are known when it is dispatched, so its whole path is fixed at dispatch by the
tandem-queue (Lindley) recursion start = max(ready, server free). That is exactly what
SimPy resources compute (stage_model="resources" does it with simpy.Resource and is tested
to give identical traces) at a fraction of the events, which is what makes a 19k-request
trace run in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import simpy

from core.batch import MicroBatch
from core.request import Request
from core.scheduler import Scheduler
from core.trace import TraceRecorder

TOKEN_ID_BYTES = 8  # sampled token ids travel last stage -> stage 0 as int64


class StageLatency(Protocol):
    """What the simulator needs from a latency model (profiles.LatencyModel fits one)."""
    sched_overhead: float
    def stage_time(self, stage: int, prefill_tokens: float, decode_tokens: float,
                   prefill_attention_work: float, decode_context: float) -> float: ...
    def activation_bytes(self, num_tokens: int) -> int: ...
    def transfer_time(self, num_bytes: float) -> float: ...


@dataclass(slots=True)
class ConstantLatency:
    """Every stage takes `stage` seconds whatever the batch: for closed-form checks."""
    stage: float
    transfer: float = 0.0
    sched_overhead: float = 0.0
    token_return: float = 0.0

    def stage_time(self, stage: int, *shape: float) -> float:
        return self.stage

    def activation_bytes(self, num_tokens: int) -> int:
        return num_tokens

    def transfer_time(self, num_bytes: float) -> float:
        # Activations cost `transfer`; token ids (tiny) cost `token_return`.
        return self.transfer if num_bytes > 0 else 0.0


class PipelineSim:
    def __init__(self, env: simpy.Environment, scheduler: Scheduler, latency: StageLatency,
                 recorder: TraceRecorder, stage_model: str = "recursion") -> None:
        self.env = env
        self.sched = scheduler
        self.latency = latency
        self.recorder = recorder
        self.pp = scheduler.pp
        self.stage_model = stage_model
        self._wake = env.event()
        self._stage_free = [0.0] * self.pp
        self._link_free = [0.0] * max(0, self.pp - 1)
        if stage_model == "resources":
            self._stages = [simpy.Resource(env, capacity=1) for _ in range(self.pp)]
            self._links = [simpy.Resource(env, capacity=1) for _ in range(self.pp - 1)]

    def start(self, requests: list[Request]) -> None:
        self.env.process(self._arrivals(requests))
        self.env.process(self._scheduler())

    def _poke(self) -> None:
        if not self._wake.triggered:
            self._wake.succeed()

    def _arrivals(self, requests: list[Request]):
        env, i, n = self.env, 0, len(requests)
        while i < n:
            if requests[i].arrival > env.now:
                yield env.timeout(requests[i].arrival - env.now)
            while i < n and requests[i].arrival <= env.now:
                self.sched.add(requests[i], env.now)
                i += 1
            self._poke()

    def _scheduler(self):
        env, sched = self.env, self.sched
        overhead = self.latency.sched_overhead
        while True:
            yield self._wake
            self._wake = env.event()
            while (batch := sched.next_batch(env.now)) is not None:
                if overhead > 0:
                    yield env.timeout(overhead)
                self._dispatch(batch)

    def _token_return(self, batch: MicroBatch) -> float:
        if self.pp == 1:
            return 0.0
        if isinstance(self.latency, ConstantLatency):
            return self.latency.token_return
        return self.latency.transfer_time(TOKEN_ID_BYTES * batch.num_samples)

    def _durations(self, batch: MicroBatch) -> tuple[list[float], float]:
        lat = self.latency
        shape = (batch.prefill_tokens, batch.decode_tokens, batch.prefill_attention_work, batch.decode_context)
        stages = [lat.stage_time(s, *shape) for s in range(self.pp)]
        return stages, lat.transfer_time(lat.activation_bytes(batch.num_tokens))

    def _dispatch(self, batch: MicroBatch) -> None:
        if self.stage_model == "resources":
            self.env.process(self._run_with_resources(batch))
            return
        stages, transfer = self._durations(batch)
        rec, t = self.recorder, self.env.now
        for s, duration in enumerate(stages):
            start = t if t > self._stage_free[s] else self._stage_free[s]
            end = start + duration
            self._stage_free[s] = end
            rec.stage(batch.id, s, start, end, batch.prefill_tokens, batch.decode_tokens, len(batch))
            t = end
            if s < self.pp - 1:
                link_start = t if t > self._link_free[s] else self._link_free[s]
                t = link_start + transfer
                self._link_free[s] = t
        done = self.env.timeout(t + self._token_return(batch) - self.env.now)
        done.callbacks.append(lambda _event, b=batch: self._complete(b))

    def _run_with_resources(self, batch: MicroBatch):
        env = self.env
        stages, transfer = self._durations(batch)
        for s, duration in enumerate(stages):
            with self._stages[s].request() as slot:
                yield slot
                start = env.now
                yield env.timeout(duration)
                self.recorder.stage(batch.id, s, start, env.now, batch.prefill_tokens,
                                    batch.decode_tokens, len(batch))
            if s < self.pp - 1:
                with self._links[s].request() as link:
                    yield link
                    yield env.timeout(transfer)
        yield env.timeout(self._token_return(batch))
        self._complete(batch)

    def _complete(self, batch: MicroBatch) -> None:
        self.sched.complete(batch, self.env.now)
        self._poke()
