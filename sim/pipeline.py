"""SimPy model of one pipeline-parallel replica around the core Scheduler.

Actors:
  arrivals   a SimPy process that injects requests at their arrival instants;
  scheduler  the core Scheduler on stage 0's host: woken by arrivals and completions, it
             forms micro-batches while fewer than `pp` are in flight, paying the profiled
             scheduling overhead per micro-batch (callbacks that behave exactly like the
             plain SimPy process, minus the events nothing can fall between; see
             PipelineSim._decide and tests/test_sim.py);
  pipeline   `pp` FIFO stages joined by FIFO links; the last stage returns sampled tokens
             to stage 0, and then the batch completes in the scheduler.

Same-instant order (tested): events at one instant fire in the order they were scheduled.
Arrivals and completions wake the scheduler through an event, which SimPy queues behind
every event already due at that instant; so the decision at time t sees every arrival and
completion at t, whatever their order.

Driver on stage 0 (`driver_on_stage0`, as in pipetwin's runtime, where stage 0's process
runs the scheduler and stage 0's forward in one thread): the scheduler takes completions
and decides only while stage 0 is not computing. A completion that arrives while stage 0
computes is taken when it finishes (that is also when its tokens are timestamped), and a
decision waits for stage 0 likewise. Without it the scheduler reacts at once and a batch
formed while stage 0 is busy queues in front of it.

Stage jitter (optional, SimConfig.stage_jitter): each micro-batch's stage times are the
latency model's times multiplied by one row of the profile's measured jitter (per stage:
the time over its shape's median), drawn at dispatch from a seeded generator. Stage-time
variation is a cause of bubbles in its own right (a stage waits on a slow predecessor),
which a simulator timed by the fit alone underestimates.

Stage turnaround (the latency model's optional `stage_turnaround`, measured in situ): a
stage stays occupied that long after each row ends (the runtime's stage thread posts its
send and takes the next batch off its inbox outside its busy rows), so a waiting batch
starts that much later; the batch that just ended moves on at once.

Stage timing: each stage and link is a single FIFO server, and a micro-batch's service
times are known when it is dispatched, so its whole path is fixed at dispatch by the
tandem-queue (Lindley) recursion start = max(ready, server free). That is exactly what
SimPy resources compute (stage_model="resources" does it with simpy.Resource and is tested
to give identical traces) at a fraction of the events, which is what makes a 19k-request
trace run in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import simpy

from core.batch import MicroBatch
from core.request import Request
from core.scheduler import Scheduler
from core.trace import TraceRecorder
from profiles.latency_model import SlowestStage

TOKEN_ID_BYTES = 8  # sampled token ids travel last stage -> stage 0 as int64


class StageLatency(Protocol):
    """What the simulator needs from a latency model (profiles.LatencyModel fits one).
    It may also have `stage_turnaround` (seconds per stage; absent or empty: 0) and
    `sched_overhead_per_item` (seconds per micro-batch item on top of `sched_overhead`;
    absent: 0)."""
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
    stage_turnaround: tuple[float, ...] = ()
    sched_overhead_per_item: float = 0.0

    def stage_time(self, stage: int, *shape: float) -> float:
        return self.stage

    def activation_bytes(self, num_tokens: int) -> int:
        return num_tokens

    def transfer_time(self, num_bytes: float) -> float:
        # Activations cost `transfer`; token ids (tiny) cost `token_return`.
        return self.transfer if num_bytes > 0 else 0.0


class StageJitter:
    """Draws, per micro-batch, one measured row of per-stage time ratios from batches of
    about its size: rows are grouped by octave of tokens (1, 2-3, 4-7, ...), because the
    measured variation shrinks as batches grow (on the CPU table: ~14% log std at one
    token, ~4% at 64+). An octave with fewer than `min_rows` rows borrows the nearest one
    that has them (the larger on a tie). Uniform draws from a seeded generator: the same
    seed and batches give the same draws.

    `level` ({octave: per-stage factor}, optional) multiplies the draws for batches of
    that octave: the ratios are relative to a shape's median, so the latency model's time
    is first brought to the median of what was measured at that size (see
    sim.run.jitter_level)."""

    def __init__(self, tokens: np.ndarray, ratios: np.ndarray, seed: int, min_rows: int = 20,
                 block: int = 1024, level: dict[int, Sequence[float]] | None = None) -> None:
        self.ratios = np.asarray(ratios, dtype=float)
        tokens = np.asarray(tokens)
        if self.ratios.ndim != 2 or not len(self.ratios) or not (self.ratios > 0).all() \
                or tokens.shape != (len(self.ratios),) or not (tokens >= 1).all():
            raise ValueError("stage jitter needs token counts >= 1 and a matching 2-D array of positive ratios")
        octave = np.floor(np.log2(tokens)).astype(int)
        counts = np.bincount(octave)
        enough = np.flatnonzero(counts >= min_rows)
        if not len(enough):
            enough = np.flatnonzero(counts)  # too few rows anywhere: every octave that has some
        self._rows_of = []   # octave -> indices of the rows it draws from
        for o in range(len(counts)):
            near = enough[np.abs(enough - o) == np.abs(enough - o).min()].max()
            self._rows_of.append(np.flatnonzero(octave == near))
        self._rng = np.random.default_rng(seed)
        self._block = block
        self._level = {int(o): np.asarray(f, dtype=float) for o, f in (level or {}).items()}
        if any(f.shape != (self.ratios.shape[1],) or not (f > 0).all() for f in self._level.values()):
            raise ValueError("stage jitter level needs one positive factor per stage for each octave")
        self._queued: dict[int, list[list[float]]] = {}

    def draw(self, tokens: int) -> list[float]:
        octave = max(int(tokens), 1).bit_length() - 1
        o = min(octave, len(self._rows_of) - 1)
        queue = self._queued.get(octave)
        if not queue:   # in blocks: one numpy call per many batches of this octave
            rows = self._rows_of[o]
            drawn = self.ratios[rows[self._rng.integers(len(rows), size=self._block)]]
            if octave in self._level:
                drawn = drawn * self._level[octave]
            queue = self._queued[octave] = drawn.tolist()
        return queue.pop()


class PipelineSim:
    def __init__(self, env: simpy.Environment, scheduler: Scheduler, latency: StageLatency,
                 recorder: TraceRecorder, stage_model: str = "recursion", *,
                 driver_on_stage0: bool = False, jitter: StageJitter | None = None) -> None:
        self.env = env
        self.sched = scheduler
        self.latency = latency
        self.recorder = recorder
        self.pp = scheduler.pp
        self.stage_model = stage_model
        self._stage_free = [0.0] * self.pp
        if driver_on_stage0 and stage_model != "recursion":
            raise ValueError("driver_on_stage0 needs the recursion stage model")
        self.driver_on_stage0 = driver_on_stage0
        if jitter is not None and jitter.ratios.shape[1] != self.pp:
            raise ValueError(f"stage jitter has {jitter.ratios.shape[1]} stage columns for pp={self.pp}")
        self.jitter = jitter
        turnaround = tuple(getattr(latency, "stage_turnaround", ()) or ())
        if turnaround and len(turnaround) != self.pp:
            raise ValueError(f"stage_turnaround has {len(turnaround)} values for pp={self.pp}")
        self._turnaround = [float(v) for v in turnaround] or [0.0] * self.pp
        # stage 0's CPU work per micro-batch grows with its rows (profiles.measure)
        self._overhead_per_item = float(getattr(latency, "sched_overhead_per_item", 0.0) or 0.0)
        if self._overhead_per_item < 0:
            raise ValueError(f"sched_overhead_per_item must be >= 0, got {self._overhead_per_item}")
        self._link_free = [0.0] * max(0, self.pp - 1)
        # every stage's time of a batch shape in one call where the model offers it
        # (LatencyModel.stage_times), else stage by stage
        self._stage_times = latency.stage_times if getattr(latency, "pp", None) == self.pp \
            and callable(getattr(latency, "stage_times", None)) else self._each_stage_time
        # The scheduler prices batches with this very model (sim.run's default): a batch's
        # slowest-stage time, computed here to time it, is then its price, and time_balanced
        # need not compute it again (~90,000 predictions on the Azure conversation trace).
        pricing = scheduler.stage_time_model
        self._sets_price = isinstance(pricing, SlowestStage) and pricing.is_max_of(self._stage_times)
        self._token_return_s = (latency.token_return if isinstance(latency, ConstantLatency) else None) \
            if self.pp > 1 else 0.0
        # Event-saving shortcuts (see `_decide`, `_complete`) for the recursion model, whose
        # completions are bare timeouts; `resources`, the reference, keeps every event.
        self._shortcuts = stage_model == "recursion"
        # The scheduler actor is a set of callbacks rather than a SimPy process: it does
        # exactly what the process `while True: yield wake; while batch: yield overhead;
        # dispatch` did (same calls, same times, same event order), without a generator
        # resume per step. `_idle` is "blocked on `_wake`"; a processed `_wake` found when
        # going idle means "woken while busy: decide again at once", as `yield` of a
        # processed event continues at once.
        self._idle = True
        self._new_wake()
        if stage_model == "resources":
            self._stages = [simpy.Resource(env, capacity=1) for _ in range(self.pp)]
            self._links = [simpy.Resource(env, capacity=1) for _ in range(self.pp - 1)]

    def start(self, requests: list[Request]) -> None:
        self.env.process(self._arrivals(requests))

    def _new_wake(self) -> None:
        self._wake = wake = self.env.event()
        wake.callbacks.append(self._woken)

    def _poke(self) -> None:
        """Wake the scheduler through an event: SimPy queues it behind every event already
        due now, so the decision sees everything that happens at this instant."""
        if not self._wake.triggered:
            self._wake.succeed()

    def _woken(self, _wake: simpy.Event) -> None:
        if self._idle:  # else it was busy: `_decide` finds this event processed when it goes idle
            self._new_wake()
            self._decide(self.env.now)

    def _arrivals(self, requests: list[Request]):
        env, i, n = self.env, 0, len(requests)
        while i < n:
            if requests[i].arrival > env.now:
                yield env.timeout(requests[i].arrival - env.now)
            while i < n and requests[i].arrival <= env.now:
                self.sched.add(requests[i], env.now)
                i += 1
            self._poke()

    def _decide(self, now: float) -> None:
        """Form micro-batches at `now` (= env.now) while the scheduler gives them; each one
        costs the profile's scheduling overhead (base + per item) before it enters the pipeline."""
        env, sched, base = self.env, self.sched, self.latency.sched_overhead
        per_item = self._overhead_per_item
        self._idle = False
        while True:
            if self.driver_on_stage0 and self._stage_free[0] > now:
                self._wait_for_stage0(now)
                return
            batch = sched.next_batch(now)
            if batch is None:
                if self._wake.callbacks is not None:  # not processed yet: sleep until it is
                    self._idle = True
                    return
                self._new_wake()  # woken while busy: decide again now
                continue
            overhead = base + per_item * len(batch) if per_item else base
            if not overhead > 0:
                self._dispatch_now(batch)
                continue
            paid = now + overhead  # the time SimPy gives timeout(overhead)
            if self._shortcuts and sched.num_in_flight >= self.pp and env.peek() > paid:
                # The common case, one event per batch fewer: no event is due before the
                # overhead is paid, so nothing can happen meanwhile, and with `pp` batches in
                # flight the decision at `paid` returns None (the scheduler contract). So
                # dispatch now, entering the pipeline at `paid`, and go idle as at `paid`.
                delay = self._dispatch(batch, paid)
                done_at = paid + delay  # the time SimPy gives timeout(delay) created at `paid`
                if now + (done_at - now) == done_at:
                    env.timeout(done_at - now, batch).callbacks.append(self._completed)
                else:  # rounding: create the completion at `paid` after all, as the slow path does
                    env.timeout(overhead, (batch, delay)).callbacks.append(self._complete_later)
                if self._wake.callbacks is None:
                    self._new_wake()
                self._idle = True
                return
            env.timeout(overhead, batch).callbacks.append(self._overhead_paid)
            return

    def _wait_for_stage0(self, now: float) -> None:
        """Driver on stage 0: sleep until stage 0 finishes its compute, then decide."""
        if self._wake.callbacks is None:  # a wake-up already used: the timer below replaces it
            self._new_wake()
        self._idle = True
        self.env.timeout(self._stage_free[0] - now).callbacks.append(self._poke_event)

    def _poke_event(self, _event: simpy.Event) -> None:
        self._poke()

    def _overhead_paid(self, event: simpy.Event) -> None:
        self._dispatch_now(event.value)
        self._decide(self.env.now)

    def _dispatch_now(self, batch: MicroBatch) -> None:
        delay = self._dispatch(batch, self.env.now)
        if delay is not None:
            self.env.timeout(delay, batch).callbacks.append(self._completed)

    def _complete_later(self, event: simpy.Event) -> None:
        batch, delay = event.value
        self.env.timeout(delay, batch).callbacks.append(self._completed)

    def _token_return(self, batch: MicroBatch) -> float:
        if self._token_return_s is not None:
            return self._token_return_s
        return self.latency.transfer_time(TOKEN_ID_BYTES * batch.num_samples)

    def _each_stage_time(self, *shape: float) -> list[float]:
        stage_time = self.latency.stage_time
        return [stage_time(s, *shape) for s in range(self.pp)]

    def _durations(self, batch: MicroBatch) -> tuple[list[float], float]:
        lat = self.latency
        p, d, w, c = batch.prefill_tokens, batch.decode_tokens, batch.prefill_attention_work, batch.decode_context
        stages = self._stage_times(p, d, w, c)
        if self._sets_price:
            batch.predicted_time = max(stages)
        if self.jitter is not None:
            stages = [t * r for t, r in zip(stages, self.jitter.draw(p + d))]
        return stages, lat.transfer_time(lat.activation_bytes(p + d))

    def _dispatch(self, batch: MicroBatch, t: float) -> float | None:
        """`batch` enters stage 0 at `t`. With `resources`, start its process; else fix its
        whole path now and return the delay from `t` to its completion, which the caller
        schedules (see `_decide`: env.now may still be before `t`)."""
        if self.stage_model == "resources":
            self.env.process(self._run_with_resources(batch))
            return None
        lat, stage_free, link_free, last = self.latency, self._stage_free, self._link_free, self.pp - 1
        turnaround = self._turnaround
        p, d, w, c = batch.prefill_tokens, batch.decode_tokens, batch.prefill_attention_work, batch.decode_context
        transfer = lat.transfer_time(lat.activation_bytes(p + d))
        times = self._stage_times(p, d, w, c)
        if self._sets_price:
            batch.predicted_time = max(times)
        if self.jitter is not None:
            times = [t * r for t, r in zip(times, self.jitter.draw(p + d))]
        entered = t
        starts, ends = [], []
        for s in range(last + 1):
            free = stage_free[s]
            start = t if t > free else free
            t = start + times[s]
            stage_free[s] = t + turnaround[s]
            starts.append(start)
            ends.append(t)
            if s < last:
                free = link_free[s]
                t = (t if t > free else free) + transfer
                link_free[s] = t
        self.recorder.stages(batch.id, starts, ends, batch.prefill_tokens, batch.decode_tokens,
                             len(batch.decodes) + len(batch.chunks))
        return t + self._token_return(batch) - entered

    def _run_with_resources(self, batch: MicroBatch):
        env = self.env
        stages, transfer = self._durations(batch)
        for s, duration in enumerate(stages):
            slot = self._stages[s].request()
            yield slot
            start = env.now
            yield env.timeout(duration)
            self.recorder.stage(batch.id, s, start, env.now, batch.prefill_tokens,
                                batch.decode_tokens, len(batch))
            if self._turnaround[s] > 0:   # the stage stays occupied; this batch moves on
                env.process(self._release_after(self._stages[s], slot, self._turnaround[s]))
            else:
                self._stages[s].release(slot)
            if s < self.pp - 1:
                with self._links[s].request() as link:
                    yield link
                    yield env.timeout(transfer)
        yield env.timeout(self._token_return(batch))
        self._complete(batch)

    def _release_after(self, stage: simpy.Resource, slot: simpy.Event, delay: float):
        yield self.env.timeout(delay)
        stage.release(slot)

    def _completed(self, event: simpy.Event) -> None:
        self._complete(event.value)

    def _complete(self, batch: MicroBatch) -> None:
        env = self.env
        if self.driver_on_stage0 and self._stage_free[0] > env.now:
            # stage 0 is computing: the driver takes the tokens when it is done
            env.timeout(self._stage_free[0] - env.now, batch).callbacks.append(self._completed)
            return
        self.sched.complete(batch, env.now)
        if self._wake.triggered:
            return
        if self._idle and self._shortcuts and env.peek() > env.now:
            # The wake-up event would be the very next one: decide now instead.
            self._decide(env.now)
        else:
            self._wake.succeed()
