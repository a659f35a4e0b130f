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
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from core.metrics import inter_token_latencies
from core.perfetto import write_perfetto
from core.table_io import (BATCH_COLUMNS, REQUEST_COLUMNS, SAMPLE_COLUMNS, TABLE_FORMATS, TABLES,  # noqa: F401
                           TOKEN_COLUMNS, coerce, finite, has_pyarrow, json_default, require_pyarrow)

if TYPE_CHECKING:  # pandas is imported lazily: the scheduler hot path never needs it
    import numpy as np
    import pandas as pd
    from core.request import Request



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
        # every sample column but kv_util (kv_used / kv_total, computed in `build`)
        self._sample_cols = tuple(array("d" if c == "time" else "q") for c in _RECORDED_SAMPLE_COLUMNS)

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
        c[0].append(time); c[1].append(kv_used); c[2].append(kv_total)
        c[3].append(waiting); c[4].append(ready); c[5].append(in_flight); c[6].append(running)

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
        import pandas as pd

        requests = list(requests)
        req_rows = [(r.id, r.arrival, r.first_scheduled, r.token_times[0] if r.token_times else None,
                     r.finish_time, r.prompt_len, len(r.token_times), r.max_output, r.preemptions,
                     r.status.value, r.finish_reason) for r in requests]
        return Trace(
            batches=self._batches_frame(),
            requests=pd.DataFrame(req_rows, columns=REQUEST_COLUMNS),
            # the token table (millions of rows on a long trace) is built when first read
            tokens=TokenTimes([(r.id, r.token_times) for r in requests]),
            samples=self._samples_frame(),
            meta=dict(meta or {}),
        )

    def _samples_frame(self) -> "pd.DataFrame":
        df = _frame(_RECORDED_SAMPLE_COLUMNS, self._sample_cols)
        df.insert(SAMPLE_COLUMNS.index("kv_util"), "kv_util", df["kv_used"] / df["kv_total"])
        return df

    def _batches_frame(self) -> "pd.DataFrame":
        import numpy as np
        import pandas as pd
        batch_id, first, rows, prefill, decode, requests = (_column(a) for a in self._blocks)
        row_in_block = np.arange(int(rows.sum()), dtype=np.int64) - np.repeat(np.cumsum(rows) - rows, rows)
        columns = (np.repeat(batch_id, rows), np.repeat(first, rows) + row_in_block,
                   _column(self._times[0]), _column(self._times[1]),
                   np.repeat(prefill, rows), np.repeat(decode, rows), np.repeat(requests, rows))
        return pd.DataFrame(dict(zip(BATCH_COLUMNS, columns)), copy=False)


_RECORDED_SAMPLE_COLUMNS = [c for c in SAMPLE_COLUMNS if c != "kv_util"]


def _column(a: array) -> "np.ndarray":
    """A recorded column as numpy without a copy: a view of the array's own buffer (8-byte
    'd' or 'q' cells). Why: copying the simulator's ~25 MB of recorded columns cost ~6,000
    page faults (0.03-0.1 s on this VM). So `build` is a recorder's last step: while its
    tables live, an append to the recorder raises BufferError instead of moving the data."""
    import numpy as np
    return np.frombuffer(a, dtype=np.float64 if a.typecode == "d" else np.int64)


def _frame(columns: list[str], arrays: tuple[array, ...]) -> "pd.DataFrame":
    import pandas as pd
    return pd.DataFrame({c: _column(a) for c, a in zip(columns, arrays)}, copy=False)


class TokenTimes:
    """The token table's source: each request's token times as recorded (array('d')).
    `frame()` builds the table; `gaps()` gives the inter-token gaps without building it."""
    __slots__ = ("_per_request",)

    def __init__(self, per_request: list[tuple[int, array]]) -> None:
        self._per_request = per_request

    def __len__(self) -> int:
        return sum(len(t) for _, t in self._per_request)

    def frame(self) -> "pd.DataFrame":
        import numpy as np
        import pandas as pd

        total = len(self)
        ids = np.empty(total, np.int64)
        index = np.empty(total, np.int64)
        times = np.empty(total, np.float64)
        pos = 0
        for rid, t in self._per_request:   # preallocated columns filled in place
            n = len(t)
            if n:
                ids[pos:pos + n] = rid
                index[pos:pos + n] = np.arange(n)
                times[pos:pos + n] = t
                pos += n
        return pd.DataFrame({"request_id": ids, "index": index, "time": times}, copy=False)

    def gaps(self, request_ids: Any = None) -> "np.ndarray":
        """Every gap between consecutive tokens of a request (only `request_ids`' if given)."""
        import numpy as np

        if not self._per_request:
            return np.empty(0)
        ids = np.fromiter((rid for rid, _ in self._per_request), np.int64, len(self._per_request))
        lens = np.fromiter((len(t) for _, t in self._per_request), np.int64, len(self._per_request))
        times = np.concatenate([np.frombuffer(t, dtype=np.float64) for _, t in self._per_request if len(t)]
                               or [np.empty(0)])
        if len(times) < 2:
            return np.empty(0)
        keep = np.ones(len(ids), bool) if request_ids is None else np.isin(ids, np.asarray(request_ids))
        gaps = np.diff(times)
        if keep.all():   # the usual case: only the steps from one request to the next drop out
            ends = np.cumsum(lens)[lens > 0]
            valid = np.ones(len(gaps), bool)
            valid[ends[ends < len(times)] - 1] = False
            return gaps[valid]
        owner = np.repeat(np.arange(len(ids), dtype=np.int32), lens)
        return gaps[(owner[1:] == owner[:-1]) & keep[owner[1:]]]


class MissingTable:
    """A table a results folder was written without; reading it says how to get it."""
    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class Trace:
    """The four tables and meta. `tokens` may be built on first access (simulator runs keep
    the per-request token times until then: a long trace has millions of tokens, and most
    callers need only their gaps, see `token_gaps`)."""

    def __init__(self, batches: "pd.DataFrame", requests: "pd.DataFrame",
                 tokens: "pd.DataFrame | TokenTimes | MissingTable", samples: "pd.DataFrame",
                 meta: dict[str, Any] | None = None) -> None:
        self.batches = batches
        self.requests = requests
        self._tokens = tokens
        self.samples = samples
        self.meta: dict[str, Any] = {} if meta is None else meta   # pp, policy, seed, ...

    @property
    def tokens(self) -> "pd.DataFrame":
        if isinstance(self._tokens, TokenTimes):
            self._tokens = self._tokens.frame()
        elif isinstance(self._tokens, MissingTable):
            raise FileNotFoundError(self._tokens.message)
        return self._tokens

    @tokens.setter
    def tokens(self, value: "pd.DataFrame") -> None:
        self._tokens = value

    @property
    def has_tokens(self) -> bool:
        return not isinstance(self._tokens, MissingTable)

    def token_gaps(self, request_ids: Any = None) -> "np.ndarray":
        """Inter-token gaps (optionally of `request_ids` only), from the recorded token times
        when the table has not been built."""
        if isinstance(self._tokens, TokenTimes):
            return self._tokens.gaps(request_ids)
        return inter_token_latencies(self.tokens, request_ids)

    # ------------------------------------------------------------------ I/O
    def save(self, folder: str | Path, formats: Sequence[str] = ("csv",),
             tables: Sequence[str] | None = None) -> Path:
        """Write `tables` (one file per table and format) and meta.json into `folder`.

        formats: any of "csv", "parquet". Parquet needs pyarrow (`pip install pipetwin[parquet]`).
        tables: any of TABLES (default: every table this trace has); a folder saved without
        tokens loads with `tokens` unreadable (the error says so) and `has_tokens` False.
        """
        formats = tuple(formats)
        unknown = [f for f in formats if f not in TABLE_FORMATS]
        if unknown or not formats:
            raise ValueError(f"formats must be a non-empty subset of {TABLE_FORMATS}, got {formats!r}")
        tables = tuple(tables) if tables is not None else tuple(
            t for t in TABLES if t != "tokens" or self.has_tokens)
        bad = [t for t in tables if t not in TABLES]
        if bad or not {"batches", "requests", "samples"} <= set(tables):
            raise ValueError(f"tables must include batches, requests and samples (tokens is optional), "
                             f"from {TABLES}, got {tables!r}")
        if "parquet" in formats:
            require_pyarrow()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            for fmt in TABLE_FORMATS:   # a stale file from an earlier save would load as this run's
                if name not in tables or fmt not in formats:
                    (folder / f"{name}.{fmt}").unlink(missing_ok=True)
        for name in tables:
            df = coerce(name, getattr(self, name))
            if "csv" in formats:
                df.to_csv(folder / f"{name}.csv", index=False)
            if "parquet" in formats:
                df.to_parquet(folder / f"{name}.parquet", index=False)
            del df
        with open(folder / "meta.json", "w") as f:
            json.dump(self.meta, f, indent=2, sort_keys=True, default=json_default)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Trace":
        """Read a folder written by `save` (Parquet when all its files are there and pyarrow is
        importable, else CSV). Columns get the schema's dtypes (times float64, counts int64).
        A folder without a tokens table loads with `tokens` a MissingTable (see `save`)."""
        import pandas as pd

        folder = Path(folder)
        if not (folder / "meta.json").exists():
            raise FileNotFoundError(f"{folder}: no meta.json; not a saved trace folder")
        present = [n for n in TABLES if n != "tokens" or any((folder / f"tokens.{f}").exists()
                                                              for f in TABLE_FORMATS)]
        use_parquet = all((folder / f"{n}.parquet").exists() for n in present) and has_pyarrow()
        tables: dict[str, Any] = {"tokens": MissingTable(
            f"{folder}: no tokens table (the run was saved without it; `pipetwin sim --tokens` "
            "or Trace.save(tables=TABLES) writes it)")}
        for name in present:
            if use_parquet:
                df = pd.read_parquet(folder / f"{name}.parquet")
            else:
                path = folder / f"{name}.csv"
                if not path.exists():
                    raise FileNotFoundError(f"{path}: missing table (and no complete parquet set)")
                # pandas 3 parses floats exactly by default (and deprecates the option)
                exact = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
                df = pd.read_csv(path, **exact)
            tables[name] = coerce(name, df)
        with open(folder / "meta.json") as f:
            meta = json.load(f)
        return cls(meta=meta, **tables)

    def to_perfetto(self, path: str | Path, window: tuple[float, float] | None = None,
                    chunk: int = 20_000) -> Path:
        """Write Chrome/Perfetto trace-event JSON: core/perfetto.py `write_perfetto`."""
        return write_perfetto(self, path, window, chunk)


