"""Request trace files (CSV, columns `arrived_at, num_prefill_tokens, num_decode_tokens`,
extra columns ignored), e.g. the Azure LLM inference traces.

The first kept row is re-based to t=0. A `num_decode_tokens` of 0 is raised to 1 (a
request always generates at least one token); the count is kept in
`RequestTrace.clipped_outputs` and reported with `warnings.warn`, never silently. (Neither
Azure 2023 trace has any: their smallest outputs are 7 and 6 tokens.)
"""
from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np

from core.distributions import _int, _real
from core.validation import suggest

TRACE_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")


@dataclass(frozen=True, slots=True, eq=False)
class RequestTrace:
    """Rows of a trace file, arrivals re-based to 0 and scaled. Arrays are read-only."""
    path: str
    arrivals: np.ndarray        # float64 seconds, non-decreasing, arrivals[0] == 0
    prompt_lens: np.ndarray     # int64 >= 1
    output_lens: np.ndarray     # int64 >= 1
    clipped_outputs: int = 0    # rows whose num_decode_tokens was 0, raised to 1

    def __len__(self) -> int:
        return len(self.arrivals)


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        f = float(text)  # "374.0" is fine; "3.5", "nan", "abc" are not
        if not f.is_integer():
            raise
        return int(f)


def read_trace(path: str | os.PathLike[str], *, time_scale: float = 1.0, start: int = 0,
               limit: int | None = None, rate_scale: float | None = None) -> RequestTrace:
    """Read rows [start, start+limit) of a trace CSV. Arrival times are re-based so the
    first kept row arrives at 0, then multiplied by `time_scale` (0.5 = twice as fast) or
    divided by `rate_scale` (2.0 = twice the rate); give one or the other.

    Rows up to the last kept one are validated, and errors name the file, the 1-based
    line number and the column. Times must be finite, >= 0 and non-decreasing (equal is
    fine); prompt lengths >= 1; output lengths >= 0, with 0 raised to 1 and counted."""
    # Long on purpose: one pass over the file, each check beside the line it names in its
    # error; split up, the line number and the previous row's time would travel with it.
    path = os.fspath(path)
    time_scale = _real("time_scale", time_scale, low=0, strict=True)
    if rate_scale is not None:
        rate_scale = _real("rate_scale", rate_scale, low=0, strict=True)
        if time_scale != 1.0:
            raise ValueError(f"give time_scale or rate_scale, not both "
                             f"(got time_scale={time_scale:g}, rate_scale={rate_scale:g})")
    start = _int("start", start, 0)
    if limit is not None:
        limit = _int("limit", limit, 1)
    stop = math.inf if limit is None else start + limit

    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    clipped = 0
    num_rows = 0
    prev = 0.0
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file; expected a header with columns {', '.join(TRACE_COLUMNS)}")
        header = [h.strip() for h in header]
        for col in TRACE_COLUMNS:
            if col not in header:
                raise ValueError(f"{path}, line {reader.line_num}, column {col!r}: missing column "
                                 f"(header has: {', '.join(header)}){suggest(col, header)}")
        idx = [header.index(col) for col in TRACE_COLUMNS]
        for row in reader:
            if not row:  # blank line
                continue
            if num_rows >= stop:
                break
            line = reader.line_num
            cells = []
            for col, i in zip(TRACE_COLUMNS, idx):
                if i >= len(row) or not row[i].strip():
                    raise ValueError(f"{path}, line {line}, column {col!r}: missing value")
                cells.append(row[i])
            where = f"{path}, line {line}, column"
            try:
                t = float(cells[0])
            except ValueError:
                raise ValueError(f"{where} 'arrived_at': not a number: {cells[0]!r}") from None
            if not math.isfinite(t):
                raise ValueError(f"{where} 'arrived_at': time must be finite, got {cells[0]!r}")
            if t < 0:
                raise ValueError(f"{where} 'arrived_at': time must be >= 0, got {t:g}")
            if t < prev:
                raise ValueError(f"{where} 'arrived_at': time {t:g} is earlier than the previous "
                                 f"row's {prev:g} (times must be non-decreasing)")
            prev = t
            lens = []
            for col, text in zip(TRACE_COLUMNS[1:], cells[1:]):
                try:
                    lens.append(_parse_int(text))
                except ValueError:
                    raise ValueError(f"{where} {col!r}: not an integer: {text!r}") from None
            p, d = lens
            if p < 1:
                raise ValueError(f"{where} 'num_prefill_tokens': must be >= 1, got {p}")
            if d < 0:
                raise ValueError(f"{where} 'num_decode_tokens': must be >= 0, got {d}")
            if num_rows >= start:
                if d == 0:
                    clipped += 1
                    d = 1
                times.append(t)
                prompts.append(p)
                outputs.append(d)
            num_rows += 1

    if not times:
        if num_rows == 0:
            raise ValueError(f"{path}: no data rows")
        raise ValueError(f"start must be < the number of data rows in {path} ({num_rows}), got {start}")
    arrivals = np.asarray(times, dtype=np.float64)
    arrivals -= arrivals[0]
    if rate_scale is not None:
        arrivals /= rate_scale
    elif time_scale != 1.0:
        arrivals *= time_scale
    if clipped:
        warnings.warn(f"{path}: {clipped} of {len(times)} kept rows have num_decode_tokens = 0; "
                      f"raised to 1 (a request generates at least one token)", stacklevel=2)
    arrays = [arrivals, np.asarray(prompts, dtype=np.int64), np.asarray(outputs, dtype=np.int64)]
    for a in arrays:
        a.flags.writeable = False
    return RequestTrace(path, *arrays, clipped_outputs=clipped)
