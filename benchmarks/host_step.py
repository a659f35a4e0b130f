"""Stage 0's host work per decode step on the GPU path, timed on the CPU alone.

    python benchmarks/host_step.py [--rows 1 8 32 128 256] [--steps 300] [--mean-context 1000]
                                   [--max-context 8192] [--lists]

At pp = 1 a GPU waits while the host turns one step's sampled tokens into the next step:
`Scheduler.complete`, `Scheduler.next_batch`, the step's metadata (`step_meta`) and the
CUDA-graph metadata (`GraphRunner.build_meta`, the packed int32 array that one copy takes
to the GPU) and its copy into the pinned staging buffer. None of that needs a GPU, so it is timed here: `rows` requests decode in
every step (Token Throttling at pp = 1 takes them all), contexts drawn lognormal with
the Azure conversation prompts' CV (0.96) around `--mean-context` (the kernel
metadata's cost does not depend on whether a request's pages are consecutive).
`pickle` is what a pp > 1 stage 0 adds: the metadata pickled once for the other stages.

Prints microseconds per step for each part. Against a decode step's GPU time (the
analytical roofline, or a measured profile) the total says how much of the GPU a pp = 1
engine can keep busy: it runs the two one after the other. `--lists` keeps page ids in
Python lists, as the runtime's requests did before they became array('i') (to compare).
"""
from __future__ import annotations

import argparse
import gc
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.policies import make_policy  # noqa: E402
from core.request import Request  # noqa: E402
from core.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from profiles.measure.profile_grid import VARIED_CONTEXTS_CV  # noqa: E402
from runtime.cuda_graphs import GraphRunner  # noqa: E402
from runtime.kernel_layout import _Staging  # noqa: E402
from runtime.stage0_loop import page_list, step_meta  # noqa: E402

PARTS = ("complete", "next_batch", "step_meta", "graph_meta", "staging", "pickle")
OUTPUT = 2048       # tokens each request may decode: more than warm-up + --steps (<= 1000) take


def decoding_scheduler(rows: int, mean_context: int, max_context: int, page_size: int,
                       lists: bool, seed: int) -> Scheduler:
    """A pp = 1 scheduler whose `rows` requests are all decoding (prefilled off the clock)."""
    rng = np.random.default_rng(seed)
    sigma = np.sqrt(np.log(1 + VARIED_CONTEXTS_CV ** 2))
    ctx = rng.lognormal(np.log(mean_context) - sigma ** 2 / 2, sigma, rows)
    ctx = np.clip(ctx.astype(int), 16, max_context - 1024)     # room for the timed steps
    # every request fits with its whole output (else `add` rejects it as too long), and KV
    # use stays low, so nothing throttles or preempts
    pages = int(sum(-(-(c + OUTPUT) // page_size) for c in ctx)) * 2
    s = Scheduler(SchedulerConfig(1, pages, page_size), make_policy("token_throttling", {}))
    for i, c in enumerate(ctx):
        s.add(Request(i, int(c), OUTPUT, prompt_ids=[1] * int(c), pages=[] if lists else page_list()), 0.0)
    while s.num_ready < rows:
        b = s.next_batch(0.0)
        s.complete(b, 0.0, [7] * b.num_samples)
    return s


def measure(rows: int, steps: int, mean_context: int, max_context: int, page_size: int,
            lists: bool, seed: int = 0) -> dict[str, float]:
    s = decoding_scheduler(rows, mean_context, max_context, page_size, lists, seed)
    graphs = GraphRunner(None, None, page_size, "triton", "cpu", enforce_eager=False,
                         max_rows=256, max_context=max_context, capture=False)
    pinned = _Staging(torch.device("cpu"))   # on a GPU its buffer is pinned; the memcpy is the same
    total = dict.fromkeys(PARTS, 0.0)
    batch = s.next_batch(0.0)
    gc.collect()
    gc.disable()   # a collection inside one step would be charged to whichever part it hit
    try:
        for i in range(steps + 20):
            t0 = time.perf_counter()
            s.complete(batch, 0.0, [7] * batch.num_samples)
            t1 = time.perf_counter()
            batch = s.next_batch(0.0)
            t2 = time.perf_counter()
            m, _ids = step_meta(batch, (), True, [], page_size)
            t3 = time.perf_counter()
            step = graphs.build_meta(m.starts, m.lens, m.pages, m.samples)
            t4 = time.perf_counter()
            pinned._pinned(step.packed.host)   # the host's copy into the pinned buffer
            t5 = time.perf_counter()
            pickle.dumps(("batch", m), protocol=pickle.HIGHEST_PROTOCOL)
            t6 = time.perf_counter()
            if i >= 20:   # warm-up
                for k, dt in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                    total[k] += dt
    finally:
        gc.enable()
    if graphs.replays or graphs.eager_steps:
        raise AssertionError("timed steps must not run a model")
    out = {k: v / steps * 1e6 for k, v in total.items()}
    out["pp1_total"] = sum(out[k] for k in PARTS if k != "pickle")
    out["table_width"] = step.packed.width
    out["pages"] = sum(len(p) for p in m.pages)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--mean-context", type=int, default=1000)
    ap.add_argument("--max-context", type=int, default=8192, help="the model's positions (graph table width)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--lists", action="store_true", help="page ids in Python lists (the old representation)")
    a = ap.parse_args(argv)
    for name in ("steps", "mean_context", "page_size"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(r < 1 or r > 256 for r in a.rows):
        ap.error("--rows must be within 1..256 (the largest CUDA-graph bucket)")
    if a.steps > 1000:
        ap.error("--steps must be at most 1000 (contexts grow a token a step and start at least "
                 "1024 below --max-context, past which a step would leave the graph path)")
    if a.max_context < a.mean_context + 1024:
        ap.error("--max-context must exceed --mean-context by 1024 (room for the timed steps)")
    print(f"page ids in {'Python lists' if a.lists else 'array(i)'}; microseconds per step, mean of {a.steps}")
    print(f"{'rows':>5} {'pages':>7} {'width':>6} " + " ".join(f"{k:>10}" for k in PARTS) + f" {'pp1_total':>10}")
    for rows in a.rows:
        r = measure(rows, a.steps, a.mean_context, a.max_context, a.page_size, a.lists)
        print(f"{rows:>5} {int(r['pages']):>7} {int(r['table_width']):>6} " + " ".join(f"{r[k]:>10.0f}" for k in PARTS)
              + f" {r['pp1_total']:>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
