"""Per-micro-batch attention metadata and paged attention with plain torch ops.

Tokens of all items are packed along one dim, no padding. Attention is split in two:
- single-token items (decodes, and 1-token prefill chunks) run as one padded batch: each
  row gathers its request's pages, padded to the longest context, and a mask hides the
  padding. GQA needs no K/V copies: the query heads sharing a KV head ride as that
  head's "query positions".
- multi-token items (prefill chunks) run one SDPA each: causal within the chunk, full
  over the context computed earlier, read back from the cache.
The metadata is built once per micro-batch and shared by every layer of the stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from core.batch import MicroBatch


@dataclass(slots=True)
class Chunk:
    offset: int              # index of the chunk's first token in the packed batch
    num_tokens: int
    start: int               # position of that token (KV already held before it)
    pages: torch.Tensor      # [pages covering start + num_tokens]
    mask: torch.Tensor | None  # [num_tokens, context] bool; None when start == 0 (causal)


@dataclass(slots=True)
class BatchMeta:
    num_tokens: int
    positions: torch.Tensor      # [T] long
    slots: torch.Tensor          # [T] long, where each token's K/V is written
    sample_idx: torch.Tensor     # [S] long, packed index of each sampling item's last token
    dec_idx: torch.Tensor        # [B] long, packed index of each single-token item
    dec_pages: torch.Tensor      # [B, max pages] long, padded with page 0
    dec_mask: torch.Tensor       # [B, 1, 1, max pages * page_size] bool, True = attend
    chunks: list[Chunk] = field(default_factory=list)

    @classmethod
    def build(cls, starts: Sequence[int], lens: Sequence[int], pages: Sequence[Sequence[int]],
              samples: Sequence[bool], page_size: int,
              device: torch.device | str = "cpu") -> "BatchMeta":
        """From plain lists (what stage 0 can send to the other stages): per item its
        first position, token count, page list and whether it samples."""
        if not (len(starts) == len(lens) == len(pages) == len(samples)):
            raise ValueError("starts, lens, pages and samples must have one entry per item")
        positions: list[int] = []
        slots: list[int] = []
        sample_idx: list[int] = []
        dec_idx: list[int] = []
        dec_pages: list[list[int]] = []
        dec_lens: list[int] = []
        chunks: list[Chunk] = []
        offset = 0
        for start, n, item_pages, samp in zip(starts, lens, pages, samples):
            ctx = start + n
            need = -(-ctx // page_size)
            if n < 1 or start < 0:
                raise ValueError(f"item with start={start}, num_tokens={n} is empty or negative")
            if len(item_pages) < need:
                raise ValueError(f"item needs {need} pages for {ctx} tokens, has {len(item_pages)}")
            item_pages = list(item_pages[:need])
            pos = range(start, ctx)
            positions.extend(pos)
            slots.extend(item_pages[p // page_size] * page_size + p % page_size for p in pos)
            if samp:
                sample_idx.append(offset + n - 1)
            if n == 1:
                dec_idx.append(offset)
                dec_pages.append(item_pages)
                dec_lens.append(ctx)
            else:
                page_t = torch.tensor(item_pages, dtype=torch.long, device=device)
                mask = None
                if start > 0:
                    q_pos = torch.arange(start, ctx, device=device)[:, None]
                    mask = torch.arange(ctx, device=device)[None, :] <= q_pos
                chunks.append(Chunk(offset, n, start, page_t, mask))
            offset += n
        width = max((len(p) for p in dec_pages), default=0)
        padded = [p + [0] * (width - len(p)) for p in dec_pages]
        key_pos = torch.arange(width * page_size, device=device)
        lens_t = torch.tensor(dec_lens, dtype=torch.long, device=device)

        def long(xs: list) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.long, device=device)

        return cls(
            num_tokens=offset,
            positions=long(positions),
            slots=long(slots),
            sample_idx=long(sample_idx),
            dec_idx=long(dec_idx),
            dec_pages=long(padded).view(len(padded), width),
            dec_mask=(key_pos[None, :] < lens_t[:, None]).view(len(padded), 1, 1, width * page_size),
            chunks=chunks,
        )

    @classmethod
    def from_batch(cls, batch: MicroBatch, page_size: int,
                   device: torch.device | str = "cpu") -> "BatchMeta":
        its = batch.items
        return cls.build([it.start for it in its], [it.num_tokens for it in its],
                         [it.request.pages for it in its], [it.samples for it in its],
                         page_size, device)


def input_ids(batch: MicroBatch) -> list[int]:
    """Packed token ids stage 0 embeds: each item's tokens [start, start + num_tokens)."""
    ids: list[int] = []
    for it in batch.items:
        req = it.request
        if req.prompt_ids is None:
            raise ValueError(f"request {req.id} has no prompt_ids; the runtime needs token ids")
        known = req.prompt_ids + req.output_ids
        if it.start + it.num_tokens > len(known):
            raise ValueError(f"request {req.id}: item reaches token {it.start + it.num_tokens} "
                             f"but only {len(known)} are known")
        ids.extend(known[it.start:it.start + it.num_tokens])
    return ids


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: BatchMeta) -> torch.Tensor:
    """q [T, heads, d], k/v [T, kv_heads, d]; caches [pages, page_size, kv_heads, d].
    Writes the new K/V into the cache, then returns attention output [T, heads, d]."""
    _, page_size, kv_heads, d = k_cache.shape
    heads = q.shape[1]
    group = heads // kv_heads
    k_cache.view(-1, kv_heads, d).index_copy_(0, meta.slots, k)
    v_cache.view(-1, kv_heads, d).index_copy_(0, meta.slots, v)
    out = torch.empty_like(q)
    b = meta.dec_idx.numel()
    if b:
        qd = q.index_select(0, meta.dec_idx).view(b, kv_heads, group, d)
        # index_select copies whole pages (memcpy rows); about 2x faster than x[pages]
        pages = meta.dec_pages.view(-1)
        kd = k_cache.index_select(0, pages).view(b, -1, kv_heads, d).transpose(1, 2)
        vd = v_cache.index_select(0, pages).view(b, -1, kv_heads, d).transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.dec_mask)
        out.index_copy_(0, meta.dec_idx, od.reshape(b, heads, d))
    for c in meta.chunks:
        ctx = c.start + c.num_tokens
        qc = q[c.offset:c.offset + c.num_tokens].transpose(0, 1)            # [heads, n, d]
        kc = k_cache.index_select(0, c.pages).view(-1, kv_heads, d)[:ctx].transpose(0, 1)
        vc = v_cache.index_select(0, c.pages).view(-1, kv_heads, d)[:ctx].transpose(0, 1)
        oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=c.mask,
                                            is_causal=c.mask is None, enable_gqa=group > 1)
        out[c.offset:c.offset + c.num_tokens] = oc.transpose(0, 1)
    return out
