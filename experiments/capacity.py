"""Capacity as Sarathi-Serve and Vidur define it: the highest request rate whose latency
percentiles meet the SLOs, found by bisection (the search itself is pure, `find_capacity`)."""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping


def find_capacity(meets: Callable[[float], bool], lo: float, hi: float, tol: float) -> float:
    """Highest rate in [lo, hi] for which `meets` holds, to within `tol`, assuming `meets` is
    monotone (true up to the capacity, false above it).

    Returns `hi` when `meets(hi)` (capacity is at least hi), 0.0 when not `meets(lo)` (capacity
    is below lo), else a rate r with meets(r) and not meets(r') for some r' <= r + tol.
    Calls `meets` at hi, then lo, then at midpoints: at most 2 + ceil(log2((hi-lo)/tol)) calls.
    """
    if not (0 <= lo < hi) or not (tol > 0) or not all(map(math.isfinite, (lo, hi, tol))):
        raise ValueError(f"need finite 0 <= lo < hi and tol > 0, got lo={lo}, hi={hi}, tol={tol}")
    if meets(hi):
        return hi
    if not meets(lo):
        return 0.0
    while hi - lo > tol * (1 + 1e-9):   # (1 + eps): 1.6 / 2**5 must count as 0.05
        mid = (lo + hi) / 2
        if meets(mid):
            lo = mid
        else:
            hi = mid
    return lo


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
