"""Metrics over a Trace: bubble ratio, vLLM-style latency/throughput, goodput, summaries.

The same functions read the simulated trace and the real one. All times are seconds.

Summary keys (`summarize`), with units:
  duration                  s       first arrival -> last finish
  requests                  count   rows in the requests table
  finished                  count   status == "finished"
  rejected                  count   status == "rejected"
  unfinished                count   neither finished nor rejected when the trace ended
  preemptions               count   sum over all requests
  throughput_rps            req/s   finished requests / duration
  goodput_rps               req/s   finished requests meeting every SLO given / duration
  output_tps                tok/s   output tokens of finished requests / duration
  total_tps                 tok/s   prompt + output tokens of finished requests / duration
  ttft_{mean,p50,p90,p99}   s       first_token - arrival
  ttft_max                  s       the longest: what a P99 SLO lets the last 1% wait
  tpot_{mean,p50,p90,p99}   s       (e2e - ttft) / (output_len - 1), output_len > 1 only
  itl_{mean,p50,p90,p99}    s       every gap between consecutive tokens of a request
  e2e_{mean,p50,p90,p99}    s       finish - arrival
  bubble_ratio              1       sum of stage idle / (pp * window), in [0, 1]
  bubble_window             s       time in which at least one request is in the system
  kv_util_mean              1       time-weighted mean of samples.kv_util
  kv_util_max               1       max of samples.kv_util
  waiting_mean              count   time-weighted mean of samples.waiting (queue length)
  waiting_max               count   max of samples.waiting
  bubble_ratio_stage{i}     1       per-stage idle / window, i = 0 .. pp-1 (after the fixed keys)

Latency statistics use finished requests only (as vLLM's benchmark counts successful
requests); a statistic with no data is NaN. Percentiles are numpy's linear ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from core.trace import Trace

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2e")
STAGE_KEY = "bubble_ratio_stage{}"
SUMMARY_KEYS: tuple[str, ...] = (
    "duration", "requests", "finished", "rejected", "unfinished", "preemptions",
    "throughput_rps", "goodput_rps", "output_tps", "total_tps",
    *(f"{m}_{s}" for m in LATENCIES for s in ("mean", "p50", "p90", "p99")), "ttft_max",
    "bubble_ratio", "bubble_window",
    "kv_util_mean", "kv_util_max", "waiting_mean", "waiting_max",
)
INT_KEYS = frozenset({"requests", "finished", "rejected", "unfinished", "preemptions"})


def summary_keys(pp: int) -> list[str]:
    """Every key `summarize` returns for a pipeline of `pp` stages, in order."""
    return [*SUMMARY_KEYS, *(STAGE_KEY.format(i) for i in range(pp))]


# ------------------------------------------------------------------ intervals

def merge_intervals(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union of [start, end) intervals as sorted, disjoint (starts, ends). Empty ones dropped."""
    starts = np.asarray(starts, dtype=np.float64)
    ends = np.asarray(ends, dtype=np.float64)
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if starts.size == 0:
        return starts, ends
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    new = np.empty(starts.size, dtype=bool)
    new[0] = True
    new[1:] = starts[1:] > reach[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, starts.size - 1)
    return starts[first], reach[last]


def _measure_below(ws: np.ndarray, we: np.ndarray, cum: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Length of (union of disjoint sorted [ws, we)) ∩ (-inf, t], vectorised over t."""
    i = np.searchsorted(ws, t, side="right") - 1
    inside = np.clip(t - ws[np.maximum(i, 0)], 0.0, (we - ws)[np.maximum(i, 0)])
    before = np.where(i > 0, cum[np.maximum(i - 1, 0)], 0.0)
    return np.where(i >= 0, before + inside, 0.0)


@dataclass(frozen=True, slots=True)
class BubbleRatio:
    overall: float          # Σ idle / (pp × window)
    per_stage: list[float]  # idle_s / window
    window: float           # seconds with at least one request in the system


def bubble_ratio(batches: "pd.DataFrame", requests: "pd.DataFrame", pp: int,
                 end: float | None = None) -> BubbleRatio:
    """Pipeline bubbles over the time at least one request is in the system.

    A request is in the system from `arrival` to `finish`; one with no finish counts to `end`
    (default: the last batch end), unless it was rejected (then it never occupied the system).
    Per stage, busy is the union of its batch intervals clipped to that window, so overlapping
    rows are not counted twice. With an empty window every ratio is 0 (nothing to wait for).
    """
    if pp < 1:
        raise ValueError(f"pp must be >= 1, got {pp}")
    b_start = batches["start"].to_numpy(dtype=np.float64)
    b_end = batches["end"].to_numpy(dtype=np.float64)
    b_stage = batches["stage"].to_numpy()
    if b_stage.size and (b_stage.min() < 0 or b_stage.max() >= pp):
        raise ValueError(f"batches has stages outside 0..{pp - 1} (pp={pp})")
    arrival = requests["arrival"].to_numpy(dtype=np.float64)
    finish = requests["finish"].to_numpy(dtype=np.float64)
    if end is None:
        end = float(b_end.max()) if b_end.size else float(np.nanmax(np.concatenate(
            [arrival, finish, [0.0]])))
    rejected = (requests["status"] == "rejected").to_numpy()
    finish = np.where(np.isnan(finish), np.where(rejected, arrival, end), finish)
    ws, we = merge_intervals(arrival, finish)
    cum = np.cumsum(we - ws)
    window = float(cum[-1]) if cum.size else 0.0
    if window <= 0.0:
        return BubbleRatio(0.0, [0.0] * pp, 0.0)
    per_stage = []
    for s in range(pp):
        mask = b_stage == s
        bs, be = merge_intervals(b_start[mask], b_end[mask])
        busy = float(np.sum(_measure_below(ws, we, cum, be) - _measure_below(ws, we, cum, bs)))
        per_stage.append(min(max((window - busy) / window, 0.0), 1.0))
    return BubbleRatio(float(np.mean(per_stage)), per_stage, window)


# ------------------------------------------------------------------ latency

def describe(values: np.ndarray, prefix: str, scratch: bool = False) -> dict[str, float]:
    """{prefix}_mean, _p50, _p90, _p99 (NaN when there are no values). `scratch`: `values`
    is a temporary the percentiles may reorder in place. Why: on the Azure conversation
    trace the inter-token gaps are 4 million values, and this saves two 32 MB copies."""
    v = np.asarray(values, dtype=np.float64)
    if v.size and math.isnan(v.sum()):   # copy only when there are NaNs to drop
        v = v[~np.isnan(v)]
        scratch = True
    if v.size == 0:
        return {f"{prefix}_mean": math.nan, **{f"{prefix}_p{p}": math.nan for p in PERCENTILES}}
    mean = float(v.mean())
    pct = np.percentile(v, PERCENTILES, overwrite_input=scratch)
    return {f"{prefix}_mean": mean, **{f"{prefix}_p{p}": float(x) for p, x in zip(PERCENTILES, pct)}}


def request_latencies(requests: "pd.DataFrame") -> "pd.DataFrame":
    """Finished requests with ttft, tpot (NaN when output_len <= 1) and e2e, in seconds."""
    import pandas as pd

    r = requests[requests["status"] == "finished"]
    arrival = r["arrival"].to_numpy(dtype=np.float64)
    ttft = r["first_token"].to_numpy(dtype=np.float64) - arrival
    e2e = r["finish"].to_numpy(dtype=np.float64) - arrival
    out = r["output_len"].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = np.where(out > 1, (e2e - ttft) / (out - 1), np.nan)
    return pd.DataFrame({"request_id": r["request_id"].to_numpy(), "output_len": out,
                         "prompt_len": r["prompt_len"].to_numpy(dtype=np.float64),
                         "ttft": ttft, "tpot": tpot, "e2e": e2e})


def inter_token_latencies(tokens: "pd.DataFrame", request_ids: Any = None) -> np.ndarray:
    """Every gap between consecutive tokens of the same request (optionally only `request_ids`)."""
    if request_ids is not None:
        keep = tokens["request_id"].isin(request_ids).to_numpy()
        if not keep.all():  # copying millions of rows only when something is filtered out
            tokens = tokens[keep]
    if len(tokens) < 2:
        return np.empty(0)
    rid = tokens["request_id"].to_numpy()
    idx = tokens["index"].to_numpy()
    t = tokens["time"].to_numpy(dtype=np.float64)
    same = rid[1:] == rid[:-1]
    if not (np.all(rid[1:] >= rid[:-1]) and np.all(idx[1:][same] > idx[:-1][same])):
        order = np.lexsort((idx, rid))  # recorders write in order; sort only foreign tables
        rid, t = rid[order], t[order]
        same = rid[1:] == rid[:-1]
    return np.diff(t)[same]


@dataclass(frozen=True, slots=True)
class SLO:
    """Service-level objectives in seconds; None = not applied."""
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    @classmethod
    def of(cls, slo: "SLO | Mapping[str, float | None] | None") -> "SLO":
        """Accept an SLO, None, or a mapping with keys ttft/tpot/e2e (or ttft_slo, ...)."""
        if slo is None:
            return cls()
        if isinstance(slo, SLO):
            return slo
        kw = {k.removesuffix("_slo"): v for k, v in slo.items()}
        bad = set(kw) - {"ttft", "tpot", "e2e"}
        if bad:
            raise ValueError(f"unknown SLO keys {sorted(bad)}; use ttft_slo, tpot_slo, e2e_slo")
        return cls(**kw)


def meets_slo(lat: "pd.DataFrame", slo: "SLO | Mapping[str, float | None] | None") -> np.ndarray:
    """Boolean per row of `request_latencies`: meets every SLO given. A request with a single
    output token has no TPOT and passes the TPOT SLO (as in vLLM, where its TPOT is 0)."""
    slo = SLO.of(slo)
    ok = np.ones(len(lat), dtype=bool)
    if slo.ttft is not None:
        ok &= lat["ttft"].to_numpy() <= slo.ttft
    if slo.tpot is not None:
        tpot = lat["tpot"].to_numpy()
        ok &= np.isnan(tpot) | (tpot <= slo.tpot)
    if slo.e2e is not None:
        ok &= lat["e2e"].to_numpy() <= slo.e2e
    return ok


def time_weighted(times: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """(mean, max) of a step function: each sample holds until the next one. Falls back to the
    plain mean when the samples span no time; (NaN, NaN) when there are none."""
    t = np.asarray(times, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    order = np.argsort(t, kind="stable")
    t, v = t[order], v[order]
    w = np.diff(t)
    span = float(w.sum())
    mean = float(np.dot(w, v[:-1]) / span) if span > 0 else float(v.mean())
    return mean, float(v.max())


# ------------------------------------------------------------------ summary

def summarize(trace: "Trace", slo: "SLO | Mapping[str, float | None] | None" = None) -> dict[str, float | int]:
    """Flat dict of every metric; keys and units in the module docstring / `summary_keys(pp)`."""
    pp = trace.meta.get("pp")
    if pp is None:
        raise ValueError("trace.meta['pp'] (number of pipeline stages) is missing; "
                         "the bubble ratio needs it")
    pp = int(pp)
    req, smp = trace.requests, trace.samples
    status = req["status"]
    finished = int((status == "finished").sum())
    rejected = int((status == "rejected").sum())

    arrival = req["arrival"].to_numpy(dtype=np.float64)
    finish = req["finish"].to_numpy(dtype=np.float64)
    if len(req) and not np.all(np.isnan(finish)):
        duration = max(float(np.nanmax(finish) - np.nanmin(arrival)), 0.0)
    else:
        duration = 0.0
    lat = request_latencies(req)

    def rate(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    out: dict[str, float | int] = {
        "duration": duration,
        "requests": int(len(req)),
        "finished": finished,
        "rejected": rejected,
        "unfinished": int(len(req)) - finished - rejected,
        "preemptions": int(req["preemptions"].sum()),
        "throughput_rps": rate(finished),
        "goodput_rps": rate(float(meets_slo(lat, slo).sum())),
        "output_tps": rate(float(lat["output_len"].sum())),
        "total_tps": rate(float(lat["output_len"].sum() + lat["prompt_len"].sum())),
    }
    out.update(describe(lat["ttft"].to_numpy(), "ttft"))
    out.update(describe(lat["tpot"].to_numpy(), "tpot"))
    out.update(describe(trace.token_gaps(lat["request_id"]), "itl", scratch=True))  # no token table built
    out.update(describe(lat["e2e"].to_numpy(), "e2e"))
    out["ttft_max"] = float(lat["ttft"].max())   # NaN when there is none, as describe's

    br = bubble_ratio(trace.batches, req, pp)
    out["bubble_ratio"] = br.overall
    out["bubble_window"] = br.window
    times = smp["time"].to_numpy(dtype=np.float64)
    out["kv_util_mean"], out["kv_util_max"] = time_weighted(times, smp["kv_util"].to_numpy())
    out["waiting_mean"], out["waiting_max"] = time_weighted(times, smp["waiting"].to_numpy())
    for i, r in enumerate(br.per_stage):
        out[STAGE_KEY.format(i)] = r
    return out


def _fmt(v: Any, scale: float = 1.0, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (int, np.integer)) and scale == 1.0:
        return str(int(v))
    return f"{float(v) * scale:.{digits}f}"


def format_summary(summary: Mapping[str, Any]) -> str:
    """Compact aligned plain-text table of a `summarize` dict (latencies shown in ms)."""
    g = summary.get
    lines = [
        f"requests     {_fmt(g('requests'))} total, {_fmt(g('finished'))} finished, "
        f"{_fmt(g('rejected'))} rejected, {_fmt(g('unfinished'))} unfinished, "
        f"{_fmt(g('preemptions'))} preemptions",
        f"duration     {_fmt(g('duration'), digits=3)} s",
        f"throughput   {_fmt(g('throughput_rps'))} req/s   goodput {_fmt(g('goodput_rps'))} req/s   "
        f"output {_fmt(g('output_tps'), digits=1)} tok/s   total {_fmt(g('total_tps'), digits=1)} tok/s",
        "",
        f"{'latency (ms)':<13}" + "".join(f"{h:>10}" for h in ("mean", "p50", "p90", "p99")),
    ]
    for m in LATENCIES:
        lines.append(f"  {m:<11}" + "".join(
            f"{_fmt(g(f'{m}_{s}'), 1e3):>10}" for s in ("mean", "p50", "p90", "p99")))
    lines.append("")
    stages = []
    i = 0
    while STAGE_KEY.format(i) in summary:
        stages.append(f"s{i} {_fmt(summary[STAGE_KEY.format(i)], digits=3)}")
        i += 1
    lines.append(f"bubble       {_fmt(g('bubble_ratio'), digits=3)} over {_fmt(g('bubble_window'), digits=3)} s"
                 + (f"   ({', '.join(stages)})" if stages else ""))
    lines.append(f"kv util      mean {_fmt(g('kv_util_mean'), digits=3)}   max {_fmt(g('kv_util_max'), digits=3)}")
    lines.append(f"waiting      mean {_fmt(g('waiting_mean'))}   max {_fmt(g('waiting_max'), digits=0)}")
    return "\n".join(lines)
