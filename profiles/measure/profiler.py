"""`pipetwin profile`: measure a latency table (profiles/ schema) on this machine.

Every stage of the split is built in this process, one after another (only one stage's
weights and KV cache are resident at a time), and its forward is timed over a grid of
micro-batch shapes: prefill chunks (starting at 0 or at a nonzero start, one chunk or
several), decodes at a few KV lengths, and mixes of both, since the scheduler makes
mixed batches. What a row times is what a stage's busy interval is in the runtime:
`StageModel.forward` on prepared metadata (stages build `BatchMeta` before their
activations arrive); on the last stage it includes the final norm, the LM head over the
sampling rows and greedy sampling (`argmax().tolist()`, as `StageRunner.sample` does);
on GPU it ends at `torch.cuda.synchronize`.

Conventions of the grid:
- a decode row's context is its KV length after the token (`start + 1`), and all the
  decodes of one shape share it (decode attention costs about the sum of the contexts,
  runtime/attention.py, as the latency model's `decode_context` feature assumes);
- every prefill item samples (as the last chunk of its prompt would): one LM-head row per
  prefill item, the conservative choice for the last stage;
- page ids come from a seeded permutation of the cache (fragmented, like a live page
  table) and no two items share a page;
- inputs are random: token ids on stage 0, (hidden, residual) ~ N(0, 1) elsewhere.
  Weights are dummy (seeded random); timings do not depend on weight values.

Shapes are ordered most-informative-first (farthest-point order in log feature space,
starting from the one-decode floor), so when the time budget runs out the table still
spans the grid; a shape predicted to overrun the budget is skipped for cheaper ones.
Each shape is timed on `visits` separate visits (default 2, about a minute apart: the
second half of a stage's time re-times the shapes the first half picked) and the visit
with the lowest median is kept, because on a shared machine a burst of load elsewhere
slows every repeat of one visit (measured here: re-timing a table's shapes moved them by
~9% on average, a few by 2x).
The transfer table times a ping-pong of (hidden, residual) between two processes (gloo on
CPU, nccl across two GPUs), one way = round trip / 2, the lowest of three per-size
medians taken in rounds over all sizes. `sched_overhead_s` + `sched_overhead_per_item_s`
x items is the CPU time stage 0 spends per micro-batch outside the model:
Scheduler.next_batch + complete, the step metadata (the runtime driver's own code),
pickling it for the other stages, BatchMeta.build and the token-id tensor; medians in
steady states of 16, 64 and 256 live requests, fitted as a line in the batch's items.

Options and flags: profiles.measure.options; the timing: profiles.measure.profile_timing.

    pipetwin profile --model dummy:llama-32m --pp 2 --out profiles/tables/llama-32m_cpu-1thread_pp2
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from profiles import Profile, ProfileError, fit, load_profile, save_profile
from profiles.measure.options import ProfileOptions, cpu_name
from profiles.measure.profile_grid import GRIDS, grid_shapes
from profiles.measure.profile_timing import measure_sched_overhead, measure_transfers, profile_stages
from profiles.schema import STAGE_COLUMNS, TRANSFER_COLUMNS
from profiles.specs import head_dim
from runtime.config import kv_layers
from runtime.telemetry import Sampler, Telemetry

ATTENTION_BACKENDS = {
    "torch": ("torch (runtime.attention: decode rows read runs of consecutive pages in place + "
              "length-grouped gathered tails, merged by log-sum-exp; prefill chunks by SDPA)"),
    "triton": ("triton (runtime.triton_attention: one launch for the decode rows, split flash-decoding "
               "style, one for the prefill chunks; decode-only steps replay CUDA graphs unless enforce_eager)"),
    "flashinfer": "flashinfer (BatchPrefillWithPagedKVCacheWrapper, planned per micro-batch)",
}


# ------------------------------------------------------------------ the whole run

@dataclass(slots=True)
class ProfileResult:
    path: Path
    profile: Any              # profiles.Profile
    error: Any                # profiles.FitError, or the reason it could not be fitted (str)
    wall_s: float
    counts: dict[int, dict]


def profile(opts: ProfileOptions) -> ProfileResult:
    """Measure and write the table at opts.out; returns it loaded and fitted."""
    # Long on purpose: the measurement, then every field of meta.yaml in the order a reader
    # of the table looks for it (what ran, on what, how it was timed), in one place.
    opts.validate()
    t_start = time.perf_counter()
    deadline = t_start + opts.time_budget
    prev_threads = torch.get_num_threads()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    try:
        torch.manual_seed(opts.seed)
        shapes = grid_shapes(opts.grid)
        transfer_rows, transfer_note = measure_transfers(opts)
        sched_s, sched_per_item_s, sched_note = measure_sched_overhead(opts)
        # GPU telemetry (NVML) while the stages are timed; absent on CPU
        telemetry = Telemetry(cuda_indices=[0]) if opts.device == "cuda" else None
        sampler = Sampler(telemetry) if telemetry is not None else None
        with tqdm(total=len(shapes) * opts.pp, desc="profile", unit="shape", disable=not opts.progress,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            if sampler is not None:
                sampler.start()
            try:
                rows, counts, weights = profile_stages(opts, shapes, deadline, bar)
            finally:
                if sampler is not None:
                    sampler.stop()
                    telemetry.close()
    finally:
        torch.set_num_threads(prev_threads)
    wall = time.perf_counter() - t_start
    load1 = os.getloadavg() if hasattr(os, "getloadavg") else None

    cfg = opts.hf_config
    dbytes = {"float32": 4, "bfloat16": 2, "float16": 2}[opts.dtype]
    # KV per stage counts the layers whose attention it holds, not its split entry (4.5)
    kv_tok = [kv_layers(opts.split, s) * 2 * cfg.get("num_key_value_heads", cfg["num_attention_heads"])
              * head_dim(cfg) * dbytes for s in range(opts.pp)]
    meta: dict[str, Any] = {
        "device": (f"cpu: {cpu_name()}, {opts.threads} thread{'s' if opts.threads != 1 else ''}"
                   if opts.device == "cpu" else f"cuda: {torch.cuda.get_device_name(0)}"),
        "model": {"name": opts.name, "config": cfg},
        "dtype": opts.dtype,
        "pp": opts.pp,
        "layer_split": list(opts.split),
        "torch_version": str(torch.__version__),
        "attention_backend": ATTENTION_BACKENDS[opts.attention_backend],
        "cuda_graphs": opts.device == "cuda" and opts.attention_backend == "triton" and not opts.enforce_eager,
        "date": _dt.date.today().isoformat(),
        "source": "measured",
        "sched_overhead_s": float(sched_s),
        "sched_overhead_per_item_s": float(sched_per_item_s),
        "kv_bytes_per_token_per_stage": kv_tok,
        "weight_bytes_per_stage": weights,
    }
    if opts.device == "cpu":
        # No GPU memory: stand in with what the runtime gives the KV cache on CPU
        # (1 GiB per stage by default, EngineConfig.kv_cache_gib), so that kv_pages()
        # leaves exactly that for KV on the stage with the most weights.
        kv_mem = int(opts.kv_cache_gib * 2**30)
        meta["gpu_memory_bytes"] = int(math.ceil((kv_mem + max(weights)) / 0.9))
        meta["activation_reserve_bytes"] = 0
        meta["kv_pages_16"] = min(kv_mem // (16 * k) for k in kv_tok)
        memory_note = (f"CPU stand-in: gpu_memory_bytes = (KV memory {opts.kv_cache_gib:g} GiB per stage, "
                       f"the runtime's CPU default, + largest stage weights) / 0.9 with no activation "
                       f"reserve; kv_pages_16 = pages of 16 tokens in {opts.kv_cache_gib:g} GiB on the "
                       f"stage with the most KV per token (what the engine allocates)")
    else:
        props = torch.cuda.get_device_properties(0)
        meta["gpu_memory_bytes"] = int(props.total_memory)
        memory_note = "total memory of cuda:0 as torch reports it; kv_pages() reserves activations as specs does"
    meta["measurement"] = {
        "tool": "profiles.measure.profiler (pipetwin profile)",
        "command": (" ".join(["pipetwin", *sys.argv[1:]])
                    if Path(sys.argv[0]).name in ("pipetwin", "__main__.py", "main.py") else None),
        "weights": "dummy (seeded random); timing does not depend on weight values",
        "grid": opts.grid,
        "repeats": opts.repeats,
        "warmup": opts.warmup,
        "visits": opts.visits,
        "threads": opts.threads if opts.device == "cpu" else None,
        "page_size": opts.page_size,
        "time_budget_s": float(opts.time_budget),
        "wall_s": round(wall, 1),
        "shapes_in_grid": len(shapes),
        "shapes_per_stage": {int(s): c for s, c in counts.items()},
        "stage_timing": ("StageModel.forward on prebuilt BatchMeta (+ argmax().tolist() on the last stage), "
                         "time.perf_counter" + (", torch.cuda.synchronize" if opts.device == "cuda" else "")
                         + "; median / p10 / p90 of the repeats of the visit with the lowest median"),
        "grid_conventions": ("a row's decodes have varied KV lengths (lognormal, CV "
                             f"{GRIDS[opts.grid].decode_spread:g}, summing to decode_context); "
                             "every prefill item samples one LM-head row; distinct, shuffled pages"),
        "transfer": transfer_note,
        "sched_overhead": sched_note,
        "memory": memory_note,
        "load_average": {"start": list(load0) if load0 else None, "end": list(load1) if load1 else None},
        "host": platform.node() or None,
    }
    if sampler is not None and sampler.summary():
        meta["telemetry"] = sampler.summary()
    if meta["measurement"]["command"] is None:
        del meta["measurement"]["command"]
    stages_df = pd.DataFrame(rows, columns=list(STAGE_COLUMNS))
    transfer_df = pd.DataFrame(transfer_rows, columns=list(TRANSFER_COLUMNS))
    prof = Profile(meta, stages_df, transfer_df, name=str(opts.out))
    path = save_profile(prof, opts.out, float_format="%.6g")
    prof = load_profile(path)
    try:
        _model, err = fit(prof)
    except ProfileError as e:
        err = str(e)
    return ProfileResult(path, prof, err, wall, counts)


def format_fit(err: Any, has_transfer: bool = True) -> list[str]:
    if isinstance(err, str):
        return [f"latency model: not fitted ({err})"]
    lines = [f"latency model fit ({'held-out' if err.held_out else 'in-sample'} rows): "
             f"mean APE {err.mape:.2%}, worst {err.max_ape:.2%} over {err.rows_evaluated} rows"]
    for s, (m, w) in enumerate(zip(err.stage_mape, err.stage_max_ape)):
        lines.append(f"  stage {s}: mean {m:.2%}, worst {w:.2%}")
    lines.append(f"  transfer (in-sample): {err.transfer_mape_in_sample:.2%}" if has_transfer
                 else "  transfer: none (pp=1)")
    return lines


def run_cli(args: argparse.Namespace) -> int:
    opts = ProfileOptions(model=args.model, pp=args.pp, layer_split=args.layer_split, device=args.device,
                          dtype=args.dtype, page_size=args.page_size, time_budget=args.time_budget,
                          repeats=args.repeats, warmup=args.warmup, visits=args.visits, grid=args.grid,
                          out=args.out, threads=args.threads, kv_cache_gib=args.kv_cache_gib, seed=args.seed,
                          force=args.force, progress=not args.no_progress,
                          attention_backend=args.attention_backend, enforce_eager=args.enforce_eager)
    res = profile(opts)
    st = res.profile.stages
    per = ", ".join(f"stage {s}: {c['measured']} shapes" + (f" ({c['skipped']} skipped)" if c["skipped"] else "")
                    for s, c in res.counts.items())
    print(f"wrote {res.path}: {len(st)} stage rows ({per}), {len(res.profile.transfer)} transfer rows, "
          f"sched overhead {res.profile.meta['sched_overhead_s'] * 1e6:.0f} us + "
          f"{res.profile.meta['sched_overhead_per_item_s'] * 1e6:.2f} us per item; {res.wall_s:.0f} s")
    for line in format_fit(res.error, len(res.profile.transfer) > 0):
        print(line)
    return 0
