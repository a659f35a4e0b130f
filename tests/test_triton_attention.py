"""The Triton paged-attention kernels against the torch path (the reference), on CPU
under TRITON_INTERPRET=1: decode rows with varied contexts (long ones split), prefill
chunks with earlier context, mixed batches, GQA, float32 and half precisions."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported anywhere

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from runtime import attention, kernel_layout  # noqa: E402
from runtime.attention import BatchMeta, KernelMeta, paged_attention  # noqa: E402

triton = pytest.importorskip("triton", reason="the gpu extra (triton) is not installed")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("triton without a GPU runs only under TRITON_INTERPRET=1", allow_module_level=True)

PAGE = 16
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def scattered_pages(ctxs: list[int], num_pages: int, rng: np.random.Generator) -> list[list[int]]:
    """Each item's pages drawn from one permutation (no two items share a page); some
    items get a consecutive run so the torch path also reads in place."""
    perm = rng.permutation(num_pages).tolist()
    out, i = [], 0
    for j, c in enumerate(ctxs):
        need = -(-c // PAGE)
        if j % 3 == 0:
            out.append(sorted(perm[i:i + need]))
        else:
            out.append(perm[i:i + need])
        i += need
    return out


def run_both(starts, lens, heads, kv_heads, d, dtype, seed=0, block_q=4, block_n=16, **build):
    """(kernel output, torch output, kernel cache, torch cache) on one random cache."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    ctxs = [s + n for s, n in zip(starts, lens)]
    num_pages = sum(-(-c // PAGE) for c in ctxs) + 3
    pages = scattered_pages(ctxs, num_pages, rng)
    kc = torch.randn(num_pages, PAGE, kv_heads, d, generator=g).to(dtype)
    vc = torch.randn(num_pages, PAGE, kv_heads, d, generator=g).to(dtype)
    t = sum(lens)
    q = torch.randn(t, heads, d, generator=g).to(dtype)
    k = torch.randn(t, kv_heads, d, generator=g).to(dtype)
    v = torch.randn(t, kv_heads, d, generator=g).to(dtype)
    samples = [True] * len(lens)
    ref_meta = BatchMeta.build(starts, lens, pages, samples, PAGE)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = paged_attention(q.float(), k.float(), v.float(), kc_ref.float(), vc_ref.float(), ref_meta)
    if dtype == torch.float32:   # the same cache, written by the torch path
        kc_ref, vc_ref = kc.clone(), vc.clone()
        paged_attention(q, k, v, kc_ref, vc_ref, ref_meta)
    packed = KernelMeta.build(starts, lens, pages, samples, PAGE, block_q=block_q,
                              block_n=block_n, **build)
    meta = packed.to_device("cpu")
    out = paged_attention(q, k, v, kc, vc, meta)
    return out, ref, (kc, vc), (kc_ref, vc_ref), packed


def check(out, ref, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_rows_varied_contexts_gqa(dtype, monkeypatch):
    """9 decode rows, contexts 1 to 700 (split in 8 parts of >= 64 keys, so short rows
    have empty parts), 8 query heads on 2 KV heads; rows padded to a bucket of 16, the
    table to a power of two."""
    monkeypatch.setattr(kernel_layout, "MIN_SPLIT_KEYS", 64)
    ctxs = [1, 5, 17, 33, 100, 129, 255, 511, 700]
    out, ref, (kc, _), (kc_ref, _), packed = run_both(
        [c - 1 for c in ctxs], [1] * len(ctxs), heads=8, kv_heads=2, d=32, dtype=dtype, seed=1,
        block_n=32)
    assert packed.dec_rows == 16 and packed.width == 64
    assert packed.dec_splits == 8   # 16 rows x 8 splits = 128, 700 keys >= 8 x 64
    check(out, ref, dtype)
    if dtype == torch.float32:
        assert torch.equal(kc, kc_ref)   # the new K/V land in the same slots


def test_long_rows_split_like_unsplit(monkeypatch):
    """A few long rows: cut into 16 splits (flash-decoding) they give what one pass gives."""
    monkeypatch.setattr(kernel_layout, "MIN_SPLIT_KEYS", 64)
    ctxs = [1100, 37]
    starts, lens = [c - 1 for c in ctxs], [1] * 2
    split, ref, *_ , packed = run_both(starts, lens, 4, 2, 16, torch.float32, seed=2, block_n=32)
    assert packed.dec_splits == 16
    one, *_ = run_both(starts, lens, 4, 2, 16, torch.float32, seed=2, block_n=32, max_context=1)
    check(split, ref, torch.float32)
    check(one, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_chunks_with_prior_context(dtype):
    """Chunks of 2 to 23 tokens, from position 0 and after earlier context (causal
    within the chunk, full over the context), blocks of 4 queries, GQA 3:1."""
    starts = [0, 30, 7, 64]
    lens = [23, 9, 2, 13]
    out, ref, *_ , packed = run_both(starts, lens, heads=6, kv_heads=2, d=16, dtype=dtype, seed=3)
    assert packed.chunk_rows == 4 and packed.dec_rows == 0
    assert packed.blocks == 6 + 3 + 1 + 4
    check(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_batch(dtype, monkeypatch):
    """Decodes and chunks interleaved in one micro-batch (two launches), one decode row
    long enough to split."""
    monkeypatch.setattr(kernel_layout, "MIN_SPLIT_KEYS", 64)
    starts = [40, 0, 300, 5, 17, 90]
    lens = [1, 12, 1, 1, 20, 1]
    out, ref, *_ , packed = run_both(starts, lens, heads=4, kv_heads=1, d=32, dtype=dtype, seed=4)
    assert (packed.dec_rows, packed.chunk_rows, packed.dec_splits) == (4, 2, 4)
    check(out, ref, dtype)


def test_packed_metadata_matches_torch_path():
    """The vectorised build gives the torch path's positions, slots and sample indices;
    decode padding rows are empty (query length 0) and never written to the cache."""
    starts, lens = [3, 0, 20, 8], [1, 5, 1, 2]
    pages = [[7], [2, 9], [4, 5], [1]]
    samples = [True, False, True, True]
    ref = BatchMeta.build(starts, lens, pages, samples, 16)
    packed = KernelMeta.build(starts, lens, pages, samples, 16, dec_rows=8, width=8)
    meta = packed.to_device("cpu")
    assert meta.positions.tolist() == ref.positions.tolist()
    assert meta.slots.tolist() == ref.slots.tolist()
    assert meta.sample_idx.tolist() == ref.sample_idx.tolist() == [0, 6, 8]
    dec = meta.kernel.decode
    assert dec.table.shape == (8, 8)
    assert dec.q_starts.tolist() == [0, 6] + [0] * 6
    assert dec.q_lens.tolist() == [1, 1] + [0] * 6
    assert dec.seq_lens.tolist() == [4, 21] + [0] * 6
    assert dec.table[1, :2].tolist() == [4, 5]
    ch = meta.kernel.chunks
    assert ch.q_starts.tolist() == [1, 7] and ch.seq_lens.tolist() == [5, 10]
    assert ch.blk_seq.tolist() == [0, 1] and ch.blk_first.tolist() == [0, 0]
    with pytest.raises(ValueError, match="needs 2 pages for 21 tokens, has 1"):
        KernelMeta.build([20], [1], [[4]], [True], 16)
    with pytest.raises(ValueError, match="more than the table width 4"):
        KernelMeta.build([100], [1], [list(range(7))], [True], 16, width=4)



def test_packed_segments_are_16_byte_aligned():
    """Every tensor the kernels get starts on 16 bytes of the (aligned) buffer, whatever
    the token, sample, row and block counts: Triton specializes on each pointer's
    alignment, and a GPU would otherwise compile a kernel variant per pattern."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 9))
        lens = [int(x) if rng.random() < 0.5 else 1 for x in rng.integers(1, 40, n)]
        starts = [int(x) for x in rng.integers(0, 30, n)]
        pages = [list(range(100 * i, 100 * i + (s + k + 15) // 16)) for i, (s, k) in enumerate(zip(starts, lens))]
        samples = [bool(x) for x in rng.random(n) < 0.7]
        packed = KernelMeta.build(starts, lens, pages, samples, 16)
        buf = torch.from_numpy(packed.host).clone()     # torch's CPU allocator: 64-byte aligned
        assert buf.data_ptr() % 16 == 0
        meta = packed.views(buf)
        ref = BatchMeta.build(starts, lens, pages, samples, 16)
        assert meta.slots.tolist() == ref.slots.tolist() and meta.sample_idx.tolist() == ref.sample_idx.tolist()
        tensors = [meta.positions, meta.slots, meta.sample_idx]
        for launch in (meta.kernel.decode, meta.kernel.chunks):
            if launch is not None:
                tensors += [x for x in (launch.q_starts, launch.q_lens, launch.seq_lens, launch.table,
                                        launch.blk_seq, launch.blk_first) if x is not None]
        assert all(x.numel() == 0 or x.data_ptr() % 16 == 0 for x in tensors)


def test_padding_tokens_skip_the_cache():
    from runtime import triton_attention as ta
    kc = torch.zeros(2, 4, 1, 8)
    vc = torch.zeros(2, 4, 1, 8)
    k = torch.arange(3 * 8, dtype=torch.float32).view(3, 1, 8) + 1
    ta.store_kv(k, -k, kc, vc, torch.tensor([5, -1, 0], dtype=torch.int32))
    assert torch.equal(kc.view(8, 8)[5], k[0, 0]) and torch.equal(vc.view(8, 8)[0], -k[2, 0])
    assert int((kc != 0).any(-1).sum()) == 2


def test_buckets_and_splits():
    assert [attention.bucket_rows(n) for n in (1, 3, 8, 9, 17, 33, 250)] == [1, 4, 8, 16, 32, 48, 256]
    assert [attention.bucket_width(n) for n in (1, 5, 64, 65)] == [4, 8, 64, 128]
    assert attention.num_splits(1, 100) == 1          # short: no split
    assert attention.num_splits(1, 8192) == 16
    assert attention.num_splits(8, 8192) == 16 and attention.num_splits(32, 8192) == 4
    assert attention.num_splits(64, 8192) == 2        # enough rows already
    assert attention.num_splits(256, 8192) == 1


def test_backend_choice_and_errors(monkeypatch):
    from runtime import triton_attention as ta
    assert attention.resolve_backend("auto", "cpu") == "torch"
    assert attention.resolve_backend("torch", "cpu") == "torch"
    assert attention.resolve_backend("triton", "cpu") == "triton"   # interpreted
    with pytest.raises(ValueError, match="attention_backend must be one of auto, torch, triton, flashinfer"):
        attention.resolve_backend("flash", "cpu")
    monkeypatch.setitem(__import__("sys").modules, "flashinfer", None)
    with pytest.raises(ValueError, match="pip install flashinfer-python"):
        attention.resolve_backend("flashinfer", "cuda")
    monkeypatch.setattr(ta, "triton", None)
    with pytest.raises(ValueError, match=r"needs the triton package: pip install -e '\.\[gpu\]'"):
        attention.resolve_backend("triton", "cuda")
    assert attention.resolve_backend("auto", "cuda") == "torch"     # no triton: the torch path


def test_stage_model_logits_match_torch_backend():
    """A whole tiny stage (embedding to logits, 2 layers, GQA) on the triton backend
    gives the torch backend's logits for a mixed micro-batch."""
    from tests.model_helpers import tiny_gqa_stage
    model = tiny_gqa_stage()
    starts, lens = [0, 0], [9, 18]
    pages = [[0], [3, 1]]
    outs = []
    for backend in ("torch", "triton"):
        kv = model.make_kv_cache(6, 16)
        ids = torch.randint(0, 101, (27,), generator=torch.Generator().manual_seed(1))
        meta = BatchMeta.build(starts, lens, pages, [True, True], 16, backend=backend)
        first = model(ids, meta, kv)
        # then a decode step for each, on top of the cache the chunks wrote
        meta = BatchMeta.build([9, 18], [1, 1], pages, [True, True], 16, backend=backend)
        outs.append((first, model(torch.tensor([5, 7]), meta, kv)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_compiled_variants_reads_a_triton_jit_cache_and_is_empty_when_interpreted():
    """gpu_check reports the attention kernel's compiled variants (registers, spills) as
    the driver loaded them; the cache layout is triton's (3.7 and 3.9: device_caches[dev][0])."""
    from types import SimpleNamespace

    from runtime import triton_attention as ta
    assert ta.compiled_variants() == []      # interpreted here: nothing compiled
    k = SimpleNamespace(n_regs=119, n_spills=0, metadata=SimpleNamespace(shared=39424, num_warps=4))
    fake = SimpleNamespace(device_caches={0: ({"key-a": k, "key-b": k}, {}, None, None, None)})
    assert ta.compiled_variants(fake) == [{"regs": 119, "spills": 0, "shared": 39424, "warps": 4}] * 2
    assert ta.compiled_variants(SimpleNamespace(device_caches={0: "another layout"})) == []
