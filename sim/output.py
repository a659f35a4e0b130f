"""What `pipetwin sim` writes: the tables a user reads by default, the heavy ones on request.

At trace scale the per-token table (millions of rows) and a Perfetto trace of every
micro-batch are most of the output's time, memory and disk, and few runs need them, so
they are written only when asked for (`tokens=True`, `perfetto=True`). The Python API
(`simulate`) still returns every table.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import yaml

from core.table_io import TABLE_FORMATS, default_formats, finite, json_default

DEFAULT_TABLES = ("batches", "requests", "samples")


def parse_window(text: str) -> tuple[float, float]:
    """'START:END' in simulated seconds -> (start, end); ValueError naming what is allowed."""
    start, sep, end = text.partition(":")
    try:
        lo, hi = float(start), float(end)
    except ValueError:
        lo = hi = math.nan
    if not sep or not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise ValueError(f"must be START:END in seconds with 0 <= START < END, got {text!r}")
    return lo, hi


def save_outputs(result: Any, out: str | Path, *, formats: Sequence[str] | None = None,
                 tokens: bool = False, perfetto: bool = False,
                 perfetto_window: tuple[float, float] | None = None) -> list[Path]:
    """Write a SimResult's folder: summary.json, config.yaml, the batches/requests/samples
    tables (+ tokens), meta.json, and perfetto.json when asked (a window implies it).
    Returns the files written."""
    formats = tuple(formats) if formats else default_formats()
    bad = [f for f in formats if f not in TABLE_FORMATS]
    if bad:
        raise ValueError(f"formats must be a subset of {TABLE_FORMATS}, got {formats!r}")
    out = Path(out)
    tables = DEFAULT_TABLES + (("tokens",) if tokens else ())
    result.trace.save(out, formats=formats, tables=tables)
    written = [out / f"{t}.{f}" for t in tables for f in formats] + [out / "meta.json"]
    perfetto_path = out / "perfetto.json"
    if perfetto or perfetto_window is not None:
        written.append(result.trace.to_perfetto(perfetto_path, window=perfetto_window))
    else:
        perfetto_path.unlink(missing_ok=True)   # an earlier run's, in the same folder
    (out / "summary.json").write_text(json.dumps(finite(result.summary), indent=2, default=json_default) + "\n")
    (out / "config.yaml").write_text(yaml.safe_dump(result.config.to_dict(), sort_keys=False))
    return [*written, out / "summary.json", out / "config.yaml"]
