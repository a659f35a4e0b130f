"""A trace as Chrome/Perfetto trace-event JSON (ui.perfetto.dev, chrome://tracing), written
in chunks so memory stays flat however long the run (a full Azure trace is ~10^6 events)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.table_io import json_default, jsonable

if TYPE_CHECKING:
    from core.trace import Trace


def write_perfetto(trace: "Trace", path: str | Path, window: tuple[float, float] | None = None,
                   chunk: int = 20_000) -> Path:
    """Write `trace` as Chrome/Perfetto trace-event JSON (open in ui.perfetto.dev or
    chrome://tracing).

    One track per pipeline stage ("stage N"), one complete event ("X", microseconds) per
    batch row named "mb <batch_id>", and counter tracks for KV utilization and queue lengths.
    `window` = (start, end) in seconds keeps the batch rows that overlap it and the samples
    inside it (plus the last one before it, so the counters start at their value then).
    Events are written `chunk` at a time: memory stays flat however long the run.
    """
    import numpy as np  # why: core stays importable without numpy (the scheduler never needs it)
    # Long on purpose: the file's parts in the order they are written (tracks, stage
    # events, counters, meta), each streamed as it is made.

    pid = 1
    head: list[dict[str, Any]] = [
        {"ph": "M", "pid": pid, "tid": 0, "name": "process_name",
         "args": {"name": f"pipetwin {trace.meta.get('policy', '')}".strip()}},
    ]
    b = trace.batches
    stages = sorted({int(s) for s in b["stage"].unique()}) if len(b) else []
    pp = trace.meta.get("pp")
    if isinstance(pp, (int, float)) and pp == int(pp):
        stages = sorted(set(stages) | set(range(int(pp))))
    for s in stages:
        head.append({"ph": "M", "pid": pid, "tid": s, "name": "thread_name",
                     "args": {"name": f"stage {s}"}})
        head.append({"ph": "M", "pid": pid, "tid": s, "name": "thread_sort_index",
                     "args": {"sort_index": s}})
    sm = trace.samples
    if window is not None:
        lo, hi = (float(x) for x in window)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"perfetto window must be finite START < END seconds, got {window!r}")
        b = b[(b["end"].to_numpy() >= lo) & (b["start"].to_numpy() <= hi)]
        t = sm["time"].to_numpy()
        inside = (t >= lo) & (t <= hi)
        before = np.flatnonzero(t < lo)
        if len(before):
            inside[before[np.argmax(t[before])]] = True
        sm = sm[inside]
    queue_cols = [c for c in ("waiting", "ready", "in_flight", "running") if c in sm.columns]

    def batch_events(i: int) -> list[dict[str, Any]]:
        part = b.iloc[i:i + chunk]
        cols = [part[c].tolist() for c in ("batch_id", "stage", "start", "end", "prefill_tokens",
                                            "decode_tokens", "num_requests")]
        return [{"ph": "X", "pid": pid, "tid": int(st), "name": f"mb {bid}", "cat": "batch",
                 "ts": start * 1e6, "dur": max(end - start, 0.0) * 1e6,
                 "args": {"batch_id": bid, "prefill_tokens": pre, "decode_tokens": dec,
                          "num_requests": nreq}}
                for bid, st, start, end, pre, dec, nreq in zip(*cols)]

    def kv_events(i: int) -> list[dict[str, Any]]:
        part = sm.iloc[i:i + chunk]
        return [{"ph": "C", "pid": pid, "name": "kv_util", "ts": t * 1e6, "args": {"kv_util": _finite(kv)}}
                for t, kv in zip(part["time"].tolist(), part["kv_util"].tolist())]

    def queue_events(i: int) -> list[dict[str, Any]]:
        part = sm.iloc[i:i + chunk]
        return [{"ph": "C", "pid": pid, "name": "queues", "ts": t * 1e6,
                 "args": {c: _finite(q) for c, q in zip(queue_cols, qs)}}
                for t, *qs in zip(part["time"].tolist(), *(part[c].tolist() for c in queue_cols))]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    other = json.dumps({k: jsonable(v) for k, v in trace.meta.items()}, default=json_default,
                       allow_nan=False)
    with open(path, "w") as f:
        f.write('{"traceEvents": ')
        first = True

        def emit(events: list[dict[str, Any]]) -> None:
            nonlocal first
            if not events:
                return
            text = json.dumps(events, default=json_default, allow_nan=False)  # C encoder
            f.write(("[" if first else ", ") + text[1:-1])
            first = False

        emit(head)
        for make, n in ((batch_events, len(b)), (kv_events, len(sm)), (queue_events, len(sm))):
            for i in range(0, n, chunk):
                emit(make(i))
        f.write(("[" if first else "") + "]")
        f.write(f', "displayTimeUnit": "ms", "otherData": {other}}}')
    return path


def _finite(v: Any) -> int | float | None:
    if isinstance(v, int):
        return v
    v = float(v)
    return v if math.isfinite(v) else None
