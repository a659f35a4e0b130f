"""GET /metrics: Prometheus text format.

Engine gauges and counters are read from `engine.stats()` at scrape time (while the engine
is down, running/waiting/KV-used read 0 and the bubble ratio NaN: its requests have failed
and its cache is gone, so the last values would be stale, not true); latency
histograms are observed by the server per request (seconds, server clock: TTFT from the
request's arrival at the server to its first token, TPOT over the rest of its tokens,
E2E to its last).

  pipetwin_num_requests_running          gauge    admitted by the scheduler (holding KV pages)
  pipetwin_num_requests_waiting          gauge    queued, not admitted yet
  pipetwin_kv_cache_usage_ratio          gauge    used / total KV pages
  pipetwin_kv_cache_used_pages           gauge
  pipetwin_kv_cache_total_pages          gauge
  pipetwin_bubble_ratio                  gauge    core.metrics bubble ratio over the engine's recent window
                                                  (NaN before any batch)
  pipetwin_engine_healthy                gauge    1 while the engine is up / 0 while it is down
  pipetwin_engine_failures_total         counter  times the engine went down (a stage died, hung or failed)
  pipetwin_engine_restarts_total         counter  times it was rebuilt (--on-engine-failure restart)
  pipetwin_prompt_tokens_total           counter  engine counters since start
  pipetwin_generation_tokens_total       counter
  pipetwin_engine_requests_finished_total counter
  pipetwin_http_requests_total{endpoint,status}  counter   every HTTP request by the status it got
                                                  (endpoint: completions, chat_completions, models,
                                                  health, metrics, pipetwin, docs, root, other)
  pipetwin_request_finished_total{finish_reason} counter   length | stop | abort | error
  pipetwin_time_to_first_token_seconds   histogram
  pipetwin_time_per_output_token_seconds histogram
  pipetwin_e2e_request_latency_seconds   histogram
  pipetwin_gpu_*{gpu,name}               gauge    the stages' GPUs, read from NVML at scrape time
                                                  (runtime.telemetry): memory used/total bytes, SM clock
                                                  MHz, power watts, utilization ratios; absent without NVML
"""
from __future__ import annotations

import math
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from runtime.telemetry import PrometheusCollector, Telemetry, stage_gpus

CONTENT_TYPE = CONTENT_TYPE_LATEST
disable_created_metrics()   # no *_created series: they double the output and nothing reads them

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 320.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class _EngineCollector:
    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self):  # noqa: ANN201 - prometheus_client collector protocol
        e = self.engine
        healthy = bool(e.healthy)
        yield GaugeMetricFamily("pipetwin_engine_healthy", "1 while the engine is up, 0 while it is down",
                                value=1.0 if healthy else 0.0)
        # engines without these counters (tests' fakes) have failed once if they are down now
        yield CounterMetricFamily("pipetwin_engine_failures", "Times the engine went down",
                                  value=getattr(e, "failures_total", int(not healthy)))
        yield CounterMetricFamily("pipetwin_engine_restarts", "Times the engine was rebuilt after a failure",
                                  value=getattr(e, "restarts_total", 0))
        try:
            s = e.stats()
        except Exception:  # noqa: BLE001 - a dead engine may not answer; report health only
            return
        up = 1 if healthy else 0
        yield GaugeMetricFamily("pipetwin_num_requests_running", "Requests admitted (holding KV pages)",
                                value=s.running * up)
        yield GaugeMetricFamily("pipetwin_num_requests_waiting", "Requests queued, not admitted yet",
                                value=s.waiting * up)
        yield GaugeMetricFamily("pipetwin_kv_cache_usage_ratio", "Used / total KV pages",
                                value=s.kv_utilization * up)
        yield GaugeMetricFamily("pipetwin_kv_cache_used_pages", "KV pages in use", value=s.kv_used_pages * up)
        yield GaugeMetricFamily("pipetwin_kv_cache_total_pages", "KV pages in the cache", value=s.kv_total_pages)
        br = s.bubble_ratio if healthy else None
        yield GaugeMetricFamily("pipetwin_bubble_ratio", "Pipeline bubble ratio over the recent window",
                                value=math.nan if br is None else float(br))
        yield CounterMetricFamily("pipetwin_prompt_tokens", "Prompt tokens admitted since start",
                                  value=s.prompt_tokens_total)
        yield CounterMetricFamily("pipetwin_generation_tokens", "Tokens generated since start",
                                  value=s.generation_tokens_total)
        yield CounterMetricFamily("pipetwin_engine_requests_finished", "Requests the engine finished",
                                  value=s.requests_finished_total)


class ServerMetrics:
    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(engine))
        gpus = Telemetry(cuda_indices=stage_gpus(getattr(engine, "config", None)))
        if gpus.available:
            self.registry.register(PrometheusCollector(gpus))
        self.http = Counter("pipetwin_http_requests", "HTTP requests by endpoint and the status they got",
                            ["endpoint", "status"], registry=self.registry)
        self.finished = Counter("pipetwin_request_finished", "Requests by finish reason",
                                ["finish_reason"], registry=self.registry)
        self.ttft = Histogram("pipetwin_time_to_first_token_seconds", "Time to first token",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("pipetwin_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("pipetwin_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_E2E_BUCKETS, registry=self.registry)

    def observe(self, arrival: float, first: float | None, last: float | None, tokens: int,
                finish_reason: str) -> None:
        self.finished.labels(finish_reason).inc()
        if first is not None:
            self.ttft.observe(first - arrival)
            if last is not None and tokens > 1:
                self.tpot.observe((last - first) / (tokens - 1))
        if last is not None and finish_reason in ("length", "stop"):
            self.e2e.observe(last - arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)
