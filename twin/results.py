"""A results folder, as `pipetwin sim`, `bench`, `bench serve` and `validate` write it:
trace tables, perfetto.json, summary.json (non-finite values as null), config.yaml."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import yaml

from core.table_io import finite, json_default
from core.trace import Trace


def write_results(out: str | Path, trace: Trace, summary: dict[str, Any], config: dict[str, Any],
                  formats: Sequence[str] = ("csv",)) -> Path:
    """The `pipetwin sim` results folder: trace tables, perfetto.json, summary.json, config.yaml."""
    out = Path(out)
    trace.save(out, formats=formats)
    trace.to_perfetto(out / "perfetto.json")
    (out / "summary.json").write_text(json.dumps(finite(summary), indent=2, default=json_default) + "\n")
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out
