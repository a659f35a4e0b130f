"""Paged attention with plain torch ops (the CPU path and the reference), and the choice of
attention backend. The metadata lives in runtime/batch_meta.py, the decode plan in
runtime/decode_plan.py, the kernel backends' shapes in runtime/kernel_layout.py.

Tokens of all items are packed along one dim, no padding. Attention is split in two:
- single-token items (decodes, and 1-token prefill chunks): cost follows the SUM of their
  contexts, not rows x the longest one. On CPU each row's runs of consecutive pages (a
  prompt chunk's pages are allocated together) are read in place, as views of the cache,
  one SDPA call per run; the rest of each row (its "tail", at least the last page) is
  gathered, tails of similar length batched into a few padded groups (split chosen by a
  small dynamic program on a per-call + per-key cost); the parts merge exactly by their
  log-sum-exp. Elsewhere (GPU) rows are grouped the same way, without in-place runs.
  GQA needs no K/V copies: the query heads sharing a KV head ride as that head's
  "query positions".
- multi-token items (prefill chunks) run one SDPA each: causal within the chunk, full
  over the context computed earlier, read back from the cache (in place when the
  chunk's pages are consecutive).
The metadata is built once per micro-batch and shared by every layer of the stage.
Variants measured with benchmarks/attention_micro.py.

The kernel backends (attention_backend triton / flashinfer, for GPUs) take the same
batch as a few int32 tensors instead (KernelMeta, runtime/batch_meta.py): built with numpy, no per-row Python
but the page lists' concatenation, packed in one buffer copied to the device once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# importable from here as before the split (the model, tests)
from runtime.batch_meta import BatchMeta, KernelMeta, input_ids
from runtime.decode_plan import DecodeGroup, DecodePlan, group_decodes
from runtime.kernel_layout import bucket_rows, bucket_width, num_splits

__all__ = ["BatchMeta", "KernelMeta", "input_ids", "group_decodes", "bucket_rows", "bucket_width", "num_splits",
           "paged_attention", "BACKENDS", "resolve_backend"]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: BatchMeta) -> torch.Tensor:
    """q [T, heads, d], k/v [T, kv_heads, d]; caches [pages, page_size, kv_heads, d].
    Writes the new K/V into the cache, then returns attention output [T, heads, d]."""
    _, page_size, kv_heads, d = k_cache.shape
    heads = q.shape[1]
    group = heads // kv_heads
    if meta.kernel is not None:
        return meta.kernel.attention(q, k, v, k_cache, v_cache)
    k_cache.view(-1, kv_heads, d).index_copy_(0, meta.slots, k)
    v_cache.view(-1, kv_heads, d).index_copy_(0, meta.slots, v)
    out = torch.empty_like(q)
    plan = meta.decode
    if plan is not None:
        b = plan.idx.numel()
        qd = q.index_select(0, plan.idx).view(b, kv_heads, group, d)
        if len(plan.groups) == 1 and not plan.runs and plan.groups[0].rows.numel() == b:
            g = plan.groups[0]  # one padded call over every row, in order; no LSE needed
            od = F.scaled_dot_product_attention(qd, *_gather(k_cache, v_cache, g, b), attn_mask=g.mask)
        else:
            od = _decode_split(qd, k_cache, v_cache, plan)
        out.index_copy_(0, plan.idx, od.reshape(b, heads, d))
    for c in meta.chunks:
        ctx = c.start + c.num_tokens
        qc = q[c.offset:c.offset + c.num_tokens].transpose(0, 1)            # [heads, n, d]
        if c.pages is None:  # consecutive pages: read in place
            kc = k_cache[c.first_page:].view(-1, kv_heads, d)[:ctx].transpose(0, 1)
            vc = v_cache[c.first_page:].view(-1, kv_heads, d)[:ctx].transpose(0, 1)
        else:
            kc = k_cache.index_select(0, c.pages).view(-1, kv_heads, d)[:ctx].transpose(0, 1)
            vc = v_cache.index_select(0, c.pages).view(-1, kv_heads, d)[:ctx].transpose(0, 1)
        oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=c.mask,
                                            is_causal=c.mask is None, enable_gqa=group > 1)
        out[c.offset:c.offset + c.num_tokens] = oc.transpose(0, 1)
    return out


def _gather(k_cache: torch.Tensor, v_cache: torch.Tensor, g: DecodeGroup,
            n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's K and V as [n, kv_heads, ctx, d] (strided views of one copy each)."""
    _, _, kv_heads, d = k_cache.shape
    # index_select copies whole pages (memcpy rows); about 2x faster than x[pages]
    kd = k_cache.index_select(0, g.pages).view(n, -1, kv_heads, d)[:, :g.ctx].transpose(1, 2)
    vd = v_cache.index_select(0, g.pages).view(n, -1, kv_heads, d)[:, :g.ctx].transpose(1, 2)
    return kd, vd


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _decode_split(qd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  plan: DecodePlan) -> torch.Tensor:
    """qd [B, kv_heads, group, d] -> [B, kv_heads, group, d]: tails by group (each call
    returns its log-sum-exp), in-place runs one call each, merged exactly."""
    b, kv_heads, group, d = qd.shape
    od = torch.empty_like(qd)
    need_lse = bool(plan.runs)
    lse = qd.new_empty(b, kv_heads, group, dtype=torch.float32) if need_lse else None
    for g in plan.groups:
        n = g.rows.numel()
        qg = qd.index_select(0, g.rows)
        kd, vd = _gather(k_cache, v_cache, g, n)
        if need_lse:
            if g.mask is not None and g.fmask is None:
                g.fmask = torch.zeros(g.mask.shape, dtype=qd.dtype, device=qd.device
                                      ).masked_fill_(~g.mask, float("-inf"))
            o, l = _flash_cpu(qg, kd, vd, 0.0, False, attn_mask=g.fmask)
            lse.index_copy_(0, g.rows, l)
        else:
            o = F.scaled_dot_product_attention(qg, kd, vd, attn_mask=g.mask)
        od.index_copy_(0, g.rows, o)
    if not need_lse:
        return od
    o_r, l_r = [], []
    for row, first, n_pages in plan.runs:
        kr = k_cache[first:first + n_pages].view(1, -1, kv_heads, d).transpose(1, 2)
        vr = v_cache[first:first + n_pages].view(1, -1, kv_heads, d).transpose(1, 2)
        o, l = _flash_cpu(qd[row:row + 1], kr, vr, 0.0, False)
        o_r.append(o)
        l_r.append(l)
    rows = plan.run_rows
    o_r, l_r = torch.cat(o_r).float(), torch.cat(l_r)
    # softmax over all parts of a row: weights exp(lse_part - max over the row's parts)
    m = lse.scatter_reduce(0, rows.view(-1, 1, 1).expand_as(l_r), l_r, "amax")
    w_t = (lse - m).exp_()
    w_r = (l_r - m.index_select(0, rows)).exp_()
    num = (od.float() * w_t[..., None]).index_add_(0, rows, o_r * w_r[..., None])
    den = w_t.index_add_(0, rows, w_r)
    return (num / den[..., None]).to(qd.dtype)


# ---------------------------------------------------------------------------------------
# Kernel backends: which one runs.

BACKENDS = ("auto", "torch", "triton", "flashinfer")
FLASHINFER_MISSING = ("attention_backend 'flashinfer' needs FlashInfer: pip install "
                      "flashinfer-python (a build matching your torch and CUDA)")


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend to run: "auto" is triton on CUDA when it imports, else torch. Asking
    for a backend that cannot load is a one-line error naming how to install it."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    on_cuda = torch.device(device).type == "cuda"
    if name == "torch" or (name == "auto" and not on_cuda):
        return "torch"      # the CPU path imports nothing more
    from runtime import triton_attention  # why: triton loads only when a GPU backend is chosen
    if name == "auto":
        return "triton" if triton_attention.available() else "torch"
    if name == "triton" and not triton_attention.available():
        raise ValueError(triton_attention.MISSING)
    if name == "flashinfer":
        try:
            import flashinfer  # noqa: F401
        except ImportError:
            raise ValueError(FLASHINFER_MISSING) from None
        if not on_cuda:
            raise ValueError("attention_backend 'flashinfer' runs on CUDA only (device is "
                             f"{torch.device(device).type})")
    if name == "triton" and not on_cuda and not triton_attention.interpreted():
        raise ValueError("attention_backend 'triton' runs on CUDA (or on CPU under "
                         "TRITON_INTERPRET=1, for tests); use torch on CPU")
    return name
