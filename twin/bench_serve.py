"""`pipetwin bench serve`: a load generator for an OpenAI-compatible server (vLLM's
serving benchmark, and `pipetwin bench`'s results folder).

The workload is core.workloads' (the same seed gives the same arrival times and lengths as
`pipetwin sim` and `pipetwin bench`; `pipetwin bench`'s random prompt token ids too).
Request i is sent at its arrival time (gamma gaps of shape `burstiness`, rate inf = all at
once) to /v1/completions with its prompt as token ids, `max_tokens` = its output length,
`ignore_eos` (default on, so every request generates exactly its length), temperature 0
and `stream: true` with usage. With `max_concurrency`, at most that many are in flight and
a request's arrival is when it is actually sent (as vLLM's benchmark does).

Client-side measurements: TTFT (send -> first token chunk), ITL (gaps between token
chunks; the pipetwin server sends one chunk per token), TPOT ((E2E - TTFT)/(tokens - 1)),
E2E. They are written as core.trace tables so core.metrics.summarize computes everything
(goodput under the SLOs given). From a pipetwin server it also records:
  batches  GET /v1/pipetwin/stage_rows (the stages' busy rows, moved to the client clock)
  samples  GET /v1/pipetwin/stats polled every `stats_every_s` (kv_used, kv_total, waiting,
           running; `ready` and `in_flight` are not exposed and are written as -1)
Against another server those tables are empty and pp is taken as 1.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from core.request import Request
from core.trace import BATCH_COLUMNS, REQUEST_COLUMNS, SAMPLE_COLUMNS, TOKEN_COLUMNS, Trace
from twin.workload import prompt_ids, workload_requests


@dataclass
class Outcome:
    """One request as the client saw it (seconds on the benchmark clock, 0 = start)."""
    request_id: int
    prompt_len: int
    max_output: int
    sent: float = math.nan
    token_times: list[float] = field(default_factory=list)
    finish: float = math.nan
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason is not None


class ServeBenchError(RuntimeError):
    """The server cannot be benchmarked (unreachable, unknown model, requests too long)."""


async def _get_json(client: Any, url: str) -> Any:
    r = await client.get(url)
    if r.status_code != 200:
        return None
    return r.json()


async def _one(client: Any, base: str, model: str, req: Request, prompt: list[int], ignore_eos: bool,
               t0: float, sem: asyncio.Semaphore | None, extra: dict[str, Any]) -> Outcome:
    out = Outcome(req.id, req.prompt_len, req.max_output)
    body = {"model": model, "prompt": prompt, "max_tokens": req.max_output, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    if ignore_eos:
        body["ignore_eos"] = True

    async def send() -> None:
        out.sent = time.perf_counter() - t0
        chunk_times: list[float] = []
        try:
            async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    out.error = f"HTTP {r.status_code}: {text[:300]}"
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter() - t0
                    msg = json.loads(data)
                    if "error" in msg:
                        out.error = f"stream error: {msg['error'].get('message')}"
                        return
                    if msg.get("choices"):
                        chunk_times.append(now)
                        fr = msg["choices"][0].get("finish_reason")
                        if fr:
                            out.finish_reason = fr
                    if msg.get("usage"):
                        out.output_tokens = int(msg["usage"]["completion_tokens"])
        except Exception as e:  # noqa: BLE001 - a lost connection is a failed request, reported
            out.error = f"{type(e).__name__}: {e}"
            return
        out.finish = time.perf_counter() - t0
        n = out.output_tokens or len(chunk_times)
        times = chunk_times[:n]
        while times and len(times) < n:   # a server that batches tokens per chunk
            times.append(times[-1])
        out.token_times = times
        if chunk_times:
            out.finish = chunk_times[-1]
        if out.finish_reason is None:
            out.error = "the stream ended without a finish_reason"

    async def send_timed() -> None:
        try:
            await send()
        finally:
            if math.isnan(out.finish):   # failures end when they are seen
                out.finish = time.perf_counter() - t0

    delay = req.arrival - (time.perf_counter() - t0)
    if delay > 0:
        await asyncio.sleep(delay)
    if sem is None:
        await send_timed()
    else:
        async with sem:
            await send_timed()
    return out


async def _poll_stats(client: Any, base: str, epoch0: float, every: float, rows: list, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            s = await _get_json(client, f"{base}/v1/pipetwin/stats")
        except Exception:  # noqa: BLE001 - sampling is best effort
            s = None
        if s:
            rows.append((s["time"] - epoch0, s["kv_used_pages"], s["kv_total_pages"], s["waiting"], s["running"]))
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def run_async(url: str, requests: Sequence[Request], seed: int, *, model: str | None = None,
                    max_concurrency: int | None = None, ignore_eos: bool = True, stats_every_s: float = 0.25,
                    extra_body: dict[str, Any] | None = None, api_key: str | None = None,
                    log: Callable[[str], None] = lambda s: None) -> tuple[Trace, list[Outcome]]:
    import httpx  # why: the serve extra, loaded only when a load test runs

    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency or 256)
    # a server started with --api-key wants it on every /v1/* call, as vLLM's does
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=60.0), limits=limits,
                                 headers=headers) as client:
        try:
            probe = await client.get(f"{base}/v1/models")
        except httpx.HTTPError as e:
            raise ServeBenchError(f"--url {url}: cannot reach the server ({type(e).__name__}: {e})") from None
        if probe.status_code == 401:
            raise ServeBenchError(f"--api-key: the server at {url} refused "
                                  + ("the key given" if api_key else "an unauthenticated client: give its key "
                                     "(--api-key or $PIPETWIN_API_KEY)"))
        models = probe.json() if probe.status_code == 200 else None
        if not models or not models.get("data"):
            raise ServeBenchError(f"--url {url}: GET /v1/models did not list a model")
        names = [m["id"] for m in models["data"]]
        if model is None:
            model = names[0]
        elif model not in names:
            raise ServeBenchError(f"--model {model!r}: the server serves {names}")
        info = await _get_json(client, f"{base}/v1/pipetwin/info") or {}
        vocab = int(info.get("vocab_size") or 256)
        max_len = info.get("max_model_len") or models["data"][0].get("max_model_len")
        if max_len:
            too_long = [r.id for r in requests if r.prompt_len + r.max_output > max_len]
            if too_long:
                raise ServeBenchError(
                    f"{len(too_long)} of {len(requests)} requests need more than the server's max_model_len "
                    f"{max_len} tokens (prompt + output; e.g. request {too_long[0]}); shorten the workload "
                    "(--input-len/--output-len, or the lengths' max in the config)")
        prompts = prompt_ids(requests, vocab, seed)
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        log(f"{len(requests)} requests to {base} (model {model}), "
            f"{'max concurrency ' + str(max_concurrency) if max_concurrency else 'no concurrency limit'}")
        epoch0 = time.time()
        t0 = time.perf_counter()
        samples: list[tuple] = []
        stop = asyncio.Event()
        poller = asyncio.create_task(_poll_stats(client, base, epoch0, stats_every_s, samples, stop)) \
            if info else None
        outcomes = await asyncio.gather(*(_one(client, base, model, r, p, ignore_eos, t0, sem, extra_body or {})
                                          for r, p in zip(requests, prompts)))
        wall = time.perf_counter() - t0
        stop.set()
        rows: list[list] = []
        if poller is not None:
            await poller
            await asyncio.sleep(0.8)   # the engine ships busy rows every 0.5 s
            got = await _get_json(client, f"{base}/v1/pipetwin/stage_rows?since={epoch0}") or {}
            rows = [[*r[:2], r[2] - epoch0, r[3] - epoch0, *r[4:]] for r in got.get("rows", [])]
    trace = build_trace(outcomes, rows, samples, meta={
        "pp": int(info.get("pp") or 1), "policy": info.get("policy"), "policy_params": info.get("policy_params"),
        "model": info.get("source_model", model), "num_pages": info.get("num_pages"),
        "page_size": info.get("page_size"), "seed": seed, "source": "server", "url": base,
        "max_concurrency": max_concurrency, "ignore_eos": ignore_eos, "wall_s": wall})
    return trace, list(outcomes)


def build_trace(outcomes: Sequence[Outcome], batch_rows: Sequence[Sequence], samples: Sequence[tuple],
                meta: dict[str, Any]) -> Trace:
    """The four core.trace tables from client outcomes and the server's rows."""
    req_rows = []
    tok_ids, tok_idx, tok_t = [], [], []
    for o in outcomes:
        req_rows.append((o.request_id, o.sent, math.nan, o.token_times[0] if o.token_times else math.nan,
                         o.finish, o.prompt_len, len(o.token_times) if o.ok else 0,
                         o.max_output, 0, "finished" if o.ok else "failed",
                         o.finish_reason if o.ok else "error"))
        if o.ok:
            tok_ids += [o.request_id] * len(o.token_times)
            tok_idx += range(len(o.token_times))
            tok_t += o.token_times
    samp = [(t, used, total, used / total if total else 0.0, waiting, -1, -1, running)
            for t, used, total, waiting, running in samples]
    return Trace(
        batches=pd.DataFrame([list(r) for r in batch_rows], columns=BATCH_COLUMNS),
        requests=pd.DataFrame(req_rows, columns=REQUEST_COLUMNS),
        tokens=pd.DataFrame({"request_id": np.array(tok_ids, np.int64), "index": np.array(tok_idx, np.int64),
                             "time": np.array(tok_t, np.float64)}, columns=TOKEN_COLUMNS),
        samples=pd.DataFrame(samp, columns=SAMPLE_COLUMNS),
        meta=meta)


def run(url: str, workload: dict[str, Any], seed: int = 0, **kw: Any) -> tuple[Trace, list[Outcome]]:
    """Synchronous entry: the workload spec's requests against `url`."""
    return asyncio.run(run_async(url, workload_requests(workload, seed), seed, **kw))


# ---------------------------------------------------------------- report

def report(summary: dict[str, Any], outcomes: Sequence[Outcome], slo: dict[str, float] | None = None) -> str:
    """vLLM-benchmark-style text report (latencies in ms)."""
    ok = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    short = [o for o in ok if len(o.token_times) != o.max_output]
    g = summary.get

    def ms(key: str) -> str:
        v = g(key)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 1e3:.2f}"

    lines = ["============ Serving Benchmark Result ============"]

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<40}{value:>10}")

    row("Successful requests:", len(ok))
    row("Failed requests:", len(failed))
    if short:
        row("Requests with fewer tokens than asked:", len(short))
    row("Benchmark duration (s):", f"{g('duration'):.2f}")
    row("Total input tokens:", sum(o.prompt_len for o in ok))
    row("Total generated tokens:", sum(len(o.token_times) for o in ok))
    row("Request throughput (req/s):", f"{g('throughput_rps'):.2f}")
    row("Output token throughput (tok/s):", f"{g('output_tps'):.2f}")
    row("Total token throughput (tok/s):", f"{g('total_tps'):.2f}")
    if slo:
        row(f"Goodput (req/s) [{', '.join(f'{k} <= {v * 1e3:g} ms' for k, v in slo.items())}]:",
            f"{g('goodput_rps'):.2f}")
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2e", "End-to-end Latency")):
        lines.append(f"{title:-^50}")
        name = key.upper()
        row(f"Mean {name} (ms):", ms(f"{key}_mean"))
        row(f"Median {name} (ms):", ms(f"{key}_p50"))
        row(f"P99 {name} (ms):", ms(f"{key}_p99"))
    if g("bubble_ratio") is not None and g("bubble_window"):
        lines.append(f"{'Server':-^50}")
        row("Bubble ratio (stage rows):", f"{g('bubble_ratio'):.3f}")
        row("KV utilization mean / max:", f"{g('kv_util_mean'):.3f} / {g('kv_util_max'):.3f}")
        row("Waiting requests mean / max:", f"{g('waiting_mean'):.1f} / {g('waiting_max'):.0f}")
    lines.append("=" * 50)
    if failed:
        lines.append(f"first failure: request {failed[0].request_id}: {failed[0].error}")
    return "\n".join(lines)
