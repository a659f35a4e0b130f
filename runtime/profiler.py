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
  decodes of one shape share it: the runtime pads single-token attention to the longest
  context of the batch, so uneven contexts cost the max, not the sum;
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
import gc
import json
import math
import os
import pickle
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

# torch is imported inside functions: `pipetwin --help` and the other subcommands build
# this parser without paying for a torch import.

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
ATTENTION_BACKEND = "torch-sdpa (runtime.attention.paged_attention: page gather + F.scaled_dot_product_attention)"

# The runtime benchmarks' model (benchmarks/runtime_cpu.py): a 32M random Llama.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-32m": dict(model_type="llama", hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=1408, vocab_size=8192,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, torch_dtype="float32", hidden_act="silu"),
}


class ProfilerError(ValueError):
    """A bad argument or an impossible run; the message names the flag."""


# ------------------------------------------------------------------ the shape grid

@dataclass(frozen=True, slots=True)
class Shape:
    """One micro-batch: prefill chunks (start, tokens) and `decodes` decodes whose KV
    length after the token is `decode_ctx`."""
    prefills: tuple[tuple[int, int], ...] = ()
    decodes: int = 0
    decode_ctx: int = 0

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n in self.prefills)

    @property
    def prefill_attention_work(self) -> int:   # core.batch: chunk x context after it
        return sum(n * (s + n) for s, n in self.prefills)

    @property
    def decode_context(self) -> int:           # core.batch: sum of (start + 1)
        return self.decodes * self.decode_ctx

    def features(self) -> tuple[int, int, int, int]:
        return (self.prefill_tokens, self.decodes, self.prefill_attention_work, self.decode_context)

    def items(self) -> tuple[list[int], list[int], list[bool]]:
        """(starts, lens, samples), decodes first then chunks (the runtime's item order)."""
        starts = [self.decode_ctx - 1] * self.decodes + [s for s, _ in self.prefills]
        lens = [1] * self.decodes + [n for _, n in self.prefills]
        return starts, lens, [True] * len(lens)

    def pages_needed(self, page_size: int) -> int:
        starts, lens, _ = self.items()
        return sum(-(-(s + n) // page_size) for s, n in zip(starts, lens))

    def label(self) -> str:
        p = "+".join(f"p{n}@{s}" for s, n in self.prefills)
        d = f"d{self.decodes}x{self.decode_ctx}" if self.decodes else ""
        return "+".join(x for x in (p, d) if x)


@dataclass(frozen=True, slots=True)
class GridSpec:
    prefill_tokens: tuple[int, ...]     # chunk sizes (tokens of one prefill item)
    prefill_starts: tuple[int, ...]     # first position of a chunk (0: a fresh prompt)
    multi_chunk: tuple[tuple[int, int], ...]   # (total tokens, items) at start 0
    decode_tokens: tuple[int, ...]
    decode_contexts: tuple[int, ...]


GRIDS: dict[str, GridSpec] = {
    "default": GridSpec((16, 64, 128, 256, 512, 1024), (0, 256, 1024), ((256, 4), (1024, 4)),
                        (1, 4, 16, 32, 64), (64, 256, 1024)),
    "small": GridSpec((16, 64, 128), (0, 64), ((128, 4),), (1, 4, 8), (16, 64)),
}


def _log2p(x: float) -> float:
    return math.log2(1.0 + x)


def grid_shapes(name: str) -> list[Shape]:
    """Every shape of the grid (prefill option x decode option, minus the empty batch),
    most informative first: greedy farthest-point order in a log feature space (prefill
    tokens, decodes, chunk start, decode context, chunk count), from the cheapest shape."""
    import numpy as np

    g = GRIDS[name]
    prefill_opts: list[tuple[tuple[int, int], ...]] = [()]
    prefill_opts += [((s, n),) for n in g.prefill_tokens for s in g.prefill_starts]
    prefill_opts += [tuple((0, total // k) for _ in range(k)) for total, k in g.multi_chunk]
    decode_opts = [(0, 0)] + [(d, c) for d in g.decode_tokens for c in g.decode_contexts]
    shapes = [Shape(p, d, c) for p in prefill_opts for d, c in decode_opts if p or d]

    def feat(s: Shape) -> list[float]:
        start = statistics.mean(st for st, _ in s.prefills) if s.prefills else 0
        return [_log2p(s.prefill_tokens), _log2p(s.decodes), _log2p(start),
                _log2p(s.decode_ctx), math.log2(max(1, len(s.prefills)))]

    x = np.array([feat(s) for s in shapes])
    cost = np.array([s.prefill_attention_work + s.decode_context + 64 * (s.prefill_tokens + s.decodes)
                     for s in shapes], dtype=float)
    order = [int(np.argmin(cost))]
    dist = np.linalg.norm(x - x[order[0]], axis=1)
    dist[order[0]] = -1.0
    for _ in range(len(shapes) - 1):
        best = dist.max()
        # ties: the cheaper shape first
        i = int(min(np.flatnonzero(dist >= best - 1e-12), key=lambda j: cost[j]))
        order.append(i)
        dist = np.minimum(dist, np.linalg.norm(x - x[i], axis=1))
        dist[order] = -1.0
    return [shapes[i] for i in order]


# ------------------------------------------------------------------ options

@dataclass(slots=True)
class ProfileOptions:
    model: str                           # DIR (config.json) or dummy:<preset|config.json|inline JSON>
    pp: int = 1
    layer_split: str | Sequence[int] | None = None
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
    split: list[int] = field(default_factory=list)

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


# ------------------------------------------------------------------ stage timing

def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_shape(model, cache, shape: Shape, page_pool: Sequence[int], page_size: int,
               repeats: int, warmup: int, seed: int = 0) -> list[float]:
    """Seconds per forward (+ greedy sampling on the last stage), `repeats` samples."""
    import torch
    from runtime.attention import BatchMeta

    device = next(model.parameters()).device
    starts, lens, samples = shape.items()
    pages, k = [], 0
    for s, n in zip(starts, lens):
        need = -(-(s + n) // page_size)
        pages.append(list(page_pool[k:k + need]))
        k += need
    if k > len(page_pool):
        raise RuntimeError(f"shape {shape.label()} needs {k} pages, the cache has {len(page_pool)}")
    meta = BatchMeta.build(starts, lens, pages, samples, page_size, device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = meta.num_tokens
    if model.is_first:
        x: Any = torch.randint(0, model.cfg.vocab_size, (t,), generator=g).to(device)
    else:
        h = model.cfg.hidden_size
        x = tuple(torch.randn(t, h, generator=g).to(device=device, dtype=model.dtype) for _ in range(2))

    def once() -> float:
        _sync(device)
        t0 = time.perf_counter()
        out = model(x, meta, cache)
        if model.is_last:
            out.argmax(dim=-1).tolist()     # greedy sampling, as StageRunner.sample
        else:
            _sync(device)
        return time.perf_counter() - t0

    gc.collect()
    gc.disable()
    try:
        for _ in range(warmup):
            once()
        return [once() for _ in range(repeats)]
    finally:
        gc.enable()


class _CostModel:
    """Rough seconds-per-shape predictor from the rows measured so far (to skip shapes
    that would overrun the budget): least squares on (1, tokens, attention work)."""

    def __init__(self) -> None:
        self.x: list[list[float]] = []
        self.y: list[float] = []
        self.coef: Any = None

    def add(self, shape: Shape, seconds: float) -> None:
        self.x.append(self._row(shape))
        self.y.append(seconds)
        if len(self.y) >= 4:
            import numpy as np
            coef = np.linalg.lstsq(np.array(self.x), np.array(self.y), rcond=None)[0]
            self.coef = np.maximum(coef, 0.0)

    @staticmethod
    def _row(s: Shape) -> list[float]:
        return [1.0, float(s.prefill_tokens + s.decodes), float(s.prefill_attention_work + s.decode_context)]

    def predict(self, shape: Shape) -> float | None:
        if self.coef is None:
            return None
        return float(sum(c * v for c, v in zip(self.coef, self._row(shape))))


def profile_stages(opts: ProfileOptions, shapes: list[Shape], deadline: float,
                   bar: Any = None) -> tuple[list[dict], dict[int, dict], list[int]]:
    """Rows of stages.csv, per-stage counts, and weight bytes per stage.

    Each stage gets an even share of the time left. With `visits` > 1 the first
    1/visits of that share picks and times shapes (in grid order, skipping any predicted
    to overrun), the rest re-times the same shapes in the same order, and a row keeps the
    visit with the lowest median: a burst of load from another job (this is often a
    shared machine) slows every repeat of one visit, rarely two visits a minute apart."""
    import torch
    from runtime.config import ModelConfig
    from runtime.weights import load_stage

    cfg = ModelConfig.from_hf(opts.hf_config)
    device = torch.device(opts.device if opts.device == "cpu" else "cuda:0")
    dtype = getattr(torch, opts.dtype)
    num_pages = max(s.pages_needed(opts.page_size) for s in shapes)
    rows: list[dict] = []
    counts: dict[int, dict] = {}
    weights: list[int] = []
    for stage in range(opts.pp):
        model = load_stage(None, stage, opts.pp, opts.split, "dummy", dtype, device, cfg, opts.seed)
        unique = {p.data_ptr(): p for p in model.parameters()}   # a tied head counts once
        weights.append(sum(p.numel() * p.element_size() for p in unique.values()))
        cache = model.make_kv_cache(num_pages, opts.page_size)
        pool = list(range(num_pages))
        random.Random(opts.seed * 7919 + stage).shuffle(pool)

        def run(i: int, shape: Shape) -> list[float]:
            return time_shape(model, cache, shape, pool, opts.page_size, opts.repeats, opts.warmup,
                              opts.seed + i)

        t0 = time.perf_counter()
        share = max(0.0, deadline - t0) / (opts.pp - stage)
        stage_deadline, pick_deadline = t0 + share, t0 + share / opts.visits
        time_shape(model, cache, shapes[0], pool, opts.page_size, 1, 2, opts.seed)   # warm-up
        est = _CostModel()
        best: list[tuple[int, Shape, list[float], int]] = []   # (grid index, shape, samples, visits)
        skipped = 0
        for i, shape in enumerate(shapes):
            now = time.perf_counter()
            if len(best) >= opts.min_shapes:
                if now >= pick_deadline:
                    skipped += len(shapes) - i
                    if bar is not None:
                        bar.update(len(shapes) - i)
                    break
                guess = est.predict(shape)
                if guess is not None and now + 1.2 * guess * (opts.repeats + opts.warmup) > pick_deadline:
                    skipped += 1
                    if bar is not None:
                        bar.update(1)
                    continue
            ts = run(i, shape)
            est.add(shape, statistics.median(ts))
            best.append((i, shape, ts, 1))
            if bar is not None:
                bar.set_postfix_str(f"stage {stage} {shape.label()} {statistics.median(ts) * 1e3:.1f} ms",
                                    refresh=False)
                bar.update(1)
        for visit in range(2, opts.visits + 1):
            if bar is not None:
                bar.total += len(best)
                bar.refresh()
            for k, (i, shape, ts, n) in enumerate(best):
                guess = est.predict(shape) or 0.0
                if time.perf_counter() + guess * (opts.repeats + opts.warmup) > stage_deadline:
                    if bar is not None:
                        bar.update(1)
                    continue
                again = run(i, shape)
                if statistics.median(again) < statistics.median(ts):
                    ts = again
                best[k] = (i, shape, ts, n + 1)
                if bar is not None:
                    bar.set_postfix_str(f"stage {stage} visit {visit} {shape.label()}", refresh=False)
                    bar.update(1)
        for i, shape, ts, n in best:
            med = statistics.median(ts)
            rows.append(dict(stage=stage, num_layers=len(model.layers), prefill_tokens=shape.prefill_tokens,
                             decode_tokens=shape.decodes, prefill_attention_work=shape.prefill_attention_work,
                             decode_context=shape.decode_context, latency_median=med,
                             latency_p10=min(_percentile(ts, 10), med),
                             latency_p90=max(_percentile(ts, 90), med), samples=len(ts)))
        visits = [n for *_, n in best]
        counts[stage] = {"measured": len(best), "skipped": skipped,
                         "revisited": sum(v > 1 for v in visits)}
        model = cache = None   # free this stage before building the next
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, counts, weights


def _percentile(xs: Sequence[float], q: float) -> float:
    import numpy as np
    return float(np.percentile(np.asarray(xs, dtype=float), q))


# ------------------------------------------------------------------ transfers

def _transfer_worker(rank: int, port: int, backend: str, tokens: Sequence[int], hidden: int,
                     dtype: str, repeats: int, rounds: int, threads: int | None, out_path: str) -> None:
    """One of two processes: rank 0 sends (hidden, residual) to rank 1, which sends them
    back; one way = round trip / 2. Per size: the lowest of `rounds` medians."""
    import torch
    import torch.distributed as dist

    if threads is not None:
        torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    kw: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://", timeout=_dt.timedelta(seconds=120), **kw)
    tdtype = getattr(torch, dtype)
    peer = 1 - rank
    bufs = {t: [torch.randn(t, hidden).to(device=device, dtype=tdtype) for _ in range(2)] for t in tokens}
    medians: dict[int, list[float]] = {t: [] for t in tokens}
    try:
        # rounds over all sizes, so that one burst of load elsewhere cannot own a size
        for r in range(rounds):
            for t in tokens:
                times = []
                for i in range((3 if r == 0 else 1) + repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    if rank == 0:
                        for b in bufs[t]:
                            dist.send(b, peer)
                        for b in bufs[t]:
                            dist.recv(b, peer)
                    else:
                        for b in bufs[t]:
                            dist.recv(b, peer)
                        for b in bufs[t]:
                            dist.send(b, peer)
                    _sync(device)
                    times.append((time.perf_counter() - t0) / 2)
                medians[t].append(statistics.median(times[-repeats:]))
        if rank == 0:
            size = bufs[tokens[0]][0].element_size()
            Path(out_path).write_text(json.dumps([(t * hidden * size * 2, min(medians[t]), rounds * repeats)
                                                  for t in tokens]))
    finally:
        dist.destroy_process_group()


def measure_transfers(opts: ProfileOptions) -> tuple[list[dict], str]:
    """transfer.csv rows and a note on how they were measured (empty for pp=1)."""
    import torch
    import torch.multiprocessing as mp
    from runtime.engine import free_port

    if opts.pp == 1:
        return [], "pp=1: no stage-to-stage transfer"
    backend, note = "gloo", "gloo over loopback, CPU tensors"
    if opts.device == "cuda":
        if torch.cuda.device_count() >= 2:
            backend, note = "nccl", f"nccl between cuda:0 and cuda:1 ({torch.cuda.get_device_name(0)})"
        else:
            note = ("only one GPU visible: measured with gloo over loopback on CPU tensors, "
                    "a stand-in for the GPU link (re-measure on a multi-GPU machine)")
    hidden = opts.hf_config["hidden_size"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "transfer.json")
        mp.start_processes(_transfer_worker, nprocs=2, join=True, start_method="spawn",
                           args=(free_port(), backend, tuple(opts.transfer_tokens), hidden, opts.dtype,
                                 max(10, opts.repeats), 3, opts.threads, out))
        results = json.loads(Path(out).read_text())
    rows = [dict(bytes=b, latency_median=max(lat, 1e-9), samples=n) for b, lat, n in results]
    return rows, (f"{note}; ping-pong of hidden+residual, one way = round trip / 2; "
                  "lowest of 3 medians (rounds over all sizes)")


# ------------------------------------------------------------------ scheduling overhead

def measure_sched_overhead(opts: ProfileOptions, decisions: int = 400, warm: int = 100,
                           live: int = 64) -> tuple[float, str]:
    """Median seconds of stage 0's per-micro-batch CPU work outside the model."""
    import types

    import torch
    from core.policies import make_policy
    from core.request import Request
    from core.scheduler import Scheduler, SchedulerConfig
    from runtime.attention import BatchMeta
    from runtime.driver import Driver

    device = torch.device(opts.device if opts.device == "cpu" else "cuda:0")
    ps = opts.page_size
    sched = Scheduler(SchedulerConfig(opts.pp, 1_000_000, ps), make_policy("token_throttling"))
    driver = types.SimpleNamespace(opts=types.SimpleNamespace(page_size=ps))
    rng = random.Random(opts.seed)
    next_id = 0

    def add(n: int) -> None:
        nonlocal next_id
        for _ in range(n):
            p = rng.randint(128, 384)
            sched.add(Request(next_id, p, rng.randint(50, 150), prompt_ids=[1] * p))
            next_id += 1

    add(live)
    in_flight: list = []
    times: list[float] = []
    items = tokens = 0
    now = 0.0
    gc.collect()
    gc.disable()
    try:
        for i in range(warm + decisions):
            now += 1e-3
            t0 = time.perf_counter()
            batch = sched.next_batch(now)
            if batch is not None:
                m, ids = Driver._meta(driver, batch, (), True, [])
                if opts.pp > 1:
                    pickle.dumps(("batch", m), protocol=pickle.HIGHEST_PROTOCOL)
                BatchMeta.build(m.starts, m.lens, m.pages, m.samples, ps, device)
                torch.tensor(ids, dtype=torch.long, device=device)
                in_flight.append(batch)
            done = 0
            if in_flight and (batch is None or len(in_flight) >= opts.pp):
                b = in_flight.pop(0)
                done = len(sched.complete(b, now, [0] * b.num_samples))
            _sync(device)
            elapsed = time.perf_counter() - t0
            if i >= warm and batch is not None:
                times.append(elapsed)
                items += len(batch)
                tokens += batch.num_tokens
            add(done)
    finally:
        gc.enable()
    if not times:
        return 0.0, "no micro-batch was formed"
    n = len(times)
    note = (f"median over {n} micro-batches of Scheduler.next_batch + complete (token_throttling, "
            f"{live} live requests, prompts 128-384, outputs 50-150), the runtime driver's step metadata"
            f"{', pickled for the other stages' if opts.pp > 1 else ''}, BatchMeta.build and the "
            f"token-id tensor on {device.type}; mean batch {items / n:.1f} items, {tokens / n:.0f} tokens")
    return statistics.median(times), note


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
    kv_tok = [n * 2 * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim(cfg) * dbytes
              for n in opts.split]
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
    p.add_argument("--layer-split", help="layers per stage, e.g. 5,3 (default: even, remainder first)")
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
