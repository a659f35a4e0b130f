"""Per-micro-batch attention metadata and paged attention with plain torch ops.

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
    pages: torch.Tensor | None   # [pages covering start + num_tokens]; None if consecutive
    first_page: int          # the first of them (read in place when consecutive)
    mask: torch.Tensor | None  # [num_tokens, context] bool; None when start == 0 (causal)


@dataclass(slots=True)
class DecodeGroup:
    """Decode rows attended as one padded SDPA call over pages gathered from the cache."""
    rows: torch.Tensor           # [n] long, the rows (indices into BatchMeta.dec_idx)
    pages: torch.Tensor          # [n * width] long, each row's pages padded with page 0
    ctx: int                     # longest context of the group (keys kept per row)
    mask: torch.Tensor | None    # [n, 1, 1, ctx] bool, True = attend; None if all equal
    fmask: torch.Tensor | None = None  # the mask as 0 / -inf in the model dtype (lazily)


@dataclass(slots=True)
class DecodePlan:
    """How the single-token items of a micro-batch are attended (built once per batch).

    A row's keys are split in "runs" and a "tail". A run is a stretch of consecutive
    pages in its page list (a prompt chunk's pages are allocated together), read in place
    as a view of the cache: no copy. The tail (the other pages, the partial last page
    last) is gathered, with the tails of other rows of similar length, into padded
    groups. Attention does not care about key order (RoPE is already in the keys), so
    every part returns its log-sum-exp and the parts merge exactly."""
    idx: torch.Tensor            # [B] long, packed index of each row's token
    groups: list[DecodeGroup]
    runs: list[tuple[int, int, int]]    # (row, first page, pages) read in place
    run_rows: torch.Tensor | None       # [R] long, the row of each run


@dataclass(slots=True)
class BatchMeta:
    num_tokens: int
    positions: torch.Tensor      # [T] long
    slots: torch.Tensor          # [T] long, where each token's K/V is written
    sample_idx: torch.Tensor     # [S] long, packed index of each sampling item's last token
    decode: DecodePlan | None = None
    chunks: list[Chunk] = field(default_factory=list)

    @classmethod
    def build(cls, starts: Sequence[int], lens: Sequence[int], pages: Sequence[Sequence[int]],
              samples: Sequence[bool], page_size: int,
              device: torch.device | str = "cpu", decode_mode: str = "auto") -> "BatchMeta":
        """From plain lists (what stage 0 can send to the other stages): per item its
        first position, token count, page list and whether it samples. `decode_mode`
        (how single-token items are attended; see `plan_decodes`): "auto" (in-place
        runs on CPU, tails grouped by length), "grouped" (no runs), "padded"
        (one group, every row padded to the longest context), "rows" (a group per row)."""
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
            if n == 1:
                positions.append(start)
                slots.append(item_pages[start // page_size] * page_size + start % page_size)
                dec_idx.append(offset)
                dec_pages.append(item_pages)
                dec_lens.append(ctx)
            else:
                pos = range(start, ctx)
                positions.extend(pos)
                slots.extend(item_pages[p // page_size] * page_size + p % page_size for p in pos)
                first = item_pages[0]
                in_place = item_pages == list(range(first, first + need))
                page_t = None if in_place else torch.tensor(item_pages, dtype=torch.long, device=device)
                mask = None
                if start > 0:
                    q_pos = torch.arange(start, ctx, device=device)[:, None]
                    mask = torch.arange(ctx, device=device)[None, :] <= q_pos
                chunks.append(Chunk(offset, n, start, page_t, first, mask))
            if samp:
                sample_idx.append(offset + n - 1)
            offset += n

        def long(xs: list) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.long, device=device)

        decode = None
        if dec_idx:
            if decode_mode == "auto" and torch.device(device).type != "cpu":
                decode_mode = "grouped"  # in-place runs need the CPU flash kernel's LSE
            decode = plan_decodes(dec_idx, dec_pages, dec_lens, page_size, decode_mode, device)
        return cls(
            num_tokens=offset,
            positions=long(positions),
            slots=long(slots),
            sample_idx=long(sample_idx),
            decode=decode,
            chunks=chunks,
        )

    def describe_decode(self) -> str:
        """e.g. "12 in place; 20x64 12x37": in-place runs, then rows x keys per group."""
        d = self.decode
        if d is None:
            return "no decodes"
        groups = " ".join(f"{g.rows.numel()}x{g.ctx}" for g in d.groups)
        return f"{len(d.runs)} in place; {groups}"

    @classmethod
    def from_batch(cls, batch: MicroBatch, page_size: int,
                   device: torch.device | str = "cpu") -> "BatchMeta":
        its = batch.items
        return cls.build([it.start for it in its], [it.num_tokens for it in its],
                         [it.request.pages for it in its], [it.samples for it in its],
                         page_size, device)


# Cost of one padded decode group in key slots: a fixed part per SDPA call (gather and
# kernel call) plus one per padded key; an in-place run pays off from this many pages.
# Measured on CPU with benchmarks/attention_micro.py (~7 us per call, ~0.25 us per key).
GROUP_OVERHEAD_KEYS = 64
MIN_RUN_PAGES = 4


def group_decodes(lens: Sequence[int], mode: str = "auto",
                  overhead: int = GROUP_OVERHEAD_KEYS) -> list[list[int]]:
    """Split rows with `lens` keys each into groups run as one padded call each, so that
    cost ~ sum over groups of (overhead + rows x longest) is minimal: rows sorted by
    length, optimal contiguous split by dynamic programming. Equal lengths give one
    group; "padded" always one, "rows" one per row."""
    n = len(lens)
    if mode == "padded" or n <= 1:
        return [list(range(n))]
    order = sorted(range(n), key=lens.__getitem__)
    if mode == "rows":
        return [[r] for r in order]
    srt = [lens[r] for r in order]
    if srt[0] == srt[-1]:
        return [list(range(n))]
    # DP over units of consecutive sorted rows (single rows up to 32; bounded work for
    # big batches): best[j] = cost of units[:j]; a group units[i:j] costs overhead +
    # (its rows) x (its longest). cum[j] = rows in units[:j].
    size = -(-n // 32)
    cum = list(range(0, n, size)) + [n]
    m = len(cum) - 1
    best = [0] * (m + 1)
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        top, end = srt[cum[j] - 1], cum[j]
        best[j] = min(best[i] + overhead + (end - cum[i]) * top for i in range(j))
        cut[j] = next(i for i in range(j) if best[i] + overhead + (end - cum[i]) * top == best[j])
    groups = []
    j = m
    while j > 0:
        groups.append(sorted(order[cum[cut[j]]:cum[j]]))  # a lone group's rows are in order
        j = cut[j]
    return groups[::-1]


def plan_decodes(dec_idx: list[int], dec_pages: list[list[int]], dec_lens: list[int],
                 page_size: int, mode: str = "auto",
                 device: torch.device | str = "cpu") -> DecodePlan:
    if mode not in ("auto", "grouped", "padded", "rows"):
        raise ValueError(f"unknown decode_mode {mode!r}")
    runs: list[tuple[int, int, int]] = []
    tails: list[list[int]] = []
    tail_lens: list[int] = []
    for row, (ps, ctx) in enumerate(zip(dec_pages, dec_lens)):
        if mode != "auto" or len(ps) <= MIN_RUN_PAGES:
            tails.append(ps)
            tail_lens.append(ctx)
            continue
        tail: list[int] = []
        last = len(ps) - 1       # the partial last page stays in the tail, last
        i = 0
        while i < last:
            j = i + 1
            while j < last and ps[j] == ps[j - 1] + 1:
                j += 1
            if j - i >= MIN_RUN_PAGES:
                runs.append((row, ps[i], j - i))
            else:
                tail.extend(ps[i:j])
            i = j
        tail.append(ps[last])
        tails.append(tail)
        tail_lens.append(ctx - (len(ps) - len(tail)) * page_size)

    def long(xs: list) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long, device=device)

    groups: list[DecodeGroup] = []
    for rows in group_decodes(tail_lens, "grouped" if mode == "auto" else mode):
        width = max(len(tails[r]) for r in rows)
        ctx = max(tail_lens[r] for r in rows)
        flat_pages = [p for r in rows for p in tails[r] + [0] * (width - len(tails[r]))]
        mask = None
        if any(tail_lens[r] != ctx for r in rows):
            key_pos = torch.arange(ctx, device=device)
            mask = (key_pos[None, :] < long([tail_lens[r] for r in rows])[:, None])
            mask = mask.view(len(rows), 1, 1, ctx)
        groups.append(DecodeGroup(long(rows), long(flat_pages), ctx, mask))
    run_rows = long([r for r, _, _ in runs]) if runs else None
    return DecodePlan(long(dec_idx), groups, runs, run_rows)


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
