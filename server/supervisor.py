"""What the server does when its engine goes down (`--on-engine-failure`).

The engine (runtime.online.AsyncLLM) notices a failure itself: a stage process that died
or raised, or its watchdog finding no progress for longer than the stage deadline (a hung
or stopped stage). It then fails every queued and running request (the server answers
them 503 with a short reason) and reports `healthy` False. The supervisor, a thread that
watches `healthy`, then:

  exit      logs the cause and calls `on_fatal(1)`: `pipetwin serve` stops uvicorn and exits
            non-zero so a supervisor (systemd, Kubernetes) restarts the process (vLLM's way)
  restart   rebuilds the pipeline in place (`engine.restart()`: new stage processes, an empty
            KV cache, counters kept); up to `max_attempts` tries per failure, `backoff_s`
            apart; more than `max_restarts` restarts within `window_s` seconds (a crash
            loop), or a failure that no attempt recovers from, ends as `exit` does

While it restarts, /health and requests say so (503, code `engine_restarting`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable

log = logging.getLogger("pipetwin.server")

MODES = ("restart", "exit")


class Supervisor:
    def __init__(self, engine: Any, mode: str = "exit", *, on_fatal: Callable[[int], None] | None = None,
                 max_attempts: int = 3, backoff_s: float = 1.0, max_restarts: int = 5, window_s: float = 300.0,
                 poll_s: float = 0.05) -> None:
        if mode not in MODES:
            raise ValueError(f"on_engine_failure must be one of {', '.join(MODES)}, got {mode!r}")
        self.engine, self.mode, self.on_fatal = engine, mode, on_fatal
        self.max_attempts, self.backoff_s = max_attempts, backoff_s
        self.max_restarts, self.window_s, self.poll_s = max_restarts, window_s, poll_s
        self.state = "up"                       # up | restarting | down (given up / exit mode)
        self._restarts: deque[float] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="pipetwin-supervisor", daemon=True)

    def start(self) -> "Supervisor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5.0)

    @property
    def restarting(self) -> bool:
        return self.state == "restarting"

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            e = self.engine
            if e.healthy or getattr(e, "closed", False):
                continue
            log.error("engine is down: %s", e.error)
            if self.mode == "exit" or not self._restart():
                self.state = "down"
                if self.on_fatal is not None:
                    log.error("exiting (--on-engine-failure %s)", self.mode)
                    self.on_fatal(1)
                return

    def _restart(self) -> bool:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > self.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            log.error("not restarting: %d restarts in the last %g s already (a crash loop)",
                      len(self._restarts), self.window_s)
            return False
        self.state = "restarting"
        for attempt in range(1, self.max_attempts + 1):
            if self._stop.is_set():
                return False
            t0 = time.monotonic()
            log.warning("restarting the engine (attempt %d of %d)", attempt, self.max_attempts)
            try:
                self.engine.restart()
            except Exception as err:  # noqa: BLE001 - a failed start-up is retried, then fatal
                log.error("engine restart attempt %d failed: %s", attempt, err)
                self._stop.wait(self.backoff_s * attempt)
                continue
            self._restarts.append(time.monotonic())
            self.state = "up"
            log.warning("engine restarted in %.1f s; serving again", time.monotonic() - t0)
            return True
        log.error("the engine did not come back after %d attempts", self.max_attempts)
        return False
