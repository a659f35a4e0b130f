"""How trace tables meet files: the schema's dtypes on write (`coerce`), Parquet when
pyarrow is there, JSON-safe values for meta and summaries."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

BATCH_COLUMNS = ["batch_id", "stage", "start", "end", "prefill_tokens", "decode_tokens", "num_requests"]
REQUEST_COLUMNS = ["request_id", "arrival", "first_scheduled", "first_token", "finish", "prompt_len",
                   "output_len", "max_output", "preemptions", "status", "finish_reason"]
TOKEN_COLUMNS = ["request_id", "index", "time"]
SAMPLE_COLUMNS = ["time", "kv_used", "kv_total", "kv_util", "waiting", "ready", "in_flight", "running"]
TABLES = ("batches", "requests", "tokens", "samples")
TABLE_FORMATS = ("csv", "parquet")
_FLOAT_COLUMNS = {"start", "end", "arrival", "first_scheduled", "first_token", "finish", "time", "kv_util"}
_TEXT_COLUMNS = {"status", "finish_reason"}


def coerce(name: str, df: "pd.DataFrame") -> "pd.DataFrame":
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


def has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def default_formats() -> tuple[str, ...]:
    """Parquet when pyarrow is importable (smaller, faster to write and read), else CSV."""
    return ("parquet",) if has_pyarrow() else ("csv",)


def require_pyarrow() -> None:
    if not has_pyarrow():
        raise ImportError("writing Parquet needs pyarrow: pip install 'pipetwin[parquet]' "
                          "(or save with formats=('csv',))")


def jsonable(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):  # numpy scalar
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return str(v)


def finite(d: dict) -> dict:
    """NaN and inf values as None (JSON has neither): summary.json as `sim`, `bench` and `validate` write it."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def json_default(v: Any) -> Any:
    """json.dumps(default=...) for what traces and summaries hold: numpy scalars and arrays, sets, paths."""
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
