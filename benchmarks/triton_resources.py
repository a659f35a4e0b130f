"""Compile the paged-attention Triton kernels for real GPUs, here, without one: registers,
spills and shared memory per launch configuration, from ptxas itself.

    python benchmarks/triton_resources.py [--archs 90,80] [--cases llama3-8b,tiny] [--dtypes bfloat16]
        [--warps 4] [--json]

Triton's NVIDIA backend compiles to a cubin with no driver or GPU (its wheel carries
ptxas and cuobjdump), so this checks on CPU what the interpreter cannot: that every
launch `runtime.triton_attention.attend` makes compiles for sm_90 (H100/H200) and sm_80
(A100), that its shared memory fits the part, and whether registers spill to local
memory ("stack" bytes a thread: a spilling attention kernel is slow), and whether the K/V
loads are pipelined ("async": cp.async copies in the compiled IR). The constants and
warps are the very ones `attend` launches with (`kernel_constants`, `num_warps`), and the
compile gets the alignment specialization a launch on aligned tensors gets (`_aligned`).
tests/test_triton_compile.py runs it on the shipped models' shapes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# The kernels must be compiled, not interpreted: drop the interpreter before triton loads.
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# heads, kv heads, head_dim of the shapes the runtime serves (profiles/ and the tests)
MODELS = {
    "llama3-8b": (32, 8, 128),     # benchmarks/gpu_check.py's stage
    "llama3-70b": (64, 8, 128),
    "qwen2.5-32b": (40, 8, 128),   # also qwen2.5-14b; GQA 5:1 pads to 8 rows
    "mha-d64": (16, 16, 64),
    "d256": (8, 4, 256),
    "tiny": (4, 2, 16),            # the tests' and gpu_check's equality models
    "head-dim-8": (4, 2, 8),
}
# (name, per_seq, splits, query tokens per block): what KernelMeta launches
LAUNCHES = [("decode", True, 1, 1), ("decode-split16", True, 16, 1), ("prefill", False, 1, 16)]
# most shared memory one program may use (bytes, opt-in), per compute capability
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _tool(name: str) -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: this triton wheel has no NVIDIA backend binaries")
    return str(path)


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of a cubin's kernel, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{out}")
    return int(m.group(1)), int(m.group(2))


def _signature(kernel, pointer_types: dict[str, str], const: dict) -> dict[str, str]:
    return {n: pointer_types.get(n) or ("constexpr" if n in const else "fp32" if n == "scale_log2"
                                        else "*i32" if n.endswith("_ptr") else "i32")
            for n in kernel.arg_names}


def _aligned(kernel, sig: dict[str, str], ints: dict[str, int]) -> dict:
    """The specialization a launch on a GPU compiles with: Triton marks each pointer that is
    16-byte aligned (torch's allocations and these views are) and each int divisible by 16
    (`ints`: the values the runtime passes) `tt.divisibility=16`. Without it the compiler
    cannot prove aligned vector loads, so the offline build would differ from the real one."""
    names = kernel.arg_names
    return {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
            if t.startswith("*") or (t == "i32" and ints.get(n, 1) % 16 == 0)}


def _compile(kernel, sig: dict[str, str], const: dict, arch: int, warps: int | None,
             ints: dict[str, int] | None = None) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    options = {} if warps is None else {"num_warps": warps}
    try:
        k = triton.compile(ASTSource(kernel, sig, const, _aligned(kernel, sig, ints or {})),
                           target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # noqa: BLE001 - the report names every failure
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"}
    regs, stack = _resources(k.asm["cubin"])
    ir = k.asm["ttgir"]
    return {"regs": regs, "stack": stack, "shared": int(k.metadata.shared), "warps": int(k.metadata.num_warps),
            "shared_limit": SHARED_LIMIT.get(arch), "async_copies": ir.count("async_copy_global_to_local")}


def _attention_ints(heads: int, kv_heads: int, head_dim: int, page_size: int) -> dict[str, int]:
    """The int arguments `attend` passes for a contiguous q/out [T, heads, d] and caches
    [pages, page_size, kv_heads, d] (page tables are >= 16 pages wide but for tiny runs)."""
    kv = page_size * kv_heads * head_dim
    return {"stride_qt": heads * head_dim, "stride_qh": head_dim, "stride_kp": kv, "stride_ks": kv_heads * head_dim,
            "stride_kh": head_dim, "stride_vp": kv, "stride_vs": kv_heads * head_dim, "stride_vh": head_dim,
            "stride_ot": heads * head_dim, "stride_oh": head_dim, "stride_table": 16, "num_heads": heads}


def attention_case(model: str, launch: str, arch: int, dtype: str = "bfloat16", page_size: int = 16,
                   warps: int | None = None) -> dict:
    """One launch of the attention kernel; `warps` replaces attend's choice (to compare)."""
    from runtime import triton_attention as ta
    heads, kv_heads, head_dim = MODELS[model]
    _, per_seq, splits, block_q = next(x for x in LAUNCHES if x[0] == launch)
    upcast = dtype == "float32"
    const = ta.kernel_constants(heads, kv_heads, head_dim, page_size, block_q, 64, splits, per_seq,
                                upcast=upcast, interpret=False)
    t = "*" + DTYPES[dtype]
    sig = _signature(ta._paged_attn_kernel, {"q_ptr": t, "k_ptr": t, "v_ptr": t, "out_ptr": t,
                                             "part_ptr": "*fp32", "lse_ptr": "*fp32"}, const)
    row = {"kernel": "attention", "model": model, "launch": launch, "arch": arch, "dtype": dtype,
           "head_dim": head_dim, "block_m": const["BLOCK_M"], "block_n": const["BLOCK_N"]}
    row.update(_compile(ta._paged_attn_kernel, sig, const, arch, warps or ta.num_warps(const),
                        _attention_ints(heads, kv_heads, head_dim, page_size)))
    return row


def helper_cases(arch: int, dtype: str = "bfloat16") -> list[dict]:
    """The split-merge and K/V store kernels at Llama-3-8B's shapes."""
    from runtime import triton_attention as ta
    t = "*" + DTYPES[dtype]
    rows = []
    const = {"HEAD_DIM": 128, "BLOCK_D": 128, "NUM_SPLITS": 16}
    sig = _signature(ta._reduce_kernel, {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": t}, const)
    rows.append({"kernel": "reduce", "model": "llama3-8b", "launch": "decode-split16", "arch": arch,
                 "dtype": dtype, **_compile(ta._reduce_kernel, sig, const, arch, None,
                                            {"stride_ot": 4096, "stride_oh": 128, "num_heads": 32})})
    const = {"WIDTH": 8 * 128, "BLOCK": 1024}
    sig = _signature(ta._store_kv_kernel, {"k_ptr": t, "v_ptr": t, "k_cache_ptr": t, "v_cache_ptr": t}, const)
    rows.append({"kernel": "store_kv", "model": "llama3-8b", "launch": "any", "arch": arch, "dtype": dtype,
                 **_compile(ta._store_kv_kernel, sig, const, arch, None,
                            {"stride_kt": 1024, "stride_vt": 1024, "stride_ck": 1024, "stride_cv": 1024})})
    return rows


def report(archs: list[int], models: list[str], dtypes: list[str], warps: int | None = None) -> list[dict]:
    rows = []
    for arch in archs:
        for dtype in dtypes:
            for model in models:
                for launch, *_ in LAUNCHES:
                    rows.append(attention_case(model, launch, arch, dtype, warps=warps))
            if warps is None:
                rows += helper_cases(arch, dtype)
    return rows


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", type=_csv(int), default=[90, 80], help="compute capabilities: 80 (A100), 86, 89, 90 (H100/H200)")
    ap.add_argument("--cases", type=_csv(str), default=list(MODELS), help=f"models: {','.join(MODELS)}")
    ap.add_argument("--dtypes", type=_csv(str), default=["bfloat16"], help=f"any of {','.join(DTYPES)}")
    ap.add_argument("--warps", type=int, choices=[1, 2, 4, 8, 16],
                    help="attention kernel warps instead of attend's choice (to compare)")
    ap.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    args = ap.parse_args()
    for name, allowed, values in (("--cases", MODELS, args.cases), ("--dtypes", DTYPES, args.dtypes),
                                  ("--archs", SHARED_LIMIT, args.archs)):
        bad = [v for v in values if v not in allowed]
        if bad:
            ap.error(f"{name}: unknown {bad}; allowed: {', '.join(map(str, allowed))}")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("triton is not installed: pip install -e '.[gpu]' (the gpu extra)")
    rows = report(args.archs, args.cases, args.dtypes, args.warps)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'kernel':9} {'model':12} {'launch':15} {'sm':>3} {'dtype':9} {'M':>4} {'N':>3} {'warps':>5} "
          f"{'regs':>4} {'stack B':>7} {'shared KB':>9} {'async':>5}")
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:9} {r['model']:12} {r['launch']:15} {r['arch']:>3} {r['dtype']:9} ERROR {r['error']}")
            continue
        print(f"{r['kernel']:9} {r['model']:12} {r['launch']:15} {r['arch']:>3} {r['dtype']:9} "
              f"{r.get('block_m', ''):>4} {r.get('block_n', ''):>3} {r['warps']:>5} {r['regs']:>4} {r['stack']:>7} "
              f"{r['shared'] / 1024:>9.1f} {r['async_copies']:>5}")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
