"""The trace both worlds write: tidy tables the metrics read.

Tables (pandas DataFrames):
  batches   one row per micro-batch per stage: batch_id, stage, start, end,
            prefill_tokens, decode_tokens, num_requests
  requests  one row per request: request_id, arrival, first_scheduled, first_token,
            finish, prompt_len, output_len, max_output, preemptions, status, finish_reason
  tokens    one row per generated token: request_id, index, time
  samples   system state after every scheduling decision and completion: time, kv_used,
            kv_total, kv_util, waiting, ready, in_flight, running
"""
from __future__ import annotations

import json
import math
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:  # pandas is imported lazily: the scheduler hot path never needs it
    import pandas as pd
    from core.request import Request

BATCH_COLUMNS = ["batch_id", "stage", "start", "end", "prefill_tokens", "decode_tokens", "num_requests"]
REQUEST_COLUMNS = ["request_id", "arrival", "first_scheduled", "first_token", "finish", "prompt_len",
                   "output_len", "max_output", "preemptions", "status", "finish_reason"]
TOKEN_COLUMNS = ["request_id", "index", "time"]
SAMPLE_COLUMNS = ["time", "kv_used", "kv_total", "kv_util", "waiting", "ready", "in_flight", "running"]


class TraceRecorder:
    """Append-only recorder. Rows go into typed arrays (8 bytes a cell): a long simulation
    records millions of cells, and tuples would cost ~10x the memory. Stage rows are kept
    in blocks, one per call: the rows of one micro-batch's consecutive stages share its id
    and sizes, so `stages` stores those once (the simulator's hot path) and `build` expands
    them."""
    __slots__ = ("_blocks", "_times", "_sample_cols")

    def __init__(self) -> None:
        # per block: batch_id, first stage, rows, prefill_tokens, decode_tokens, num_requests
        self._blocks = tuple(array("q") for _ in range(6))
        self._times = (array("d"), array("d"))  # per row: start, end
        self._sample_cols = tuple(array("q" if c in ("kv_used", "kv_total", "waiting", "ready", "in_flight", "running")
                                        else "d") for c in SAMPLE_COLUMNS)

    def stage(self, batch_id: int, stage: int, start: float, end: float,
              prefill_tokens: int, decode_tokens: int, num_requests: int) -> None:
        b, t = self._blocks, self._times
        b[0].append(batch_id); b[1].append(stage); b[2].append(1)
        b[3].append(prefill_tokens); b[4].append(decode_tokens); b[5].append(num_requests)
        t[0].append(start); t[1].append(end)

    def stages(self, batch_id: int, starts: Sequence[float], ends: Sequence[float],
               prefill_tokens: int, decode_tokens: int, num_requests: int) -> None:
        """One micro-batch's rows for stages 0..len(starts)-1: the rows `stage` would
        record stage by stage, in one call."""
        b, t = self._blocks, self._times
        b[0].append(batch_id); b[1].append(0); b[2].append(len(starts))
        b[3].append(prefill_tokens); b[4].append(decode_tokens); b[5].append(num_requests)
        t[0].extend(starts); t[1].extend(ends)

    def sample(self, time: float, kv_used: int, kv_total: int, waiting: int, ready: int,
               in_flight: int, running: int) -> None:
        c = self._sample_cols
        c[0].append(time); c[1].append(kv_used); c[2].append(kv_total); c[3].append(kv_used / kv_total)
        c[4].append(waiting); c[5].append(ready); c[6].append(in_flight); c[7].append(running)

    @property
    def num_stage_rows(self) -> int:
        return len(self._times[0])

    def stage_rows(self) -> list[tuple]:
        """Rows as tuples (e.g. to ship a worker's rows to stage 0)."""
        starts, ends = self._times
        rows, i = [], 0
        for batch_id, first, n, prefill, decode, requests in zip(*self._blocks):
            for stage in range(first, first + n):
                rows.append((batch_id, stage, starts[i], ends[i], prefill, decode, requests))
                i += 1
        return rows

    def add_stage_rows(self, rows: Iterable[tuple]) -> None:
        for row in rows:
            self.stage(*row)

    def build(self, requests: Iterable["Request"], meta: dict[str, Any] | None = None) -> "Trace":
        import numpy as np
        import pandas as pd

        requests = list(requests)
        req_rows = [(r.id, r.arrival, r.first_scheduled, r.token_times[0] if r.token_times else None,
                     r.finish_time, r.prompt_len, len(r.output_ids), r.max_output, r.preemptions,
                     r.status.value, r.finish_reason) for r in requests]
        # Preallocated columns filled in place: a long trace has millions of tokens.
        total = sum(len(r.token_times) for r in requests)
        ids = np.empty(total, np.int64)
        index = np.empty(total, np.int64)
        times = np.empty(total, np.float64)
        pos = 0
        for r in requests:
            n = len(r.token_times)
            if n:
                ids[pos:pos + n] = r.id
                index[pos:pos + n] = np.arange(n)
                times[pos:pos + n] = r.token_times
                pos += n
        tokens = pd.DataFrame({"request_id": ids, "index": index, "time": times}, copy=False)
        return Trace(
            batches=self._batches_frame(),
            requests=pd.DataFrame(req_rows, columns=REQUEST_COLUMNS),
            tokens=tokens,
            samples=_frame(SAMPLE_COLUMNS, self._sample_cols),
            meta=dict(meta or {}),
        )

    def _batches_frame(self) -> "pd.DataFrame":
        import numpy as np
        import pandas as pd
        batch_id, first, rows, prefill, decode, requests = (np.array(a, dtype=np.int64) for a in self._blocks)
        row_in_block = np.arange(int(rows.sum()), dtype=np.int64) - np.repeat(np.cumsum(rows) - rows, rows)
        columns = (np.repeat(batch_id, rows), np.repeat(first, rows) + row_in_block,
                   np.array(self._times[0], dtype=np.float64), np.array(self._times[1], dtype=np.float64),
                   np.repeat(prefill, rows), np.repeat(decode, rows), np.repeat(requests, rows))
        return pd.DataFrame(dict(zip(BATCH_COLUMNS, columns)), copy=False)


def _frame(columns: list[str], arrays: tuple[array, ...]) -> "pd.DataFrame":
    import numpy as np
    import pandas as pd
    return pd.DataFrame({c: np.array(a, dtype=np.float64 if a.typecode == "d" else np.int64)
                         for c, a in zip(columns, arrays)}, copy=False)


@dataclass
class Trace:
    batches: "pd.DataFrame"
    requests: "pd.DataFrame"
    tokens: "pd.DataFrame"
    samples: "pd.DataFrame"
    meta: dict[str, Any] = field(default_factory=dict)  # pp, policy, seed, ...

    # ------------------------------------------------------------------ I/O
    def save(self, folder: str | Path, formats: Sequence[str] = ("csv",)) -> Path:
        """Write the four tables (one file per table and format) and meta.json into `folder`.

        formats: any of "csv", "parquet". Parquet needs pyarrow (`pip install pipetwin[parquet]`).
        """
        formats = tuple(formats)
        unknown = [f for f in formats if f not in TABLE_FORMATS]
        if unknown or not formats:
            raise ValueError(f"formats must be a non-empty subset of {TABLE_FORMATS}, got {formats!r}")
        if "parquet" in formats:
            _require_pyarrow()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            df = _coerce(name, getattr(self, name))
            if "csv" in formats:
                df.to_csv(folder / f"{name}.csv", index=False)
            if "parquet" in formats:
                df.to_parquet(folder / f"{name}.parquet", index=False)
        with open(folder / "meta.json", "w") as f:
            json.dump(self.meta, f, indent=2, sort_keys=True, default=_json_default)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Trace":
        """Read a folder written by `save` (Parquet when all its files are there and pyarrow is
        importable, else CSV). Columns get the schema's dtypes (times float64, counts int64)."""
        import pandas as pd

        folder = Path(folder)
        if not (folder / "meta.json").exists():
            raise FileNotFoundError(f"{folder}: no meta.json; not a saved trace folder")
        use_parquet = all((folder / f"{n}.parquet").exists() for n in TABLES) and _has_pyarrow()
        tables = {}
        for name in TABLES:
            if use_parquet:
                df = pd.read_parquet(folder / f"{name}.parquet")
            else:
                path = folder / f"{name}.csv"
                if not path.exists():
                    raise FileNotFoundError(f"{path}: missing table (and no complete parquet set)")
                # pandas 3 parses floats exactly by default (and deprecates the option)
                exact = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
                df = pd.read_csv(path, **exact)
            tables[name] = _coerce(name, df)
        with open(folder / "meta.json") as f:
            meta = json.load(f)
        return cls(meta=meta, **tables)

    def to_perfetto(self, path: str | Path) -> Path:
        """Write Chrome/Perfetto trace-event JSON (open in ui.perfetto.dev or chrome://tracing).

        One track per pipeline stage ("stage N"), one complete event ("X", microseconds) per
        batch row named "mb <batch_id>", and counter tracks for KV utilization and queue lengths.
        """
        pid = 1
        events: list[dict[str, Any]] = [
            {"ph": "M", "pid": pid, "tid": 0, "name": "process_name",
             "args": {"name": f"pipetwin {self.meta.get('policy', '')}".strip()}},
        ]
        b = self.batches
        stages = sorted({int(s) for s in b["stage"]}) if len(b) else []
        pp = self.meta.get("pp")
        if isinstance(pp, (int, float)) and pp == int(pp):
            stages = sorted(set(stages) | set(range(int(pp))))
        for s in stages:
            events.append({"ph": "M", "pid": pid, "tid": s, "name": "thread_name",
                           "args": {"name": f"stage {s}"}})
            events.append({"ph": "M", "pid": pid, "tid": s, "name": "thread_sort_index",
                           "args": {"sort_index": s}})
        cols = [b[c].tolist() for c in ("batch_id", "stage", "start", "end", "prefill_tokens",
                                         "decode_tokens", "num_requests")]
        for bid, st, start, end, pre, dec, nreq in zip(*cols):
            events.append({"ph": "X", "pid": pid, "tid": int(st), "name": f"mb {bid}", "cat": "batch",
                           "ts": start * 1e6, "dur": max(end - start, 0.0) * 1e6,
                           "args": {"batch_id": bid, "prefill_tokens": pre, "decode_tokens": dec,
                                    "num_requests": nreq}})
        sm = self.samples
        queue_cols = [c for c in ("waiting", "ready", "in_flight", "running") if c in sm.columns]
        times = [t * 1e6 for t in sm["time"].tolist()]
        for ts, kv in zip(times, sm["kv_util"].tolist()):
            events.append({"ph": "C", "pid": pid, "name": "kv_util", "ts": ts, "args": {"kv_util": _finite(kv)}})
        for ts, *qs in zip(times, *(sm[c].tolist() for c in queue_cols)):
            events.append({"ph": "C", "pid": pid, "name": "queues", "ts": ts,
                           "args": {c: _finite(q) for c, q in zip(queue_cols, qs)}})
        doc = {"traceEvents": events, "displayTimeUnit": "ms",
               "otherData": {k: _jsonable(v) for k, v in self.meta.items()}}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:  # dumps, not dump: the C encoder is much faster
            f.write(json.dumps(doc, default=_json_default, allow_nan=False))
        return path


TABLES = ("batches", "requests", "tokens", "samples")
TABLE_FORMATS = ("csv", "parquet")
_FLOAT_COLUMNS = {"start", "end", "arrival", "first_scheduled", "first_token", "finish", "time", "kv_util"}
_TEXT_COLUMNS = {"status", "finish_reason"}


def _coerce(name: str, df: "pd.DataFrame") -> "pd.DataFrame":
    """Give a table the schema's dtypes: float times, int64 counts (left alone if they hold
    gaps), text columns as strings with missing cells missing. Extra columns pass through."""
    import pandas as pd

    columns = {"batches": BATCH_COLUMNS, "requests": REQUEST_COLUMNS,
               "tokens": TOKEN_COLUMNS, "samples": SAMPLE_COLUMNS}[name]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name} table lacks columns {missing}")
    df = df[columns + [c for c in df.columns if c not in columns]].reset_index(drop=True).copy()
    for c in columns:
        col = df[c]
        if c in _TEXT_COLUMNS:
            # inferred like TraceRecorder.build's tables: object on pandas 2, str on pandas 3
            df[c] = pd.Series([None if _is_missing(v) else str(v.value if hasattr(v, "value") else v)
                               for v in col], index=df.index)
        elif c in _FLOAT_COLUMNS:
            df[c] = pd.to_numeric(col, errors="coerce").astype("float64")
        else:
            try:
                df[c] = col.astype("int64")
            except (TypeError, ValueError):
                pass  # ids that are not ints, or counts with gaps: keep as given
    return df


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def _require_pyarrow() -> None:
    if not _has_pyarrow():
        raise ImportError("writing Parquet needs pyarrow: pip install 'pipetwin[parquet]' "
                          "(or save with formats=('csv',))")


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):  # numpy scalar
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def _finite(v: Any) -> int | float | None:
    if isinstance(v, int):
        return v
    v = float(v)
    return v if math.isfinite(v) else None


def _json_default(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        return v.item()
    if hasattr(v, "tolist") and callable(v.tolist):
        return v.tolist()
    if isinstance(v, (set, frozenset)):
        return sorted(v, key=str)
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "__dataclass_fields__"):
        import dataclasses
        return dataclasses.asdict(v)
    return str(v)
