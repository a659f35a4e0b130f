"""The paged-attention kernels compile for the GPUs they serve on, checked here without one:
Triton's NVIDIA backend builds a cubin for sm_90 (H100/H200) and sm_80 (A100) with the
very constants and warps `runtime.triton_attention.attend` launches with, and ptxas'
resource usage says whether shared memory fits and registers spill
(benchmarks/triton_resources.py; the interpreter, which the other kernel tests use,
accepts shapes and programs a GPU compile rejects)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Not imported here: the kernel tests in this process need triton loaded under TRITON_INTERPRET=1.
if importlib.util.find_spec("triton") is None:
    pytest.skip("the gpu extra (triton) is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "triton_resources.py"


def compile_report(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--json", *args], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("arch", [90, 80])
def test_every_launch_compiles_fits_shared_memory_and_does_not_spill(arch):
    models = "llama3-8b,llama3-70b,qwen2.5-32b,tiny,head-dim-8" + (",mha-d64,d256" if arch == 90 else "")
    rows = compile_report("--archs", str(arch), "--cases", models)
    assert {(r["kernel"], r["launch"]) for r in rows} >= {
        ("attention", "decode"), ("attention", "decode-split16"), ("attention", "prefill"),
        ("reduce", "decode-split16"), ("store_kv", "any")}
    failed = [r for r in rows if "error" in r]
    assert not failed, failed   # e.g. head_dim 8 once failed: tl.dot wants K >= 16 on a GPU
    for r in rows:
        assert r["shared"] <= r["shared_limit"], r
        if r["kernel"] == "attention" and r["head_dim"] >= 64:
            # the loads are pipelined (cp.async), as on a real launch of aligned tensors
            assert r["async_copies"] > 0, r
            # no spill at sm_90 (H100/H200); at sm_80 ptxas spills 16 bytes in one prefill
            assert r["stack"] <= (0 if arch == 90 else 16), f"registers spill: {r}"


def test_four_warps_spill_where_attend_takes_eight_and_fp16_fp32_compile():
    """Why attend launches 8 warps for 64+ query rows: with 4 the same prefill blocks spill."""
    four = compile_report("--archs", "90,80", "--cases", "qwen2.5-32b", "--warps", "4")
    prefill = [r for r in four if r["launch"] == "prefill"]
    assert len(prefill) == 2 and all(r["warps"] == 4 and r["stack"] > 0 for r in prefill), prefill
    other = compile_report("--archs", "90", "--cases", "llama3-8b", "--dtypes", "float16,float32")
    assert {r["dtype"] for r in other} == {"float16", "float32"}
    assert not [r for r in other if "error" in r]
    assert {r["warps"] for r in other if r["kernel"] == "attention" and r["launch"] == "prefill"} == {8}
