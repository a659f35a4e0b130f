"""Paged attention in Triton: one launch for all decode rows, one for all prefill chunks.

Both launches run one kernel, `_paged_attn_kernel`, over the same per-sequence metadata
(runtime.batch_meta.KernelLaunch: query start and length, context length, a row of the
page table). A program holds BLOCK_M "query rows" of one KV head: BLOCK_Q query tokens
x the GROUP query heads sharing that KV head (GQA costs no K/V copies), and walks the
sequence's keys BLOCK_N at a time through the page table with an online softmax; the
causal mask is key position <= query position, so a chunk with earlier context and a
decode row are the same case.
- decode rows (one token each): grid (rows, kv heads, splits). A long row's keys are
  cut into `num_splits` contiguous parts (flash-decoding) so that few long rows still
  fill the GPU; each part writes its output and log-sum-exp, `_reduce_kernel` merges
  them. Splits past a row's end write an empty part (lse -inf).
- prefill chunks: grid (query blocks, kv heads), each block a (chunk, first query) pair
  listed in the metadata, so a chunk of any length is one launch with the others.
Rows with length 0 are padding (bucketed shapes, CUDA graphs) and store nothing.
Under TRITON_INTERPRET=1 (the CPU tests) math runs in float32: the interpreter computes
bfloat16 dot products wrongly (checked with triton 3.9 and CPU torch 2.13), so there
`UPCAST` turns every operand to float32 first; on a GPU, half-precision operands go to
tensor cores with float32 accumulation, as in flash attention.
The torch path in runtime/attention.py is the reference (tests/test_triton_attention.py).
"""
from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the `gpu` extra is not installed: the torch path only
    triton = None
    tl = None

MISSING = ("attention_backend 'triton' needs the triton package: "
           "pip install -e '.[gpu]' (the gpu extra)")


def available() -> bool:
    return triton is not None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:
    # One program from query load to store (~90 lines): the online-softmax state (running max,
    # sum, accumulator) lives across the whole body, and @triton.jit helpers would only pass
    # it and a dozen strides back and forth.
    @triton.jit
    def _paged_attn_kernel(
            q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, lse_ptr,
            table_ptr, seq_lens_ptr, q_starts_ptr, q_lens_ptr, blk_seq_ptr, blk_first_ptr,
            stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
            stride_ot, stride_oh, stride_table, num_heads, scale_log2,
            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr, PER_SEQ: tl.constexpr,
            UPCAST: tl.constexpr):
        pid = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        if PER_SEQ:              # decode launch: program i is sequence i, its one query
            seq = pid
            first = 0
        else:                    # chunk launch: program i is query block i of the list
            seq = tl.load(blk_seq_ptr + pid)
            first = tl.load(blk_first_ptr + pid)
        seq_len = tl.load(seq_lens_ptr + seq)
        q_len = tl.load(q_lens_ptr + seq)
        q0 = tl.load(q_starts_ptr + seq)
        BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        tok = first + offs_m // GROUP_PAD             # query index within the sequence
        head = kvh * GROUP + offs_m % GROUP_PAD
        row_ok = (offs_m % GROUP_PAD < GROUP) & (tok < q_len)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(q_ptr + (q0 + tok)[:, None] * stride_qt + head[:, None] * stride_qh
                    + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        q_pos = seq_len - q_len + tok                 # a key at position <= q_pos is seen

        # keys the block needs: up to its last query's position (the context's end)
        kv_end = tl.minimum(seq_len, seq_len - q_len + first + BLOCK_Q)
        num_tiles = tl.cdiv(kv_end, BLOCK_N)
        if NUM_SPLITS > 1:
            per_split = tl.cdiv(num_tiles, NUM_SPLITS)
            t_lo = split * per_split
            t_hi = tl.minimum(num_tiles, t_lo + per_split)
        else:
            t_lo = 0
            t_hi = num_tiles

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for t in range(t_lo, t_hi):
            kpos = t * BLOCK_N + tl.arange(0, BLOCK_N)
            k_ok = kpos < kv_end
            page = tl.load(table_ptr + seq * stride_table + kpos // PAGE, mask=k_ok, other=0)
            page = page.to(tl.int64)
            slot = kpos % PAGE
            k = tl.load(k_ptr + (page * stride_kp + slot * stride_ks + kvh * stride_kh)[None, :]
                        + offs_d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptr + (page * stride_vp + slot * stride_vs + kvh * stride_vh)[:, None]
                        + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if UPCAST:   # float32 operands: full precision, not TF32
                s = tl.dot(q, k, input_precision="ieee") * scale_log2
            else:
                s = tl.dot(q, k) * scale_log2         # [M, N], in log2 units
            seen = k_ok[None, :] & (kpos[None, :] <= q_pos[:, None])
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing seen yet
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            if UPCAST:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_safe[:, None]
        if NUM_SPLITS > 1:
            # part [seq, head, split, d], lse [seq, head, split]; natural-log lse
            lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
            base = (seq * num_heads + head) * NUM_SPLITS + split
            tl.store(part_ptr + base[:, None] * HEAD_DIM + offs_d[None, :], o,
                     mask=row_ok[:, None] & d_ok[None, :])
            tl.store(lse_ptr + base, lse, mask=row_ok)
        else:
            tl.store(out_ptr + (q0 + tok)[:, None] * stride_ot + head[:, None] * stride_oh
                     + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _reduce_kernel(part_ptr, lse_ptr, out_ptr, q_starts_ptr, q_lens_ptr,
                       stride_ot, stride_oh, num_heads,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        if tl.load(q_lens_ptr + seq) > 0:
            q0 = tl.load(q_starts_ptr + seq)
            offs_s = tl.arange(0, NUM_SPLITS)
            offs_d = tl.arange(0, BLOCK_D)
            d_ok = offs_d < HEAD_DIM
            base = (seq * num_heads + head) * NUM_SPLITS
            lse = tl.load(lse_ptr + base + offs_s)
            m = tl.max(lse, 0)
            w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - m))
            parts = tl.load(part_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                            mask=d_ok[None, :], other=0.0)
            o = tl.sum(parts * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
            tl.store(out_ptr + q0 * stride_ot + head * stride_oh + offs_d,
                     o.to(out_ptr.dtype.element_ty), mask=d_ok)

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                         stride_kt, stride_vt, stride_ck, stride_cv,
                         WIDTH: tl.constexpr, BLOCK: tl.constexpr):
        """K/V of token i to cache slot slots[i] (slot < 0: a padding token, skipped)."""
        i = tl.program_id(0)
        slot = tl.load(slots_ptr + i).to(tl.int64)
        if slot >= 0:
            offs = tl.arange(0, BLOCK)
            ok = offs < WIDTH
            tl.store(k_cache_ptr + slot * stride_ck + offs,
                     tl.load(k_ptr + i * stride_kt + offs, mask=ok), mask=ok)
            tl.store(v_cache_ptr + slot * stride_cv + offs,
                     tl.load(v_ptr + i * stride_vt + offs, mask=ok), mask=ok)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k/v [T, kv_heads, d] into caches [pages, page_size, kv_heads, d] at `slots` [T]
    (flat slot ids; -1 skips the token)."""
    t = slots.numel()
    if t == 0:
        return
    width = k_cache.shape[2] * k_cache.shape[3]
    _store_kv_kernel[(t,)](k, v, k_cache, v_cache, slots, k.stride(0), v.stride(0),
                           k_cache.stride(1), v_cache.stride(1), WIDTH=width, BLOCK=_pow2(width))


def kernel_constants(heads: int, kv_heads: int, head_dim: int, page_size: int, block_q: int, block_n: int,
                     splits: int, per_seq: bool, *, upcast: bool, interpret: bool) -> dict[str, int | bool]:
    """`_paged_attn_kernel`'s compile-time constants for one launch (benchmarks/
    triton_resources.py compiles the kernel for sm_80 and sm_90 with exactly these). On a
    GPU, tl.dot wants every dimension >= 16: rows (query tokens x the group's heads) are
    padded to 16, and so is the head dimension (masked), so a model with head_dim 8
    compiles too (it did not); the interpreter takes any shape."""
    group = heads // kv_heads
    group_pad = _pow2(group)
    least = 1 if interpret else 16
    return dict(GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=max(least, _pow2(head_dim)),
                BLOCK_M=max(least, block_q * group_pad), BLOCK_N=block_n, PAGE=page_size,
                NUM_SPLITS=splits if per_seq else 1, PER_SEQ=per_seq, UPCAST=upcast)


def num_warps(const: dict[str, int | bool]) -> int:
    """Warps per program: 8 for blocks of 64+ query rows (prefill with GQA 4:1 or more) and
    for head_dim 256, else 4. With 4, those spill registers to local memory: 16-240 bytes
    a thread (ptxas for sm_80 and sm_90, triton 3.7.1 and 3.9.0, through benchmarks/
    triton_resources.py); with 8, no launch of the shipped models' shapes spills at sm_90."""
    return 8 if const["BLOCK_M"] >= 64 or const["BLOCK_D"] >= 256 else 4


def compiled_variants(kernel=None) -> list[dict[str, int | None]]:
    """The attention kernel's compiled variants in this process (on a GPU, after launches):
    registers, Triton's `n_spills`, shared bytes and warps of each, as the driver loaded
    them, to check benchmarks/triton_resources.py's offline figures on the real toolchain.
    [] under the interpreter, or where a triton version keeps its cache elsewhere
    (`device_caches[device][0]`: key -> CompiledKernel in triton 3.7 and 3.9)."""
    kernel = _paged_attn_kernel if kernel is None and triton is not None else kernel
    out = []
    for entry in (getattr(kernel, "device_caches", None) or {}).values():
        cache = entry[0] if isinstance(entry, tuple) and entry and isinstance(entry[0], dict) else {}
        for compiled in cache.values():
            md = getattr(compiled, "metadata", None)
            out.append({"regs": getattr(compiled, "n_regs", None), "spills": getattr(compiled, "n_spills", None),
                        "shared": getattr(md, "shared", None), "warps": getattr(md, "num_warps", None)})
    return out


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
           launch, *, per_seq: bool) -> None:
    """One launch over `launch` (runtime.batch_meta.KernelLaunch): decode rows when
    `per_seq` (one query each, split by launch.num_splits), else prefill chunks by
    query block. Writes into `out` [T, heads, d]."""
    n_seq = launch.seq_lens.numel()
    if n_seq == 0:
        return
    heads, d = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    interpret = interpreted()
    const = kernel_constants(heads, kv_heads, d, k_cache.shape[1], launch.block_q, launch.block_n,
                             launch.num_splits, per_seq, upcast=interpret or q.dtype == torch.float32,
                             interpret=interpret)
    splits = const["NUM_SPLITS"]
    grid0 = n_seq if per_seq else launch.blk_seq.numel()
    part = lse = out
    if splits > 1:
        part = torch.empty(n_seq, heads, splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(n_seq, heads, splits, dtype=torch.float32, device=q.device)
    blk_seq = launch.seq_lens if per_seq else launch.blk_seq   # unread when per_seq
    blk_first = launch.seq_lens if per_seq else launch.blk_first
    scale_log2 = (1.0 / math.sqrt(d)) * 1.4426950408889634
    _paged_attn_kernel[(grid0, kv_heads, splits)](
        q, k_cache, v_cache, out, part, lse,
        launch.table, launch.seq_lens, launch.q_starts, launch.q_lens, blk_seq, blk_first,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), launch.table.stride(0), heads, scale_log2, **const,
        num_warps=num_warps(const))
    if splits > 1:
        _reduce_kernel[(n_seq, heads)](part, lse, out, launch.q_starts, launch.q_lens,
                                       out.stride(0), out.stride(1), heads,
                                       HEAD_DIM=d, BLOCK_D=const["BLOCK_D"], NUM_SPLITS=splits)
