"""What `pipetwin profile` times: each stage's forward over the shape grid, the
activation transfer between two processes, and the scheduler's CPU time per micro-batch
(see profiles/measure/profiler.py for the conventions).
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import pickle
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core.policies import make_policy
from core.request import Request
from core.scheduler import Scheduler, SchedulerConfig
from profiles.measure.options import ProfileOptions
from profiles.measure.profile_grid import Shape, ShapeCostModel
from runtime.batch_meta import BatchMeta
from runtime.comm import free_port
from runtime.config import ModelConfig
from runtime.cuda_graphs import GraphRunner
from runtime.stage0_loop import page_list, step_meta
from runtime.weights import load_stage


# ------------------------------------------------------------------ stage timing

def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_shape(model, cache, shape: Shape, page_pool: Sequence[int], page_size: int,
               repeats: int, warmup: int, seed: int = 0,
               runner: GraphRunner | None = None) -> list[float]:
    """Seconds per forward (+ greedy sampling on the last stage), `repeats` samples.
    With `runner` (the stage's attention backend and CUDA graphs, as the engine runs
    it) the forward goes through it: a decode-only shape replays its graph."""

    device = next(model.parameters()).device
    starts, lens, samples = shape.items()
    pages, k = [], 0
    for s, n in zip(starts, lens):
        need = -(-(s + n) // page_size)
        pages.append(list(page_pool[k:k + need]))
        k += need
    if k > len(page_pool):
        raise RuntimeError(f"shape {shape.label()} needs {k} pages, the cache has {len(page_pool)}")
    if runner is None:
        meta = BatchMeta.build(starts, lens, pages, samples, page_size, device)
        forward = model
    else:
        meta = runner.build_meta(starts, lens, pages, samples)
        forward = lambda x, meta, cache: runner.forward(x, meta)  # noqa: E731
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = sum(lens)
    if model.is_first:
        x: Any = torch.randint(0, model.cfg.vocab_size, (t,), generator=g).to(device)
    else:
        h = model.cfg.hidden_size
        x = tuple(torch.randn(t, h, generator=g).to(device=device, dtype=model.dtype) for _ in range(2))

    def once() -> float:
        _sync(device)
        t0 = time.perf_counter()
        out = forward(x, meta, cache)
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


def profile_stages(opts: ProfileOptions, shapes: list[Shape], deadline: float,
                   bar: Any = None) -> tuple[list[dict], dict[int, dict], list[int]]:
    """Rows of stages.csv, per-stage counts, and weight bytes per stage.

    Each stage gets an even share of the time left. With `visits` > 1 the first
    1/visits of that share picks and times shapes (in grid order, skipping any predicted
    to overrun), the rest re-times the same shapes in the same order, and a row keeps the
    visit with the lowest median: a burst of load from another job (this is often a
    shared machine) slows every repeat of one visit, rarely two visits a minute apart."""
    # One loop over stages and visits: the budget, the cost model and the best-visit
    # bookkeeping share its state, which helpers would only pass back and forth.
    cfg = ModelConfig.from_hf(opts.hf_config)
    device = torch.device(opts.device if opts.device == "cpu" else "cuda:0")
    dtype = getattr(torch, opts.dtype)
    num_pages = max(s.pages_needed(opts.page_size) for s in shapes)
    max_decodes = max(1, max(s.decodes for s in shapes))
    max_context = max(max(s.contexts(), default=1) for s in shapes)
    rows: list[dict] = []
    counts: dict[int, dict] = {}
    weights: list[int] = []
    for stage in range(opts.pp):
        model = load_stage(None, stage, opts.pp, opts.split, "dummy", dtype, device, cfg, opts.seed)
        unique = {p.data_ptr(): p for p in model.parameters()}   # a tied head counts once
        weights.append(sum(p.numel() * p.element_size() for p in unique.values()))
        cache = model.make_kv_cache(num_pages, opts.page_size)
        runner = GraphRunner(model, cache, opts.page_size, opts.attention_backend, device,
                             enforce_eager=opts.enforce_eager or None, max_rows=max_decodes,
                             max_context=max_context)
        pool = list(range(num_pages))
        random.Random(opts.seed * 7919 + stage).shuffle(pool)

        def run(i: int, shape: Shape) -> list[float]:
            return time_shape(model, cache, shape, pool, opts.page_size, opts.repeats, opts.warmup,
                              opts.seed + i, runner)

        t0 = time.perf_counter()
        share = max(0.0, deadline - t0) / (opts.pp - stage)
        stage_deadline, pick_deadline = t0 + share, t0 + share / opts.visits
        time_shape(model, cache, shapes[0], pool, opts.page_size, 1, 2, opts.seed, runner)   # warm-up
        est = ShapeCostModel()
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
            rows.append(dict(stage=stage, num_layers=opts.split[stage], prefill_tokens=shape.prefill_tokens,
                             decode_tokens=shape.decodes, prefill_attention_work=shape.prefill_attention_work,
                             decode_context=shape.decode_context, latency_median=med,
                             latency_p10=min(_percentile(ts, 10), med),
                             latency_p90=max(_percentile(ts, 90), med), samples=len(ts)))
        visits = [n for *_, n in best]
        counts[stage] = {"measured": len(best), "skipped": skipped,
                         "revisited": sum(v > 1 for v in visits)}
        model = cache = runner = None   # free this stage (the runner holds both) before the next
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, counts, weights


def _percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q))


# ------------------------------------------------------------------ transfers

def _transfer_worker(rank: int, port: int, backend: str, tokens: Sequence[int], hidden: int,
                     dtype: str, repeats: int, rounds: int, threads: int | None, out_path: str) -> None:
    """One of two processes: rank 0 sends (hidden, residual) to rank 1, which sends them
    back; one way = round trip / 2. Per size: the lowest of `rounds` medians."""

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
                           levels: tuple[int, ...] = (16, 64, 256)) -> tuple[float, float, str]:
    """Stage 0's per-micro-batch CPU work outside the model, as `base + per_item x items`:
    the median at each of `levels` live requests, fitted by least squares over the levels'
    mean batch sizes (both terms >= 0). Most of the work is per row (the page lists, the
    scheduler's bookkeeping): a constant measured at one size undercounts big batches
    (benchmarks/host_step.py: ~80 us at 1 row, ~430 us at 256 rows, on a 2-core VM)."""
    points, notes = [], []
    for live in levels:
        t, items, tokens, n = _sched_overhead_at(opts, decisions, warm, live)
        if n:
            points.append((items, t))
            notes.append(f"{live} live: {t * 1e6:.0f} us at {items:.1f} items, {tokens:.0f} tokens")
    if not points:
        return 0.0, 0.0, "no micro-batch was formed"
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    per_item = float(np.polyfit(x, y, 1)[0]) if len(points) > 1 and np.ptp(x) > 0 else 0.0
    per_item = max(per_item, 0.0)
    base = max(float(np.mean(y - per_item * x)), 0.0)
    note = (f"base + per_item x items, least squares over medians of {decisions} micro-batches at "
            f"each of {', '.join(map(str, levels))} live requests ({'; '.join(notes)}) of "
            "Scheduler.next_batch + complete (token_throttling, prompts 128-384, outputs 50-150), the "
            f"runtime driver's step metadata{', pickled for the other stages' if opts.pp > 1 else ''}, "
            "BatchMeta.build and the token-id tensor")
    return base, per_item, note


def _sched_overhead_at(opts: ProfileOptions, decisions: int, warm: int,
                       live: int) -> tuple[float, float, float, int]:
    """Median seconds per micro-batch with `live` requests, mean items and tokens, count."""
    device = torch.device(opts.device if opts.device == "cpu" else "cuda:0")
    ps = opts.page_size
    sched = Scheduler(SchedulerConfig(opts.pp, 1_000_000, ps), make_policy("token_throttling"))
    rng = random.Random(opts.seed)
    next_id = 0

    def add(n: int) -> None:
        nonlocal next_id
        for _ in range(n):
            p = rng.randint(128, 384)
            sched.add(Request(next_id, p, rng.randint(50, 150), prompt_ids=[1] * p, pages=page_list()))
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
                m, ids = step_meta(batch, (), True, [], ps)
                if opts.pp > 1:
                    pickle.dumps(("batch", m), protocol=pickle.HIGHEST_PROTOCOL)
                BatchMeta.build(m.starts, m.lens, m.pages, m.samples, ps, device,
                                backend=opts.attention_backend)
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
        return 0.0, 0.0, 0.0, 0
    n = len(times)
    return statistics.median(times), items / n, tokens / n, n
