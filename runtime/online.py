"""Online serving, the caller's side: `AsyncLLM`, an asyncio API (`async for delta in
llm.generate(ids, params)`), a dispatcher thread that routes token deltas to the waiting
streams, counters and a recent window of stage busy rows for /metrics. The offline
`LLM.generate` runs a closed job; a server needs this instead.

Stage 0's side is runtime.driver.OnlineLoop (the same core `Scheduler`, pipe and
metadata as `generate`); runtime.engine.OnlineChannel carries commands to it and its
events back.

Leaving a stream early (client gone: the task is cancelled or the generator closed)
aborts the request; the scheduler frees its KV pages once no in-flight micro-batch
still reads them.

Failures: a request whose token cannot be sampled ends alone (finish reason "error").
A stage that dies or raises, or makes no progress while requests are outstanding for
longer than the watchdog's deadline (`stage_timeout_s`, or 10x the longest recent gap
between finished micro-batches if that is longer: a hung or SIGSTOPped stage), takes the
pipeline down: every queued and running stream gets EngineDeadError, `healthy` turns
False, and `restart()` builds a fresh pipeline (new processes, an empty KV cache; the
counters go on).
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator

import numpy as np
import pandas as pd

from core.metrics import bubble_ratio
from core.policies import make_policy
from core.scheduler import Scheduler, SchedulerConfig
from runtime.engine import Engine
from runtime.llm import build_engine_config, check_prompt_ids
from runtime.sampling import SamplingParams


# ------------------------------------------------------------------ the caller's side

@dataclass(slots=True, frozen=True)
class TokenDelta:
    request_id: int
    token_ids: tuple[int, ...]     # generated since the previous delta (may be empty in the last)
    finish_reason: str | None      # None while running; then "length" | "stop" | "abort"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True, frozen=True)
class EngineStats:
    running: int                   # admitted by the scheduler (prefilling or decoding)
    waiting: int                   # queued, not admitted yet
    kv_used_pages: int
    kv_total_pages: int
    bubble_ratio: float | None     # over the last bubble_window_s; None before any batch
    prompt_tokens_total: int
    generation_tokens_total: int
    requests_finished_total: int

    @property
    def kv_utilization(self) -> float:
        return self.kv_used_pages / self.kv_total_pages if self.kv_total_pages else 0.0


class EngineDeadError(RuntimeError):
    """The pipeline failed; the message names the stage and the cause."""


class Watchdog:
    """While requests are outstanding, some micro-batch must finish within the deadline:
    `floor_s`, or `factor` x the longest of the recent gaps between finished batches."""

    def __init__(self, floor_s: float, factor: float = 10.0) -> None:
        self.floor_s, self.factor = floor_s, factor
        self.gaps: deque[float] = deque(maxlen=256)
        self.last = time.monotonic()
        self.busy = False

    @property
    def deadline_s(self) -> float:
        return max(self.floor_s, self.factor * max(self.gaps, default=0.0))

    def progress(self, now: float) -> None:
        if self.busy:
            self.gaps.append(now - self.last)
        self.last = now

    def silent_for(self, now: float, busy: bool) -> float | None:
        """Seconds without progress if that is past the deadline, else None."""
        if busy and not self.busy:   # work arrived after an idle spell: the clock starts now
            self.last = now
        self.busy = busy
        silent = now - self.last
        return silent if busy and silent > self.deadline_s else None


class AsyncLLM:
    """An asyncio engine for servers: stream tokens per request, abort, watch stats.

        llm = AsyncLLM("dummy:{...}", pp=2)
        async for delta in llm.generate(prompt_ids, SamplingParams(max_tokens=32)):
            ...
    Arguments mean what they mean for runtime.llm.LLM."""

    def __init__(self, model: Any, pp: int = 1, policy: str = "token_throttling",
                 policy_params: dict[str, Any] | None = None, *, bubble_window_s: float = 10.0,
                 max_rows: int = 200_000, stage_time_model: Any = None, stage_timeout_s: float | None = 10.0,
                 **engine_kwargs: Any) -> None:
        if not (isinstance(bubble_window_s, (int, float)) and bubble_window_s > 0):
            raise ValueError(f"bubble_window_s must be a number > 0, got {bubble_window_s!r}")
        if not (isinstance(max_rows, int) and not isinstance(max_rows, bool) and max_rows >= 1):
            raise ValueError(f"max_rows must be an int >= 1 (stage rows kept for stats), got {max_rows!r}")
        if stage_timeout_s is not None and not (isinstance(stage_timeout_s, (int, float))
                                                and not isinstance(stage_timeout_s, bool) and stage_timeout_s > 0):
            raise ValueError(f"stage_timeout_s must be a number of seconds > 0 or None (no watchdog), "
                             f"got {stage_timeout_s!r}")
        # Bound once on a throwaway scheduler: a bad parameter or a missing stage-time model
        # (time_balanced) fails here, not in a stage process.
        Scheduler(SchedulerConfig(1, 1), make_policy(policy, policy_params), stage_time_model=stage_time_model)
        self.policy, self.policy_params = policy, dict(policy_params or {})
        self.config, self.eos_token_ids, self.tokenizer = build_engine_config(model, pp=pp, **engine_kwargs)
        self.bubble_window_s = float(bubble_window_s)
        self.stage_timeout_s, self.stage_time_model = stage_timeout_s, stage_time_model
        self.failures_total = self.restarts_total = 0
        self._restart_lock = threading.Lock()
        self.engine = Engine(self.config)
        self._channel = self.engine.open_stream(policy, self.policy_params, stage_time_model)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._active: dict[int, list[float]] = {}   # id -> [start epoch, finish epoch or nan]
        self._done_spans: deque[tuple[float, float]] = deque(maxlen=max_rows)
        self._rows: deque[tuple] = deque(maxlen=max_rows)
        self._sched_stats = (0, 0, 0, self.engine.num_pages)
        self._prompt_tokens = self._gen_tokens = self._finished = 0
        self._error: str | None = None
        self._closing = threading.Event()
        self._thread = self._start_dispatcher()

    def _start_dispatcher(self) -> threading.Thread:
        thread = threading.Thread(target=self._dispatch, args=(self._channel,), name="pipetwin-online", daemon=True)
        thread.start()
        return thread

    # ---- what a server needs to know ----
    @property
    def model_config(self) -> Any:
        return self.config.model_cfg

    @property
    def num_pages(self) -> int:
        return self.engine.num_pages

    @property
    def page_size(self) -> int:
        return self.config.page_size

    @property
    def pp(self) -> int:
        return self.config.pp

    @property
    def max_model_len(self) -> int:
        """Most prompt + output tokens one request may hold (KV capacity, positions)."""
        return min(self.num_pages * self.page_size + 1, self.model_config.max_position_embeddings)

    @property
    def healthy(self) -> bool:
        return self._error is None and not self._closing.is_set()

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def closed(self) -> bool:
        """Shut down on purpose (not a failure)."""
        return self._closing.is_set()

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """ValueError naming what is wrong with a request this engine can never serve."""
        check_prompt_ids(prompt_ids, self.model_config.vocab_size)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a runtime.SamplingParams, got {type(params).__name__}")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"{len(prompt_ids)} prompt tokens + max_tokens {params.max_tokens} exceed the "
                             f"model length {self.max_model_len} (KV cache: {self.num_pages} pages of "
                             f"{self.page_size} tokens; max_position_embeddings "
                             f"{self.model_config.max_position_embeddings})")

    # ---- requests ----
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenDelta]:
        """Yield the request's tokens as micro-batches finish. Leaving early aborts it."""
        self._raise_if_dead()
        self.check_request(prompt_ids, params)
        rid = next(self._ids)
        stream: asyncio.Queue = asyncio.Queue()
        stop = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        with self._lock:
            # under the lock _die takes too: either this stream is told of a failure or it sees one here
            self._raise_if_dead()
            self._streams[rid] = (asyncio.get_running_loop(), stream)
            self._active[rid] = [time.time(), float("nan")]
            self._prompt_tokens += len(prompt_ids)
            channel = self._channel
        finished = False
        try:
            channel.send(("add", (rid, [int(t) for t in prompt_ids], params.max_tokens, stop, params)))
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(rid, None)
            if not finished:
                self.abort(rid)

    def abort(self, request_id: int) -> None:
        if self.healthy:
            try:
                self._channel.send(("abort", request_id))
            except Exception:  # noqa: BLE001 - the pipeline is going down; nothing to free
                pass

    # ---- observation ----
    def stats(self) -> EngineStats:
        running, waiting, used, total = self._sched_stats
        return EngineStats(running, waiting, used, total, self.recent_bubble_ratio(),
                           self._prompt_tokens, self._gen_tokens, self._finished)

    def stage_rows(self, since_epoch: float = 0.0) -> list[tuple]:
        """Recent stage busy rows (batch_id, stage, start, end [epoch s], prefill tokens,
        decode tokens, requests); a bounded buffer."""
        with self._lock:
            return [r for r in self._rows if r[3] >= since_epoch]

    def recent_bubble_ratio(self) -> float | None:
        """core.metrics.bubble_ratio over the last bubble_window_s seconds."""
        now = time.time()
        w0 = now - self.bubble_window_s
        with self._lock:
            rows = [r for r in self._rows if r[3] > w0]
            spans = [s for s in self._done_spans if s[1] > w0] + [tuple(v) for v in self._active.values()]
        if not rows:
            return None
        b = pd.DataFrame(rows, columns=["batch_id", "stage", "start", "end", "prefill", "decode", "n"])
        b["start"] = b["start"].clip(lower=w0)
        end = float(b["end"].max())
        s = np.array(spans, dtype=np.float64).reshape(-1, 2)
        req = pd.DataFrame({"arrival": np.maximum(s[:, 0], w0), "finish": np.minimum(s[:, 1], end),
                            "status": "finished"})
        req = req[req["arrival"] < req["finish"].fillna(end)]
        return bubble_ratio(b, req, self.pp, end=end).overall

    # ---- the dispatcher thread ----
    def _dispatch(self, channel: Any) -> None:
        watchdog = Watchdog(self.stage_timeout_s) if self.stage_timeout_s is not None else None
        while not self._closing.is_set():
            try:
                ev = channel.recv(0.1)
            except Exception as e:  # noqa: BLE001 - the engine died: tell every stream
                self._die(str(e))
                return
            if watchdog is not None:
                now = time.monotonic()
                if ev is not None and ev[0] == "step":
                    watchdog.progress(now)
                silent = watchdog.silent_for(now, bool(self._active))
                if silent is not None:
                    self._die(channel.engine.kill_hung(f"no micro-batch finished for {silent:.1f} s "
                                                       f"(deadline {watchdog.deadline_s:.1f} s)"))
                    return
            if ev is None:
                continue
            kind = ev[0]
            if kind == "step":
                self._deliver(ev[1], ev[2])
            elif kind == "rows":
                with self._lock:
                    self._rows.extend(ev[1])

    def _deliver(self, deltas: list, stats: tuple) -> None:
        now = time.time()
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            self._sched_stats = stats
            for rid, ids, reason in deltas:
                self._gen_tokens += len(ids)
                if reason is not None:
                    self._finished += 1
                    span = self._active.pop(rid, None)
                    if span is not None:
                        self._done_spans.append((span[0], now))
                target = self._streams.get(rid)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], TokenDelta(rid, ids, reason)))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: its streams are gone
                pass

    def _die(self, why: str) -> None:
        now = time.time()
        with self._lock:
            self._error = why or "the pipeline stopped"
            if not self._closing.is_set():
                self.failures_total += 1
            targets = list(self._streams.values())
            # every outstanding request fails now; none is running or holding pages any more
            self._done_spans.extend((span[0], now) for span in self._active.values())
            self._active.clear()
            self._sched_stats = (0, 0, 0, self._sched_stats[3])
        for loop, q in targets:
            try:
                loop.call_soon_threadsafe(q.put_nowait, EngineDeadError(self._error))
            except RuntimeError:
                pass

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise EngineDeadError(self._error)
        if self._closing.is_set():
            raise EngineDeadError("the engine is shut down")

    # ---- lifetime ----
    def restart(self) -> None:
        """Replace a failed pipeline with a fresh one (new stage processes, an empty KV cache);
        counters and request ids go on. Raises what the new engine's start-up raises (the
        engine stays down; call again to retry). No-op while healthy."""
        with self._restart_lock:
            if self.closed:
                raise EngineDeadError("the engine is shut down")
            if self.healthy:
                return
            self._thread.join(5.0)
            old, self._channel = self.engine, None
            try:
                old.shutdown()   # the stages are dead or killed already: this closes the queues
            except Exception:  # noqa: BLE001 - what is left of a failed pipeline
                pass
            engine = Engine(self.config)
            channel = engine.open_stream(self.policy, self.policy_params, self.stage_time_model)
            with self._lock:
                self.engine, self._channel = engine, channel
                self._sched_stats = (0, 0, 0, engine.num_pages)
                self.restarts_total += 1
                self._error = None
            self._thread = self._start_dispatcher()

    def shutdown(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        self._thread.join(5.0)
        if self._error is None:
            self._die("the engine is shut down")
        self._channel = None  # holds the engine's queues, which shutdown releases
        self.engine.shutdown()

    def __enter__(self) -> "AsyncLLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _put_all(items: list[tuple[asyncio.Queue, TokenDelta]]) -> None:
    for q, delta in items:
        q.put_nowait(delta)
