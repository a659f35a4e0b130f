"""Micro-benchmark of paged decode attention variants on this CPU (one layer, one thread).

Shapes of the 32M Llama in benchmarks/runtime_cpu.py: 8 heads, 4 KV heads, head dim 64,
pages of 16 tokens, float32. Scenarios:
  equal   16 decode rows, every context the same (workload (a): 256 in, mid-decode)
  varied  32 decode rows, contexts shaped like workload (b) (lognormal prompts + part of
          a lognormal output)
Pages: each request's prompt pages consecutive (prefill allocates them at once), each
later page from a shared pool (decodes interleave), like the runtime's allocator.

    flock /tmp/pipetwin-bench.lock .venv/bin/python benchmarks/attention_micro.py

On a GPU, the kernel backend against the torch path's grouped mode (Triton compiles on
the first call, which the warm-up takes):
    python benchmarks/attention_micro.py --device cuda --dtype bfloat16 --backend triton
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HEADS, KV_HEADS, D, PAGE = 8, 4, 64, 16


def contexts(name: str, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(context of each decode row, its prompt length)."""
    from core.workloads import AZURE_CONV_OUTPUT_CV, AZURE_CONV_PROMPT_CV, LogNormal

    if name in ("equal", "equal32"):
        n = 16 if name == "equal" else 32
        return [256 + 64] * n, [256] * n
    if name.startswith("varied"):
        n = 32 if name == "varied" else int(name[6:])
        p = LogNormal(250, AZURE_CONV_PROMPT_CV, min=4, max=2000).sample(n, rng)
        o = LogNormal(100, AZURE_CONV_OUTPUT_CV, min=1, max=800).sample(n, rng)
        prompts = [int(a) for a in p]
        return [a + int(b * rng.uniform()) + 1 for a, b in zip(prompts, o)], prompts
    raise ValueError(name)


def page_lists(ctxs: list[int], prompts: list[int], num_pages: int, scattered: bool,
               rng: np.random.Generator) -> list[list[int]]:
    """Prompt pages consecutive per request (allocated at once), later pages interleaved
    across requests; or every page from a random permutation (`scattered`)."""
    if scattered:
        perm = rng.permutation(num_pages).tolist()
        out, i = [], 0
        for c in ctxs:
            need = -(-c // PAGE)
            out.append(perm[i:i + need])
            i += need
        return out
    free = iter(range(num_pages))
    out = [[next(free) for _ in range(-(-min(p, c) // PAGE))] for p, c in zip(prompts, ctxs)]
    while any(len(p) < -(-c // PAGE) for p, c in zip(out, ctxs)):
        for p, c in zip(out, ctxs):
            if len(p) < -(-c // PAGE):
                p.append(next(free))
    return out


def timeit(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="equal,equal32,varied,varied16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scattered", action="store_true", help="every page random (no consecutive runs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    ap.add_argument("--backend", default="torch",
                    help="torch (its four decode modes) | triton (vs torch grouped)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from runtime.attention import BatchMeta, paged_attention

    num_pages = 4096
    torch.manual_seed(0)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    kc = torch.randn(num_pages, PAGE, KV_HEADS, D).to(dev, dtype)
    vc = torch.randn(num_pages, PAGE, KV_HEADS, D).to(dev, dtype)
    modes = ["padded", "rows", "grouped", "auto"] if args.backend == "torch" else ["grouped", "triton"]

    def build(starts, b, pages, mode):
        if mode == "triton":
            return BatchMeta.build(starts, [1] * b, pages, [True] * b, PAGE, dev, backend="triton")
        return BatchMeta.build(starts, [1] * b, pages, [True] * b, PAGE, dev, decode_mode=mode)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    for name in args.scenarios.split(","):
        for seed in range(args.seeds if name.startswith("varied") else 1):
            rng = np.random.default_rng(seed)
            ctxs, prompts = contexts(name, rng)
            pages = page_lists(ctxs, prompts, num_pages, args.scattered, rng)
            b = len(ctxs)
            q = torch.randn(b, HEADS, D).to(dev, dtype)
            k = torch.randn(b, KV_HEADS, D).to(dev, dtype)
            v = torch.randn(b, KV_HEADS, D).to(dev, dtype)
            starts = [c - 1 for c in ctxs]
            res = {}
            ref = None
            for mode in modes:
                meta = build(starts, b, pages, mode)
                t_build = timeit(lambda: build(starts, b, pages, mode), 5)
                out = paged_attention(q, k, v, kc, vc, meta)
                if ref is None:
                    ref = out
                err = (out.float() - ref.float()).abs().max().item()

                def step():
                    paged_attention(q, k, v, kc, vc, meta)
                    sync()
                t = timeit(step, args.reps)
                desc = "kernel" if meta.kernel is not None else meta.describe_decode()
                res[mode] = (t, t_build, err, desc)
            sum_ctx, pad = sum(ctxs), b * max(ctxs)
            print(f"{name:<9} seed {seed} B={b} sum ctx {sum_ctx} max {max(ctxs)} padded {pad} "
                  f"(waste {1 - sum_ctx / pad:.0%})")
            for mode, (t, tb, err, desc) in res.items():
                print(f"   {mode:<9} {t * 1e3:7.3f} ms/layer  build {tb * 1e3:6.3f} ms  "
                      f"max|diff| {err:.1e}  {desc}")


if __name__ == "__main__":
    main()
