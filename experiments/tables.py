"""The sweep's tidy results table (one row per run: settings, metrics, its cache hash) and
the writer every results table goes through (CSV, and Parquet when pyarrow is there)."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from core.metrics import summary_keys
from experiments.capacity import SUSTAIN_KEYS
from experiments.config_keys import as_float
from experiments.spec import Run
from experiments.task_runner import run_hash

def _plain(v: Any) -> Any:
    """Swept values for the table: 'inf' strings become floats so a column stays numeric."""
    if isinstance(v, str) and math.isinf(as_float(v)):
        return math.inf
    return v


def results_table(runs: list[Run], rows: list[dict[str, Any]]) -> pd.DataFrame:
    recs = []
    metric_order: list[str] = []
    for run, row in zip(runs, rows):
        pp = sum(1 for k in row if k.startswith("bubble_ratio_stage"))
        for k in [*summary_keys(pp), *row]:
            if k not in metric_order and k not in ("wall_s", "offered_rps", *SUSTAIN_KEYS):
                metric_order.append(k)
        rec: dict[str, Any] = {"run": run.index, "series": run.series, "policy": run.policy,
                               "label": run.label}
        rec.update({f"policy_params.{k}": v for k, v in run.params.items()})
        rec.update({k: _plain(v) for k, v in run.settings.items()})
        rec["offered_rps"] = row.get("offered_rps")
        rec.update({k: row.get(k) for k in SUSTAIN_KEYS})
        rec.update(row)
        task_hash = run_hash(run.config)
        rec["trace"] = f"runs/{task_hash}" if run.artefacts else ""
        rec["hash"] = task_hash
        recs.append(rec)
    df = pd.DataFrame(recs)
    head = [c for c in df.columns if c not in metric_order and c not in ("wall_s", "trace", "hash")]
    return df[head + [c for c in metric_order if c in df.columns] + ["wall_s", "trace", "hash"]]


def write_table(df: pd.DataFrame, path_stem: Path) -> list[Path]:
    """CSV always; Parquet too when pyarrow is importable (skipped, with a note, if a column
    mixes types Parquet cannot store)."""
    paths = [path_stem.with_suffix(".csv")]
    df.to_csv(paths[0], index=False)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return paths
    try:
        df.to_parquet(path_stem.with_suffix(".parquet"), index=False)
        paths.append(path_stem.with_suffix(".parquet"))
    except Exception as e:  # pyarrow.ArrowInvalid etc.: mixed-type columns
        print(f"note: {path_stem.name}.parquet not written ({e})", file=sys.stderr)
    return paths
