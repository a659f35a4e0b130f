"""Latency-table schema: a folder with meta.yaml, stages.csv and transfer.csv, and
optionally jitter.csv.

One table per (device, model, dtype, pp split). Every row of stages.csv is one
micro-batch shape on one stage; stages are measured separately because the first and
last stage carry extra work (embedding; final norm, LM head, sampling).

jitter.csv (in-situ tables, profiles/in_situ.py): how much a stage's time varies from
batch to batch at one shape. One row per measured micro-batch: `tokens` (its prefill +
decode tokens) and stage_0 .. stage_{pp-1}, each stage's time over the median time of
that shape on that stage. The simulator resamples whole rows of batches of about the
same size (SimConfig.stage_jitter), so stages that ran slow together stay together.

meta.yaml may carry `stage_turnaround_s` (in-situ tables): per stage, the seconds a
stage stays occupied after a row ends before it can start a batch that is waiting
(posting its send, taking the next batch off its inbox). Absent means 0.
"""
from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from profiles import specs

STAGE_COLUMNS = ("stage", "num_layers", "prefill_tokens", "decode_tokens",
                 "prefill_attention_work", "decode_context",
                 "latency_median", "latency_p10", "latency_p90", "samples")
TRANSFER_COLUMNS = ("bytes", "latency_median", "samples")
# Shapes are counts (tokens, token x context products, bytes): integers, which also
# keeps a lossy float_format on save from rounding them.
INT_COLUMNS = frozenset({"stage", "samples", "tokens", "prefill_tokens", "decode_tokens",
                         "prefill_attention_work", "decode_context", "bytes"})
# Layers per stage may end in .5 (a stage boundary between a layer's attention and its
# MLP); a column whose values are all whole stays int64, as in tables from before halves.
HALF_COLUMNS = frozenset({"num_layers"})
META_KEYS = ("device", "model", "dtype", "pp", "layer_split", "torch_version",
             "attention_backend", "date", "source", "sched_overhead_s",
             "kv_bytes_per_token_per_stage", "gpu_memory_bytes", "weight_bytes_per_stage")
CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "vocab_size")
JITTER_FILE = "jitter.csv"
SOURCES = frozenset({"measured", "analytical"})
TABLES_DIR = Path(__file__).resolve().parent / "tables"


class ProfileError(ValueError):
    """A latency table that cannot be trusted; the message names file, row, column."""


def _cell(label: str, i: int, col: str) -> str:
    # Line numbers count the header as line 1, so data row i (0-based) is line i + 2.
    return f"{label}, line {i + 2} (row {i + 1}), column '{col}'"


def _numeric(df: pd.DataFrame, columns: tuple[str, ...], label: str) -> pd.DataFrame:
    """Columns present, every cell a finite non-negative number (integer where needed)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ProfileError(f"{label}: missing column(s) {', '.join(map(repr, missing))}")
    out = pd.DataFrame(index=range(len(df)))
    for col in columns:
        raw = df[col].reset_index(drop=True)
        num = pd.to_numeric(raw, errors="coerce").astype(float)
        for i in num.index[~num.map(math.isfinite)]:
            what = "NaN/empty" if str(raw[i]).strip().lower() in ("", "nan") else "not a number"
            raise ProfileError(f"{_cell(label, i, col)}: {raw[i]!r} is {what}")
        for i in num.index[num < 0]:
            raise ProfileError(f"{_cell(label, i, col)}: negative value {raw[i]!r}")
        if col in INT_COLUMNS:
            for i in num.index[num != num.round()]:
                raise ProfileError(f"{_cell(label, i, col)}: {raw[i]!r} is not an integer")
            num = num.astype("int64")
        elif col in HALF_COLUMNS:
            for i in num.index[2 * num != (2 * num).round()]:
                raise ProfileError(f"{_cell(label, i, col)}: {raw[i]!r} is not a multiple of 0.5")
            if (num == num.round()).all():
                num = num.astype("int64")
        out[col] = num
    return out


def _is_half_count(v: object) -> bool:
    """A non-negative multiple of 0.5 (an int, or a float such as 4.5 or 4.0)."""
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and v >= 0 and float(2 * v).is_integer())


def _check_meta(meta: dict, label: str) -> None:
    if not isinstance(meta, dict):
        raise ProfileError(f"{label}: expected a mapping, got {type(meta).__name__}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ProfileError(f"{label}: missing key(s) {', '.join(map(repr, missing))}")
    if meta["source"] not in SOURCES:
        raise ProfileError(f"{label}: key 'source' is {meta['source']!r}, "
                           f"expected one of {sorted(SOURCES)}")
    model = meta["model"]
    if not isinstance(model, dict) or "name" not in model or not isinstance(model.get("config"), dict):
        raise ProfileError(f"{label}: key 'model' needs 'name' and a 'config' mapping")
    cfg_missing = [k for k in CONFIG_KEYS if k not in model["config"]]
    if cfg_missing:
        raise ProfileError(f"{label}: key 'model.config' lacks {', '.join(map(repr, cfg_missing))}")
    if meta["dtype"] not in specs.DTYPE_BYTES:
        raise ProfileError(f"{label}: key 'dtype' is {meta['dtype']!r}, "
                           f"expected one of {sorted(specs.DTYPE_BYTES)}")
    pp = meta["pp"]
    if not isinstance(pp, int) or pp < 1:
        raise ProfileError(f"{label}: key 'pp' must be a positive integer, got {pp!r}")
    split = meta["layer_split"]
    if (not isinstance(split, list) or len(split) != pp
            or not all(_is_half_count(v) for v in split)):
        raise ProfileError(f"{label}: key 'layer_split' must be a list of {pp} non-negative "
                           f"multiples of 0.5 (layers per stage; .5 where a boundary falls "
                           f"between a layer's attention and its MLP), got {split!r}")
    for key in ("kv_bytes_per_token_per_stage", "weight_bytes_per_stage"):
        val = meta[key]
        if (not isinstance(val, list) or len(val) != pp
                or not all(isinstance(v, int) and v >= 0 for v in val)):
            raise ProfileError(f"{label}: key {key!r} must be a list of {pp} non-negative "
                               f"integers (one per stage), got {val!r}")
    if sum(meta["layer_split"]) != model["config"]["num_hidden_layers"]:
        raise ProfileError(f"{label}: key 'layer_split' sums to {sum(meta['layer_split']):g}, "
                           f"model has {model['config']['num_hidden_layers']} layers")
    for key in ("sched_overhead_s", "gpu_memory_bytes"):
        if not isinstance(meta[key], (int, float)) or meta[key] < 0:
            raise ProfileError(f"{label}: key {key!r} must be a non-negative number")
    per_item = meta.get("sched_overhead_per_item_s", 0.0)   # optional: tables before 2026-12-05 lack it
    if isinstance(per_item, bool) or not isinstance(per_item, (int, float)) or not math.isfinite(per_item) \
            or per_item < 0:
        raise ProfileError(f"{label}: key 'sched_overhead_per_item_s' must be a non-negative number "
                           f"(seconds per micro-batch item), got {per_item!r}")
    turnaround = meta.get("stage_turnaround_s")   # optional: in-situ tables measure it
    if turnaround is not None and (
            not isinstance(turnaround, list) or len(turnaround) != pp
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                       for v in turnaround)):
        raise ProfileError(f"{label}: key 'stage_turnaround_s' must be a list of {pp} non-negative "
                           f"numbers (seconds per stage), got {turnaround!r}")


def _check_stages(df: pd.DataFrame, meta: dict, label: str) -> None:
    pp, split = meta["pp"], meta["layer_split"]
    for i, row in enumerate(df.itertuples(index=False)):
        if row.stage >= pp:
            raise ProfileError(f"{_cell(label, i, 'stage')}: stage {row.stage} outside 0..{pp - 1}")
        if row.num_layers != split[row.stage]:
            raise ProfileError(f"{_cell(label, i, 'num_layers')}: {row.num_layers:g} but "
                               f"layer_split gives stage {row.stage} {split[row.stage]:g} layers")
        if row.latency_median <= 0:
            raise ProfileError(f"{_cell(label, i, 'latency_median')}: must be positive")
        if not row.latency_p10 <= row.latency_median * (1 + 1e-9) <= row.latency_p90 * (1 + 2e-9):
            raise ProfileError(f"{_cell(label, i, 'latency_median')}: "
                               "expected latency_p10 <= latency_median <= latency_p90")
        if row.samples < 1:
            raise ProfileError(f"{_cell(label, i, 'samples')}: must be at least 1")
        # Each token attends to at least itself, so these bound the work from below;
        # a violation usually means two columns were swapped.
        if row.decode_context < row.decode_tokens:
            raise ProfileError(f"{_cell(label, i, 'decode_context')}: smaller than decode_tokens")
        if row.prefill_attention_work < row.prefill_tokens:
            raise ProfileError(f"{_cell(label, i, 'prefill_attention_work')}: "
                               "smaller than prefill_tokens")
    empty = sorted(set(range(pp)) - set(df["stage"]))
    if empty:
        raise ProfileError(f"{label}: stage(s) {empty} have no rows (pp={pp})")


def jitter_columns(pp: int) -> list[str]:
    return ["tokens", *(f"stage_{s}" for s in range(pp))]


def _check_jitter(df: pd.DataFrame, pp: int, label: str) -> pd.DataFrame:
    want = jitter_columns(pp)
    if list(df.columns) != want:
        raise ProfileError(f"{label}: columns must be exactly {want} (pp={pp}), got {list(df.columns)}")
    if df.empty:
        raise ProfileError(f"{label}: no rows (leave the file out for a table without jitter)")
    out = _numeric(df, tuple(want), label)
    for col in want:
        for i in out.index[out[col] <= 0]:
            what = "a token count must be >= 1" if col == "tokens" else "a time ratio must be positive"
            raise ProfileError(f"{_cell(label, i, col)}: {what}, got {out[col][i]!r}")
    return out


@dataclass(slots=True)
class Profile:
    meta: dict
    stages: pd.DataFrame
    transfer: pd.DataFrame
    name: str = ""
    jitter: pd.DataFrame | None = None   # see the module docstring

    def __post_init__(self) -> None:
        where = self.name or "<profile>"
        if isinstance(self.meta.get("date"), (_dt.date, _dt.datetime)):
            self.meta["date"] = self.meta["date"].isoformat()   # YAML parses bare dates
        _check_meta(self.meta, f"{where}/meta.yaml")
        self.stages = _numeric(self.stages, STAGE_COLUMNS, f"{where}/stages.csv")
        _check_stages(self.stages, self.meta, f"{where}/stages.csv")
        self.transfer = _numeric(self.transfer, TRANSFER_COLUMNS, f"{where}/transfer.csv")
        for i, lat in enumerate(self.transfer["latency_median"]):
            if lat <= 0:
                raise ProfileError(f"{_cell(where + '/transfer.csv', i, 'latency_median')}: "
                                   "must be positive")
        if self.jitter is not None:
            self.jitter = _check_jitter(self.jitter, self.pp, f"{where}/{JITTER_FILE}")

    @property
    def pp(self) -> int:
        return self.meta["pp"]

    @property
    def model_config(self) -> dict:
        return self.meta["model"]["config"]

    @property
    def dtype_bytes(self) -> int:
        return specs.DTYPE_BYTES[self.meta["dtype"]]

    def kv_pages(self, page_size: int = 16, memory_fraction: float = 0.9) -> int:
        """KV pages one page table can hold: every stage holds its own layers' KV for the
        same tokens, so the stage with the least room per token decides (min over stages).
        A stored `kv_pages_16` (e.g. the real engine's block count) wins for the defaults."""
        if page_size == 16 and memory_fraction == 0.9 and "kv_pages_16" in self.meta:
            return int(self.meta["kv_pages_16"])
        reserve = self.meta.get("activation_reserve_bytes")
        if reserve is None:
            reserve = specs.activation_reserve_bytes(self.model_config, self.dtype_bytes)
        budget = self.meta["gpu_memory_bytes"] * memory_fraction - reserve
        pages = []
        for weights, kv in zip(self.meta["weight_bytes_per_stage"],
                               self.meta["kv_bytes_per_token_per_stage"]):
            pages.append(math.floor((budget - weights) / (page_size * kv)) if kv else 10**12)
        return max(0, min(pages))


def list_tables() -> list[str]:
    return sorted(p.name for p in TABLES_DIR.iterdir() if (p / "meta.yaml").is_file()) \
        if TABLES_DIR.is_dir() else []


def resolve(path_or_name: str | Path) -> Path:
    """A folder path, or the short name of a shipped table in profiles/tables/."""
    path = Path(path_or_name)
    if path.is_dir():
        return path
    shipped = TABLES_DIR / str(path_or_name)
    if shipped.is_dir():
        return shipped
    raise ProfileError(f"{path_or_name}: no such table folder and no shipped table of that "
                       f"name (shipped: {', '.join(list_tables()) or 'none'})")


def load_profile(path_or_name: str | Path) -> Profile:
    path = resolve(path_or_name)
    for fname in ("meta.yaml", "stages.csv", "transfer.csv"):
        if not (path / fname).is_file():
            raise ProfileError(f"{path}/{fname}: file missing")
    try:
        meta = yaml.safe_load((path / "meta.yaml").read_text())
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}/meta.yaml: not valid YAML: {e}") from e
    frames = []
    for fname in ("stages.csv", "transfer.csv"):
        try:   # strings first, so a bad cell can be reported as written
            frames.append(pd.read_csv(path / fname, dtype=str, keep_default_na=False,
                                      skipinitialspace=True, skip_blank_lines=False))
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise ProfileError(f"{path}/{fname}: cannot parse CSV: {e}") from e
    jitter = None
    if (path / JITTER_FILE).is_file():
        try:
            jitter = pd.read_csv(path / JITTER_FILE, dtype=str, keep_default_na=False, skipinitialspace=True)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise ProfileError(f"{path}/{JITTER_FILE}: cannot parse CSV: {e}") from e
    return Profile(meta, frames[0], frames[1], name=str(path), jitter=jitter)


def save_profile(profile: Profile, path: str | Path, float_format: str | None = None) -> Path:
    """Write the three files (and jitter.csv if the table has one); float_format (e.g.
    '%.6g') trades precision for size."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "meta.yaml").write_text(yaml.safe_dump(profile.meta, sort_keys=False))
    profile.stages.to_csv(path / "stages.csv", index=False, float_format=float_format,
                          columns=list(STAGE_COLUMNS))
    profile.transfer.to_csv(path / "transfer.csv", index=False, float_format=float_format,
                            columns=list(TRANSFER_COLUMNS))
    if profile.jitter is not None:
        profile.jitter.to_csv(path / JITTER_FILE, index=False, float_format=float_format)
    elif (path / JITTER_FILE).exists():
        (path / JITTER_FILE).unlink()   # a stale file would be read back as this table's
    return path
