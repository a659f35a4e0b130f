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
medians taken in rounds over all sizes. `sched_overhead_s` is the median
CPU time stage 0 spends per micro-batch outside the model: Scheduler.next_batch +
complete, the step metadata (the runtime driver's own code), pickling it for the other
stages, BatchMeta.build and the token-id tensor, in a steady state of ~64 live requests.

    pipetwin profile --model dummy:llama-32m --pp 2 --out profiles/tables/llama-32m_cpu-1thread_pp2
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from runtime.profile_grid import GRIDS, grid_shapes
from runtime.profile_timing import measure_sched_overhead, measure_transfers, profile_stages

# torch is imported inside functions: `pipetwin --help` and the other subcommands build
# this parser without paying for a torch import.

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
ATTENTION_BACKEND = ("torch (runtime.attention: decode rows read runs of consecutive pages in place + "
                     "length-grouped gathered tails, merged by log-sum-exp; prefill chunks by SDPA)")

# The runtime benchmarks' model (benchmarks/runtime_cpu.py): a 32M random Llama.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-32m": dict(model_type="llama", hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=1408, vocab_size=8192,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, torch_dtype="float32", hidden_act="silu"),
}


class ProfilerError(ValueError):
    """A bad argument or an impossible run; the message names the flag."""


# ------------------------------------------------------------------ options

@dataclass(slots=True)
class ProfileOptions:
    model: str                           # DIR (config.json) or dummy:<preset|config.json|inline JSON>
    pp: int = 1
    layer_split: str | Sequence[float] | None = None   # e.g. "5,3" or "4.5,3.5"
    device: str = "cpu"
    dtype: str | None = None             # None: the config's torch_dtype
    page_size: int = 16
    time_budget: float = 300.0           # seconds for the whole run
    repeats: int = 5
    warmup: int = 1
    visits: int = 2                      # times each shape is timed, far apart; lowest median kept
    grid: str = "default"
    out: str | Path | None = None        # None: profiles/tables/<auto name>
    threads: int | None = None           # None: 1 on CPU (one thread per stage process)
    kv_cache_gib: float = 1.0            # CPU stand-in for the KV memory per stage
    min_shapes: int = 12                 # per stage, measured whatever the budget
    seed: int = 0
    force: bool = False                  # overwrite an existing table folder
    progress: bool = True
    transfer_tokens: tuple[int, ...] = (1, 16, 64, 256, 1024, 4096)
    # filled by validate()
    name: str = ""
    hf_config: dict = field(default_factory=dict)
    split: list[int | float] = field(default_factory=list)   # ints, x.5 for half layers

    def validate(self) -> "ProfileOptions":
        self.name, self.hf_config = resolve_model(self.model)
        from runtime.config import ModelConfig, layer_split
        try:
            cfg = ModelConfig.from_hf(self.hf_config)
        except ValueError as e:
            raise ProfilerError(f"--model {self.model}: {e}") from None
        if not (isinstance(self.pp, int) and self.pp >= 1):
            raise ProfilerError(f"--pp must be an integer >= 1, got {self.pp!r}")
        if self.pp > cfg.num_layers:
            raise ProfilerError(f"--pp {self.pp}: the model has only {cfg.num_layers} layers")
        try:
            self.split = layer_split(cfg.num_layers, self.pp, self.layer_split)
        except ValueError as e:
            raise ProfilerError(f"--layer-split: {e}") from None
        if self.device not in DEVICES:
            raise ProfilerError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise ProfilerError("--device cuda: torch sees no CUDA device")
        if self.dtype is None:
            self.dtype = cfg.dtype if cfg.dtype in DTYPES else "float32"
        if self.dtype not in DTYPES:
            raise ProfilerError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for flag, value, low in (("--page-size", self.page_size, 1), ("--repeats", self.repeats, 1),
                                 ("--warmup", self.warmup, 0), ("--visits", self.visits, 1)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise ProfilerError(f"{flag} must be an integer >= {low}, got {value!r}")
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads >= 1):
            raise ProfilerError(f"--threads must be an integer >= 1, got {self.threads!r}")
        if not (isinstance(self.time_budget, (int, float)) and math.isfinite(self.time_budget)
                and self.time_budget > 0):
            raise ProfilerError(f"--time-budget must be a number of seconds > 0, got {self.time_budget!r}")
        if not (isinstance(self.kv_cache_gib, (int, float)) and self.kv_cache_gib > 0):
            raise ProfilerError(f"--kv-cache-gib must be > 0, got {self.kv_cache_gib!r}")
        if self.grid not in GRIDS:
            raise ProfilerError(f"--grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if self.threads is None and self.device == "cpu":
            self.threads = 1
        if self.out is None:
            from profiles.schema import TABLES_DIR
            self.out = TABLES_DIR / default_table_name(self.name, self.device, self.threads, self.pp)
        out = Path(self.out)
        if out.exists() and not self.force and (not out.is_dir() or any(out.iterdir())):
            raise ProfilerError(f"--out {out}: exists and is not empty (pass --force to overwrite)")
        return self


def resolve_model(spec: str) -> tuple[str, dict]:
    """(model name, HF config dict) from `--model`: a directory holding config.json, or
    dummy:<preset name | path to a config.json | inline JSON object>."""
    if not isinstance(spec, str) or not spec:
        raise ProfilerError("--model: give a model directory or dummy:<config.json | inline JSON>")
    if spec.startswith("dummy:"):
        body = spec[len("dummy:"):].strip()
        if body in PRESETS:
            return body, dict(PRESETS[body])
        if body.startswith("{"):
            try:
                cfg = json.loads(body)
            except json.JSONDecodeError as e:
                raise ProfilerError(f"--model dummy:<inline JSON>: not valid JSON ({e})") from None
        else:
            path = Path(body)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ProfilerError(f"--model dummy:{body}: no such config file and no preset of that "
                                    f"name (presets: {', '.join(PRESETS)})")
            try:
                cfg = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ProfilerError(f"--model {path}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ProfilerError("--model dummy:...: the config must be a JSON object")
        cfg = {"model_type": "llama", **cfg}
        return _auto_name(cfg), cfg
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ProfilerError(f"--model {spec}: no config.json there (or use dummy:<config>)")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ProfilerError(f"--model {path / 'config.json'}: not valid JSON ({e})") from None
    return path.resolve().name, cfg


def _auto_name(cfg: dict) -> str:
    try:
        from profiles.specs import layer_params
        params = (cfg["num_hidden_layers"] * layer_params(cfg)
                  + cfg["vocab_size"] * cfg["hidden_size"] * (1 if cfg.get("tie_word_embeddings") else 2))
        return f"{cfg.get('model_type', 'llama')}-{max(1, round(params / 1e6))}m"
    except (KeyError, TypeError, ZeroDivisionError):
        return f"{cfg.get('model_type', 'model')}-dummy"


def _slug(text: str) -> str:
    out = "".join(c.lower() if c.isalnum() or c in ".-" else "-" for c in text)
    return "-".join(filter(None, out.split("-")))


def default_table_name(model: str, device: str, threads: int | None, pp: int) -> str:
    if device == "cpu":
        dev = f"cpu-{threads or 1}thread"
    else:
        import torch
        dev = _slug(torch.cuda.get_device_name(0).removeprefix("NVIDIA "))
    return f"{_slug(model)}_{dev}_pp{pp}"


def cpu_name() -> str:
    name = platform.processor()
    if not name or name in ("x86_64", "aarch64", "arm64"):
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
    return name or platform.machine() or "unknown cpu"


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
    import pandas as pd
    import torch
    from profiles import Profile, ProfileError, fit, load_profile, save_profile
    from profiles.schema import STAGE_COLUMNS, TRANSFER_COLUMNS

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
        sched_s, sched_note = measure_sched_overhead(opts)
        from tqdm import tqdm
        with tqdm(total=len(shapes) * opts.pp, desc="profile", unit="shape", disable=not opts.progress,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            rows, counts, weights = profile_stages(opts, shapes, deadline, bar)
    finally:
        torch.set_num_threads(prev_threads)
    wall = time.perf_counter() - t_start
    load1 = os.getloadavg() if hasattr(os, "getloadavg") else None

    cfg = opts.hf_config
    from profiles.specs import head_dim
    dbytes = {"float32": 4, "bfloat16": 2, "float16": 2}[opts.dtype]
    from runtime.config import kv_layers
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
        "attention_backend": ATTENTION_BACKEND,
        "date": _dt.date.today().isoformat(),
        "source": "measured",
        "sched_overhead_s": float(sched_s),
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
        "tool": "runtime.profiler (pipetwin profile)",
        "command": (" ".join(["pipetwin", *sys.argv[1:]])
                    if Path(sys.argv[0]).name in ("pipetwin", "cli.py") else None),
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
        "grid_conventions": ("decodes of a row share one KV length (decode_context / decode_tokens); "
                             "every prefill item samples one LM-head row; distinct, shuffled pages"),
        "transfer": transfer_note,
        "sched_overhead": sched_note,
        "memory": memory_note,
        "load_average": {"start": list(load0) if load0 else None, "end": list(load1) if load1 else None},
        "host": platform.node() or None,
    }
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


# ------------------------------------------------------------------ command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="model directory (its config.json; weights are dummy), or dummy:<preset | "
                        f"config.json | inline JSON> (presets: {', '.join(PRESETS)})")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    p.add_argument("--layer-split", help="layers per stage, e.g. 5,3 or 4.5,3.5 (a .5 puts the boundary "
                                         "between a layer's attention and its MLP; default: even, "
                                         "remainder first)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--dtype", help=f"{' | '.join(DTYPES)} (default: the config's torch_dtype)")
    p.add_argument("--page-size", type=int, default=16, help="KV page size in tokens (default 16)")
    p.add_argument("--time-budget", type=float, default=300.0,
                   help="seconds for the whole run; shapes stop when it is spent (default 300)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per shape (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per shape before them (default 1)")
    p.add_argument("--visits", type=int, default=2,
                   help="times each shape is timed (a minute or so apart); the lowest median is kept (default 2)")
    p.add_argument("--grid", default="default", help=f"shape grid: {' | '.join(GRIDS)} (default default)")
    p.add_argument("--threads", type=int, help="torch threads (default 1 on CPU, as a runtime stage process)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0,
                   help="CPU: KV memory per stage the table's KV capacity stands for (default 1, the runtime's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="table folder (default profiles/tables/<model>_<device>_pp<N>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing table folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args: argparse.Namespace) -> int:
    opts = ProfileOptions(model=args.model, pp=args.pp, layer_split=args.layer_split, device=args.device,
                          dtype=args.dtype, page_size=args.page_size, time_budget=args.time_budget,
                          repeats=args.repeats, warmup=args.warmup, visits=args.visits, grid=args.grid,
                          out=args.out, threads=args.threads, kv_cache_gib=args.kv_cache_gib, seed=args.seed,
                          force=args.force, progress=not args.no_progress)
    res = profile(opts)
    st = res.profile.stages
    per = ", ".join(f"stage {s}: {c['measured']} shapes" + (f" ({c['skipped']} skipped)" if c["skipped"] else "")
                    for s, c in res.counts.items())
    print(f"wrote {res.path}: {len(st)} stage rows ({per}), {len(res.profile.transfer)} transfer rows, "
          f"sched overhead {res.profile.meta['sched_overhead_s'] * 1e6:.0f} us; {res.wall_s:.0f} s")
    for line in format_fit(res.error, len(res.profile.transfer) > 0):
        print(line)
    return 0
