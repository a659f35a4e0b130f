"""Capacity: the highest offered request rate whose run is sustainable and meets the SLOs,
found by bisection (the search itself is pure, `find_capacity`).

Sarathi-Serve and Vidur define capacity by the latency SLOs alone. A finite run can be
overloaded and still meet a TTFT P99 SLO before its queue has grown (every request is
in by the time the backlog would show), so on its own that gives capacities above what
the policy can serve at all. A probe here also has to be sustainable, judged over the
steady part of its arrivals, the second half of the arrival window (see `sustainability`):
the arrived requests without a first token (waiting, or part way through their
prefill), counted and weighted by prompt tokens, must not grow faster than sustain x the
arrivals; and, when the max throughput is known (the rate of a run with every request at
t = 0, on by default), the offered rate must not exceed it. `failures` names every
condition a probe misses, so a search says which one bound it.

The delivered rate (requests finished per second over the window) is reported, not
judged. On a finite bursty replay it measures bursts, not overload: the first version
(middle half of the finishes vs middle half of the arrivals) judged Token Throttling
unsustainable at 9.51 of 10.0 req/s with a P99 TTFT under 1 s, and read Sarathi
"delivering" 20.0 of 13.2; a least-squares slope of the backlog fails the same Token
Throttling cell (Qwen2.5-14B, A100, pp 4, conversation trace x1.9: 9.45 of 10.45 req/s over
the first 1,000 requests), while over 4,000 requests at that rate the backlog stays at
66-126 with no trend. An overload shows in the queue (admissions fall behind), or in a
growing running set, whose TPOT the SLO bounds; and no probe may offer more than the max
throughput.

The queue counts a request until its first token, not until its first chunk is scheduled.
Measured why: time_balanced with a per-request chunk cap (max_chunk 256, Qwen2.5-14B, H100,
pp 8, code trace) starts every waiting prompt with a 256-token chunk, so "arrived, not yet
scheduled" grew at only 4.9% of the arrivals at rate_scale 9.4 while the backlog of
unfinished requests grew at 58% (38.8 req/s offered, 16.2 delivered): `pipetwin tune`
found that setting and reported +69% capacity over Token Throttling, all of it this
artefact. Counted to the first token, the same probe's queue grows at ~58% too.

The queue is judged by count and by prompt tokens, and fails on either. Measured why:
time_balanced with a shorter-first waiting order (defer_per_1k_tokens 0.3; Qwen2.5-14B,
H100, pp 8, code trace x7.08, first 600 requests) keeps few requests waiting, so the
count grew at 5.0% of arrivals against 12.3% for first come, first served, while the
waiting prompt tokens grew at 11.8% against 12.2%: the same overload, which the count
alone passed.

The max throughput is the whole all-at-t=0 run's rate, drain included: conservative by a
few percent (Qwen2.5-14B, A100, pp 4, conversation trace: Token Throttling 14.04 req/s over
1,000 requests, 14.57 over 4,000; Sarathi(512) 13.84 and 14.37), so a capacity it caps is
never too high. A rate over a "saturated" window only (finishes from the warm-up to the
last admission) was tried and dropped: with every request there at once, short requests
finish first and the window's rate swings with the order (Token Throttling read 11.4,
Sarathi 13.3, against whole-run rates of 14.0 and 13.8).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_SUSTAIN = 0.05
SUSTAIN_KEYS = ("steady_offered_rps", "steady_delivered_rps", "queue_growth", "queue_growth_tokens")


def find_capacity(meets: Callable[[float], bool], lo: float, hi: float, tol: float,
                  rel_tol: float = 0.0) -> float:
    """Highest rate in [lo, hi] for which `meets` holds, to within `tol` or `rel_tol` x the
    rate, whichever is larger, assuming `meets` is monotone (true up to the capacity, false
    above it). A relative tolerance suits configs whose capacities span orders of magnitude
    (0.26 to 13 on the Azure traces: an absolute 0.05 is 20% of the one, 0.4% of the other).

    Returns `hi` when `meets(hi)` (capacity is at least hi), 0.0 when not `meets(lo)` (capacity
    is below lo), else a rate r with meets(r) and not meets(r') for some r' <= r + max(tol,
    rel_tol x r'). Calls `meets` at hi, then at midpoints, and at lo only when every midpoint
    failed (a low rate is the slowest to simulate): at most 2 + ceil(log2((hi-lo)/step))
    calls, step = max(tol, rel_tol x lo). rel_tol needs lo > 0 (else the step can shrink
    without end).
    """
    if not (0 <= lo < hi) or not (tol >= 0 and rel_tol >= 0) or not all(map(math.isfinite, (lo, hi, tol, rel_tol))):
        raise ValueError(f"need finite 0 <= lo < hi and tol, rel_tol >= 0, got lo={lo}, hi={hi}, tol={tol}, "
                         f"rel_tol={rel_tol}")
    if not (tol > 0 or (rel_tol > 0 and lo > 0)):
        raise ValueError(f"need tol > 0, or rel_tol > 0 with lo > 0, got tol={tol}, rel_tol={rel_tol}, lo={lo}")
    if meets(hi):
        return hi
    low, high = lo, hi
    while high - low > max(tol, rel_tol * high) * (1 + 1e-9):   # (1 + eps): 1.6 / 2**5 must count as 0.05
        mid = (low + high) / 2
        if meets(mid):
            low = mid
        else:
            high = mid
    if low == lo and not meets(lo):
        return 0.0
    return low


def slo_failures(row: Mapping[str, Any], slo: Mapping[str, float]) -> list[str]:
    """Why a run misses the SLOs ([] when it meets them): each metric above its limit (a NaN
    metric fails), and any request rejected or left unfinished (their latency is unknown)."""
    bad = []
    for metric, limit in slo.items():
        v = row.get(metric)
        if v is None or not isinstance(v, (int, float)) or math.isnan(v) or v > limit:
            bad.append(f"{metric}={v!r} > {limit:g}")
    for k in ("rejected", "unfinished"):
        if row.get(k):
            bad.append(f"{row[k]} {k}")
    return bad


def meets_slo(row: Mapping[str, Any], slo: Mapping[str, float]) -> bool:
    return not slo_failures(row, slo)


def sustainability(requests: "pd.DataFrame", points: int = 101) -> dict[str, float]:
    """Whether a finite run keeps up with its arrivals, judged over the second half of the
    arrival window (free of the warm-up; the drain comes after it):
      steady_offered_rps    arrivals per second in that window
      steady_delivered_rps  the same less the least-squares slope of the backlog (arrived,
                            not yet finished requests; unfinished ones never finish): the
                            rate requests leave at, as long as the window lasts
      queue_growth          the least-squares slope of the queue (arrived requests with no
                            first token yet: waiting, or part way through their prefill),
                            as a fraction of the arrival rate: about 1 - capacity/offered
                            when overloaded, about 0 when not.
      queue_growth_tokens   the same queue weighted by prompt tokens, as a fraction of the
                            prompt tokens arriving (NaN without a prompt_len column). A
                            count favours orders that serve short prompts first: they keep
                            few requests waiting while the work waiting grows as fast
                            (measured in the module docstring); tokens favour the reverse.
    NaN when the arrivals span no time (all at once): there is no rate to keep up with."""
    arrival = requests["arrival"].to_numpy(np.float64)
    by_arrival = np.argsort(arrival, kind="stable")
    arrival = arrival[by_arrival]
    n = len(arrival)
    nan = {k: math.nan for k in SUSTAIN_KEYS}
    t_mid, t_end = ((arrival[0] + arrival[-1]) / 2, arrival[-1]) if n else (0.0, 0.0)
    if n < 8 or not t_end > t_mid:
        return nan
    finish = np.sort(np.nan_to_num(requests["finish"].to_numpy(np.float64), nan=math.inf))
    first_token = np.nan_to_num(requests["first_token"].to_numpy(np.float64), nan=math.inf)
    by_first_token = np.argsort(first_token, kind="stable")
    first_token = first_token[by_first_token]
    t = np.linspace(t_mid, t_end, points)
    arrived = np.searchsorted(arrival, t, "right")
    rate = (arrived[-1] - arrived[0]) / (t_end - t_mid)  # arrivals in (t_mid, t_end]
    if not rate > 0:
        return nan
    has_first_token = np.searchsorted(first_token, t, "right")
    queue_slope = float(np.polyfit(t, arrived - has_first_token, 1)[0])
    backlog_slope = float(np.polyfit(t, arrived - np.searchsorted(finish, t, "right"), 1)[0])
    token_growth = math.nan
    if "prompt_len" in requests:
        tokens = requests["prompt_len"].to_numpy(np.float64)
        arrived_tokens = np.concatenate(([0.0], np.cumsum(tokens[by_arrival])))[arrived]
        served_tokens = np.concatenate(([0.0], np.cumsum(tokens[by_first_token])))[has_first_token]
        token_rate = (arrived_tokens[-1] - arrived_tokens[0]) / (t_end - t_mid)
        if token_rate > 0:
            token_growth = float(np.polyfit(t, arrived_tokens - served_tokens, 1)[0]) / token_rate
    return {"steady_offered_rps": float(rate), "steady_delivered_rps": float(rate - backlog_slope),
            "queue_growth": queue_slope / rate, "queue_growth_tokens": token_growth}


def sustain_failures(row: Mapping[str, Any], sustain: float) -> list[str]:
    """Why a run is not sustainable ([] when it is, or when it has no arrival window)."""
    bad = []
    for key, what in (("queue_growth", "queue"), ("queue_growth_tokens", "queue of prompt tokens")):
        growth = row.get(key, math.nan)
        if isinstance(growth, (int, float)) and growth > sustain:
            bad.append(f"{what} grows at {growth:.1%} of the arrival rate > {sustain:.0%}")
    return bad


def probe_failures(row: Mapping[str, Any], slo: Mapping[str, float], sustain: float,
                   max_rps: float | None = None) -> dict[str, list[str]]:
    """Every condition a capacity probe misses, by kind: "slo", "sustain", "max_throughput"
    (empty dict: it meets all)."""
    kinds = {"slo": slo_failures(row, slo), "sustain": sustain_failures(row, sustain)}
    offered = row.get("offered_rps", math.nan)
    if max_rps is not None and math.isfinite(max_rps) and offered > max_rps:
        kinds["max_throughput"] = [f"offered {offered:.3g} > max throughput {max_rps:.3g} req/s"]
    return {k: v for k, v in kinds.items() if v}


def binding_condition(probes: list[tuple[float, dict[str, list[str]]]], capacity: float,
                      lo: float, hi: float) -> str:
    """Which condition bound a search: the kinds the lowest failing probe above the capacity
    missed (with a metric name for SLOs), or the search range's end."""
    if capacity == hi:
        return "search range (hi)"
    above = sorted((r, f) for r, f in probes if f and r > capacity)
    if not above:
        return ""
    fails = above[0][1]
    names = []
    for kind in ("slo", "sustain", "max_throughput"):
        if kind in fails:
            names.append("slo " + ",".join(m.split("=")[0] for m in fails["slo"]) if kind == "slo"
                         else "sustainability" if kind == "sustain" else "max throughput")
    return ("below lo: " if capacity == 0.0 else "") + " + ".join(names)
