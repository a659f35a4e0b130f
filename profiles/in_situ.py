"""Latency tables measured in situ: from the real runtime's own trace, not a profiler.

The profiler (profiles/measure/profiler.py) times one stage at a time with the machine otherwise
idle. In a running pipeline the stages share the host (on CPU: cores, caches, memory
bandwidth, the driver and receive threads), so each stage runs slower than the profiler
saw, and more so under load. An in-situ table takes the stage rows a runtime run recorded
(`pipetwin bench`: start/end of every micro-batch on every stage, with the four
features the latency model uses) as its measurements, so the simulator is timed by what
stages cost while the pipeline runs. Calibrate on runs with other requests (another
seed) than the ones you validate on; the fit's held-out error is reported as usual.

From the same trace:
- stages.csv: one row per (batch, stage) busy interval (samples = 1).
- transfer.csv: the gap from a stage's end to the next stage's start of the same batch,
  where that next stage was idle (else the gap is queueing, not transfer), binned by
  activation bytes, the mean of each bin; token return to stage 0 is timed by the same
  link model. The mean, not the median: the simulator charges one time per hop and a
  pipeline pays the sum of its hops. With three stage processes on two cores a hop waits
  for a core now and then (idle-receiver hops: median 0.50 ms, mean 1.23 ms, p90 3.4 ms),
  and the median made the pp 3 twin optimistic by 6% in throughput and 12% in TPOT
  (docs/benchmarks.md, "The cap on the CPU twin at pp 3").
- jitter.csv: each stage's time over the median of its shape's repeats, per micro-batch
  (see jitter_rows): the batch-to-batch variation the fit averages away. On the 2-core
  CPU a decode batch of one shape varies by ~10% (log std), and stages of one batch vary
  together (correlation ~0.3); in a pipeline that variation is itself a cause of
  bubbles, which a simulator timed by the fit alone underestimates.
- sched_overhead_s = sched_overhead_per_item_s = 0: the runtime's stage-0 rows already
  include the scheduler's decision and the step metadata (runtime.driver.Driver records
  them that way).
- stage_turnaround_s: per stage, how long after a row ends the stage starts its next
  batch when that batch was already waiting (see stage_turnaround): the stage's thread
  posts its send and takes the next batch off its inbox outside its busy rows, ~0.27 ms
  per batch on the 2-core CPU, which a stage that is the bottleneck pays every batch.
The base table supplies everything else (model config, memory, KV pages).
"""
from __future__ import annotations

import copy
import datetime as _dt
from typing import Sequence

import numpy as np
import pandas as pd

from profiles.schema import STAGE_COLUMNS, TRANSFER_COLUMNS, Profile, ProfileError, jitter_columns

FEATURES = ("prefill_tokens", "decode_tokens", "prefill_attention_work", "decode_context")
NEEDED = ("batch_id", "stage", "start", "end", *FEATURES)


def stage_rows(batches: pd.DataFrame, layer_split: Sequence[float]) -> pd.DataFrame:
    missing = [c for c in NEEDED if c not in batches.columns]
    if missing:
        raise ProfileError(f"runtime trace batches lack column(s) {missing}; in-situ tables need a "
                           "runtime trace (pipetwin bench) that records the attention features")
    b = batches.dropna(subset=list(NEEDED))
    lat = (b["end"] - b["start"]).to_numpy(float)
    keep = lat > 0
    b, lat = b[keep], lat[keep]
    out = pd.DataFrame({
        "stage": b["stage"].astype("int64").to_numpy(),
        "num_layers": [layer_split[s] for s in b["stage"].astype(int)],   # 4.5: half-layer splits
        **{f: b[f].astype("int64").to_numpy() for f in FEATURES},
        "latency_median": lat, "latency_p10": lat, "latency_p90": lat, "samples": 1})
    # one token attends at least to itself: rows violating that are malformed, not shapes
    out = out[(out["decode_context"] >= out["decode_tokens"])
              & (out["prefill_attention_work"] >= out["prefill_tokens"])]
    return out[list(STAGE_COLUMNS)].reset_index(drop=True)


def link_gaps(batches: pd.DataFrame, bytes_per_token: int) -> pd.DataFrame:
    """(bytes, seconds) of every stage-to-stage hop whose receiving stage was idle."""
    out = []
    stages = sorted(int(s) for s in batches["stage"].unique())
    by = {s: batches[batches["stage"] == s].set_index("batch_id").sort_values("start") for s in stages}
    for s in stages[:-1]:
        a, b = by[s], by[s + 1]
        prev_end = b["end"].shift(1)
        common = a.index.intersection(b.index)
        gap = b.loc[common, "start"] - a.loc[common, "end"]
        idle = prev_end.reindex(common).fillna(-np.inf) <= a.loc[common, "end"]
        tokens = a.loc[common, "prefill_tokens"] + a.loc[common, "decode_tokens"]
        ok = idle & (gap > 0)
        out.append(pd.DataFrame({"bytes": tokens[ok].to_numpy() * bytes_per_token,
                                 "seconds": gap[ok].to_numpy(float)}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=["bytes", "seconds"])


def transfer_rows(gaps: pd.DataFrame, bins: int = 8) -> pd.DataFrame:
    """Mean gap per activation-size bin (quantile bins, so each holds data); the table's
    column keeps its name, latency_median, which measured tables fill with medians."""
    if gaps.empty:
        return pd.DataFrame(columns=list(TRANSFER_COLUMNS))
    edges = np.unique(np.quantile(gaps["bytes"], np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, gaps["bytes"], side="right") - 1, 0, max(0, len(edges) - 2))
    rows = []
    for k in np.unique(which):
        g = gaps[which == k]
        rows.append({"bytes": int(np.median(g["bytes"])), "latency_median": float(np.mean(g["seconds"])),
                     "samples": len(g)})
    return pd.DataFrame(rows, columns=list(TRANSFER_COLUMNS)).drop_duplicates("bytes")


def stage_turnaround(batches: Sequence[pd.DataFrame], pp: int, ready_margin: float) -> list[float]:
    """Per stage, the mean gap between a row's end and the stage's next start, over the
    next batches that were already waiting: their previous stage had finished them more
    than `ready_margin` seconds (a hop and then some) before. Stage 0 has no previous
    stage to tell waiting from arriving; its rows begin with the scheduler's decision,
    taken when a token return arrives, which the link model times, so it gets 0."""
    gaps: list[list[np.ndarray]] = [[] for _ in range(pp)]
    for b in batches:
        b = b.dropna(subset=["batch_id", "stage", "start", "end"])
        for s in range(1, pp):
            ready = b[b["stage"] == s - 1].set_index("batch_id")["end"]
            rows = b[b["stage"] == s].sort_values("start")
            prev_end = np.r_[-np.inf, rows["end"].to_numpy(float)[:-1]]
            waiting = ready.reindex(rows["batch_id"]).to_numpy(float) + ready_margin < prev_end
            gaps[s].append((rows["start"].to_numpy(float) - prev_end)[waiting])
    out = [0.0]
    for s in range(1, pp):
        g = np.concatenate(gaps[s]) if gaps[s] else np.empty(0)
        out.append(float(max(0.0, g.mean())) if len(g) else 0.0)
    return out


# A shape's median needs a few repeats to be a median; context and attention work vary
# continuously, so they are grouped in quarter-octave bins (±9%, about the noise itself).
JITTER_MIN_REPEATS = 5
_BINS_PER_OCTAVE = 4


def jitter_rows(batches: Sequence[pd.DataFrame], pp: int,
                min_repeats: int = JITTER_MIN_REPEATS) -> pd.DataFrame:
    """Per micro-batch of the runs `batches` (batch ids restart per run): every stage's
    time over the median time of its shape (stage, prefill and decode tokens, binned
    attention work and decode context) across all the runs. Only micro-batches whose
    every stage shape repeats at least `min_repeats` times are kept."""
    frames = []
    for run, b in enumerate(batches):
        b = b.dropna(subset=list(NEEDED))
        frames.append(b.assign(run=run, dur=(b["end"] - b["start"]).astype(float)))
    if not frames:
        return pd.DataFrame(columns=jitter_columns(pp))
    b = pd.concat(frames, ignore_index=True)
    b = b[b["dur"] > 0]
    shape = [b["stage"], b["prefill_tokens"], b["decode_tokens"]]
    for col in ("prefill_attention_work", "decode_context"):
        shape.append(np.round(np.log2(b[col].astype(float).clip(lower=1)) * _BINS_PER_OCTAVE))
    groups = b.groupby(shape)["dur"]
    b = b.assign(ratio=b["dur"] / groups.transform("median"), repeats=groups.transform("size"),
                 tokens=b["prefill_tokens"] + b["decode_tokens"])
    ratio = b.pivot_table(index=["run", "batch_id"], columns="stage", values="ratio")
    repeats = b.pivot_table(index=["run", "batch_id"], columns="stage", values="repeats")
    if list(ratio.columns) != list(range(pp)):
        return pd.DataFrame(columns=jitter_columns(pp))
    keep = (repeats >= min_repeats).all(axis=1) & ratio.notna().all(axis=1)
    tokens = b[b["stage"] == 0].set_index(["run", "batch_id"])["tokens"]
    out = ratio[keep]
    out.insert(0, "tokens", tokens.reindex(out.index).astype("int64"))
    out = out.reset_index(drop=True)
    out.columns = jitter_columns(pp)
    return out


def in_situ_profile(base: Profile, batches: Sequence[pd.DataFrame], sources: Sequence[str] = ()) -> Profile:
    """A table with `base`'s meta and the stage/transfer timings of runtime `batches`."""
    if not batches:
        raise ProfileError("in-situ table: no runtime traces given")
    every = pd.concat(list(batches), ignore_index=True)
    split = base.meta["layer_split"]
    stages = stage_rows(every, split)
    per_token = base.model_config["hidden_size"] * base.dtype_bytes * 2   # hidden + residual
    gaps = pd.concat([link_gaps(b, per_token) for b in batches], ignore_index=True)
    transfer = transfer_rows(gaps) if not gaps.empty else base.transfer
    jitter = jitter_rows(batches, base.pp)
    # "already waiting" = finished upstream over two of the slowest measured hops ago
    ready_margin = 2 * float(transfer["latency_median"].max()) if len(transfer) else 0.0
    turnaround = stage_turnaround(batches, base.pp, ready_margin)
    meta = copy.deepcopy(base.meta)
    meta["date"] = _dt.date.today().isoformat()
    meta["sched_overhead_s"] = 0.0
    meta["sched_overhead_per_item_s"] = 0.0
    meta["stage_turnaround_s"] = turnaround
    meta["measurement"] = {
        "tool": "profiles.in_situ (runtime trace stage rows)",
        "base_table": base.name,
        "traces": list(sources),
        "stage_rows": int(len(stages)),
        "transfer_hops": int(len(gaps)),
        "stage_timing": "each (micro-batch, stage) busy interval of the real pipeline; stage 0's "
                        "include the scheduler decision and step metadata, so sched_overhead_s = 0",
        "transfer": "gap from a stage's end to the next stage's start of the same micro-batch, "
                    "when that stage was idle; mean per activation-size bin (in latency_median)",
        "stage_turnaround": ("mean gap from a stage's row end to its next start, over next batches "
                             f"finished upstream > {ready_margin * 1e3:.2f} ms before (already waiting); "
                             "stage 0: 0, its rows begin with the scheduler's decision"),
        "jitter": (f"{len(jitter)} micro-batches whose every stage shape repeated >= {JITTER_MIN_REPEATS} "
                   "times: each stage's time over its shape's median"),
        "base_measurement": base.meta.get("measurement"),
    }
    return Profile(meta, stages, transfer, name=f"{base.name}+in-situ",
                   jitter=jitter if len(jitter) else None)
