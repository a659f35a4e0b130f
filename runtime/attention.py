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

The kernel backends (attention_backend triton / flashinfer, for GPUs) take the same
batch as a few int32 tensors instead (KernelMeta): built with numpy, no per-row Python
but the page lists' concatenation, packed in one buffer copied to the device once.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from itertools import chain
from typing import Sequence

import numpy as np
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
    kernel: "KernelMeta | None" = None   # set for the kernel backends (then no plan)

    @classmethod
    def build(cls, starts: Sequence[int], lens: Sequence[int], pages: Sequence[Sequence[int]],
              samples: Sequence[bool], page_size: int,
              device: torch.device | str = "cpu", decode_mode: str = "auto",
              backend: str = "torch") -> "BatchMeta":
        """From plain lists (what stage 0 can send to the other stages): per item its
        first position, token count, page list and whether it samples. `decode_mode`
        (how single-token items are attended; see `plan_decodes`): "auto" (in-place
        runs on CPU, tails grouped by length), "grouped" (no runs), "padded"
        (one group, every row padded to the longest context), "rows" (a group per row).
        `backend` "triton" or "flashinfer" (resolved, see `resolve_backend`): the
        kernel metadata instead of the torch plan."""
        if not (len(starts) == len(lens) == len(pages) == len(samples)):
            raise ValueError("starts, lens, pages and samples must have one entry per item")
        if backend != "torch":
            return KernelMeta.build(starts, lens, pages, samples, page_size,
                                    backend=backend).to_device(device)
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
    def from_batch(cls, batch: MicroBatch, page_size: int, device: torch.device | str = "cpu",
                   backend: str = "torch") -> "BatchMeta":
        its = batch.items
        return cls.build([it.start for it in its], [it.num_tokens for it in its],
                         [it.request.pages for it in its], [it.samples for it in its],
                         page_size, device, backend=backend)


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
# Kernel backends: metadata as a few int32 tensors of bucketed shapes.

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


def bucket_rows(n: int) -> int:
    """Rows padded to 1, 2, 4, 8, 16, then multiples of 16: few shapes (CUDA graphs are
    captured at these), little padding."""
    if n <= 16:
        return 1 << max(0, n - 1).bit_length()
    return -(-n // 16) * 16


def bucket_width(n: int) -> int:
    """Page-table width (pages per row) padded to a power of two, at least 4."""
    return max(4, 1 << max(0, n - 1).bit_length())


# Flash-decoding split of long decode rows: as many splits as keep rows x splits within
# this many (x kv heads = programs; an H200 has 132 SMs), each split >= MIN_SPLIT_KEYS keys.
SPLIT_TARGET_ROWS = 128
MIN_SPLIT_KEYS = 256
MAX_SPLITS = 16


def num_splits(rows: int, max_context: int) -> int:
    s = 1
    while (s * 2 <= MAX_SPLITS and rows * s * 2 <= SPLIT_TARGET_ROWS
           and max_context >= s * 2 * MIN_SPLIT_KEYS):
        s *= 2
    return s


@dataclass(slots=True)
class KernelLaunch:
    """One attention launch over `n` sequences (decode rows, or prefill chunks)."""
    q_starts: torch.Tensor    # [n] int32, packed index of the sequence's first query token
    q_lens: torch.Tensor      # [n] int32, its query tokens (0 = padding row)
    seq_lens: torch.Tensor    # [n] int32, keys it attends (context incl. these tokens)
    table: torch.Tensor       # [n, width] int32, its pages (padded with 0)
    blk_seq: torch.Tensor | None    # [blocks] int32 (chunks): the sequence of each query block
    blk_first: torch.Tensor | None  # [blocks] int32 (chunks): its first query in that sequence
    block_q: int              # query tokens per block
    block_n: int              # keys per tile
    num_splits: int           # parts each row's keys are cut in (decode; 1 = none)


@dataclass(slots=True)
class PackedMeta:
    """A micro-batch's kernel metadata on the host: one int32 array, and the sizes of
    its segments (positions, slots, sample_idx, then per launch q_starts, q_lens,
    seq_lens, table, blk_seq, blk_first). `views` cuts any buffer holding that array
    (the device copy, or a CUDA graph's static buffer) into the tensors."""
    host: np.ndarray
    num_tokens: int
    num_samples: int
    dec_rows: int             # padded decode rows (0 = none)
    chunk_rows: int
    blocks: int
    width: int
    dec_splits: int
    block_q: int
    block_n: int
    backend: str
    page_size: int
    flash_args: tuple | None = None   # host lists flashinfer's plan() needs

    def sizes(self) -> list[int]:
        t, s, d, c, w, b = (self.num_tokens, self.num_samples, self.dec_rows,
                            self.chunk_rows, self.width, self.blocks)
        return [t, t, s, d, d, d, d * w, c, c, c, c * w, b, b]

    def views(self, buf: torch.Tensor) -> "BatchMeta":
        parts = list(torch.split(buf[:self.host.size], self.sizes()))
        pos, slots, samp = parts[:3]
        dec = chunks = None
        if self.dec_rows:
            dec = KernelLaunch(parts[3], parts[4], parts[5], parts[6].view(self.dec_rows, self.width),
                               None, None, 1, self.block_n, self.dec_splits)
        if self.chunk_rows:
            chunks = KernelLaunch(parts[7], parts[8], parts[9],
                                  parts[10].view(self.chunk_rows, self.width),
                                  parts[11], parts[12], self.block_q, self.block_n, 1)
        km = KernelMeta(slots, dec, chunks, self.backend)
        if self.backend == "flashinfer":
            km.plan_flashinfer(self, buf.device)
        return BatchMeta(self.num_tokens, pos, slots, samp, kernel=km)

    def to_device(self, device: torch.device | str) -> "BatchMeta":
        return self.views(staging(torch.device(device)).upload(self.host))


class _Staging:
    """A reusable pinned host buffer per device: each micro-batch's metadata crosses to
    the GPU in one asynchronous copy; the next one waits for that copy before reusing
    the buffer. On CPU the numpy array is used in place."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buf: torch.Tensor | None = None
        self.done = None

    def upload(self, host: np.ndarray) -> torch.Tensor:
        if self.device.type == "cpu":
            return torch.from_numpy(host)
        return self.upload_into(host, None)

    def upload_into(self, host: np.ndarray, dst: torch.Tensor | None) -> torch.Tensor:
        """`host` to the device: into `dst` (a CUDA graph's static buffer) or a new tensor."""
        n = host.size
        if self.buf is None or self.buf.numel() < n:
            self.buf = torch.empty(max(n, 4096, 2 * (0 if self.buf is None else self.buf.numel())),
                                   dtype=torch.int32, pin_memory=self.device.type == "cuda")
        elif self.done is not None:
            self.done.synchronize()
        self.buf[:n].numpy()[:] = host
        if dst is None:
            dst = self.buf[:n].to(self.device, non_blocking=True)
        else:
            dst[:n].copy_(self.buf[:n], non_blocking=True)
        if self.device.type == "cuda":
            self.done = torch.cuda.Event()
            self.done.record()
        return dst


_STAGING: dict[tuple[torch.device, int], _Staging] = {}


def staging(device: torch.device) -> _Staging:
    """This thread's staging buffer for `device`: a stage builds metadata on its receive
    thread and fills CUDA-graph buffers on its compute thread, so they must not share one."""
    key = (device, threading.get_ident())
    if key not in _STAGING:
        _STAGING[key] = _Staging(device)
    return _STAGING[key]


@dataclass(slots=True)
class KernelMeta:
    slots: torch.Tensor                 # [T] int32 flat cache slot per token (-1 = padding)
    decode: KernelLaunch | None
    chunks: KernelLaunch | None
    backend: str = "triton"
    flashinfer: object | None = None    # a planned flashinfer wrapper

    @staticmethod
    def build(starts: Sequence[int], lens: Sequence[int], pages: Sequence[Sequence[int]],
              samples: Sequence[bool], page_size: int, *, backend: str = "triton",
              dec_rows: int | None = None, width: int | None = None,
              max_context: int | None = None, block_q: int = 16, block_n: int = 64,
              pad_tokens: bool = False) -> PackedMeta:
        """Host-side metadata. Decode rows (one token) are padded to `bucket_rows` (or
        `dec_rows`), the page table to `bucket_width` (or `width`); the decode split
        follows the rows and the longest context (or `max_context`). `pad_tokens` (a
        decode-only batch for a CUDA graph, see `build_decode_graph`): the tokens too are
        padded to `dec_rows`. Each segment is written in place into the one array."""
        n = len(starts)
        if not (n == len(lens) == len(pages) == len(samples)):
            raise ValueError("starts, lens, pages and samples must have one entry per item")
        st = np.asarray(starts, dtype=np.int64).reshape(n)
        ln = np.asarray(lens, dtype=np.int64).reshape(n)
        if n and (ln.min() < 1 or st.min() < 0):
            i = int(np.flatnonzero((ln < 1) | (st < 0))[0])
            raise ValueError(f"item with start={st[i]}, num_tokens={ln[i]} is empty or negative")
        ctx = st + ln
        need = -(-ctx // page_size)
        have = np.fromiter(map(len, pages), dtype=np.int64, count=n)
        if n and (have < need).any():
            i = int(np.flatnonzero(have < need)[0])
            raise ValueError(f"item needs {need[i]} pages for {ctx[i]} tokens, has {have[i]}")
        flat = np.fromiter(chain.from_iterable(pages), dtype=np.int64, count=int(have.sum()))
        page_off = np.cumsum(have) - have
        w = int(need.max()) if n else 1
        width = bucket_width(w) if width is None else width
        if w > width:
            raise ValueError(f"a row needs {w} pages, more than the table width {width}")

        offsets = np.cumsum(ln) - ln
        t = int(ln.sum())
        item = np.repeat(np.arange(n), ln)
        pos = np.arange(t) - offsets[item] + st[item]
        samp = np.asarray(samples, dtype=bool).reshape(n)
        dec, ch = np.flatnonzero(ln == 1), np.flatnonzero(ln != 1)
        nd = dec_rows if dec_rows is not None else (bucket_rows(dec.size) if dec.size else 0)
        if dec.size > nd:
            raise ValueError(f"{dec.size} decode rows, more than the {nd} asked for")
        if pad_tokens and ch.size:
            raise ValueError("pad_tokens is for decode-only micro-batches")
        splits = 1
        if nd:
            longest = max_context if max_context is not None else int(ctx[dec].max(initial=0))
            splits = num_splits(nd, longest)
        nblk = -(-ln[ch] // block_q)
        blocks = int(nblk.sum())
        tp = nd if pad_tokens else t                     # tokens as the kernels see them
        ns = nd if pad_tokens else int(samp.sum())
        packed = PackedMeta(np.empty(0, np.int32), tp, ns, nd, int(ch.size), blocks, width, splits,
                            block_q, block_n, backend, page_size)
        host = np.zeros(sum(packed.sizes()), dtype=np.int32)
        seg = iter(np.split(host, np.cumsum(packed.sizes())[:-1]))
        pos_s, slot_s, samp_s = next(seg), next(seg), next(seg)
        pos_s[:t] = pos
        slot_s[:t] = flat[page_off[item] + pos // page_size] * page_size + pos % page_size
        slot_s[t:] = -1                                  # padding tokens write no K/V
        samp_s[:] = np.arange(nd) if pad_tokens else (offsets + ln - 1)[samp]

        def launch(rows: np.ndarray, q_starts, q_lens, seq_lens, table) -> None:
            """Per sequence of a launch: its query start and length, context, pages (only
            the pages in use are written: a graph's table is as wide as the model's context)."""
            k = rows.size
            q_starts[:k], q_lens[:k], seq_lens[:k] = offsets[rows], ln[rows], ctx[rows]
            nr = need[rows]
            r = np.repeat(np.arange(k), nr)
            c = np.arange(int(nr.sum())) - np.repeat(np.cumsum(nr) - nr, nr)
            table.reshape(-1, width)[r, c] = flat[page_off[rows][r] + c]

        launch(dec, next(seg), next(seg), next(seg), next(seg))
        launch(ch, next(seg), next(seg), next(seg), next(seg))
        blk_seq, blk_first = next(seg), next(seg)
        blk_seq[:] = np.repeat(np.arange(ch.size), nblk)
        blk_first[:] = (np.arange(blocks) - np.repeat(np.cumsum(nblk) - nblk, nblk)) * block_q
        packed.host = host
        if backend == "flashinfer":
            packed.flash_args = (ln, need, flat, page_off, ctx)
        return packed

    @staticmethod
    def build_decode_graph(starts: Sequence[int], pages: Sequence[Sequence[int]], page_size: int,
                           rows: int, width: int, max_context: int,
                           block_n: int = 64) -> PackedMeta:
        """A decode-only micro-batch padded to `rows` tokens for a CUDA graph captured
        at that size: padding tokens at position 0 write no K/V (slot -1) and attend
        nothing (query length 0); every row "samples" (the caller keeps the real ones).
        The split depends on `rows` and `max_context` only, so it is the captured one."""
        b = len(starts)
        if b > rows:
            raise ValueError(f"{b} decode rows, more than the graph's {rows}")
        return KernelMeta.build(starts, [1] * b, pages, [True] * b, page_size, dec_rows=rows,
                                width=width, max_context=max_context, block_n=block_n,
                                pad_tokens=True)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        from runtime import triton_attention as ta  # why: as above, never on the CPU path
        if self.backend == "flashinfer":
            return _flashinfer_attention(self, q, k, v, k_cache, v_cache)
        ta.store_kv(k, v, k_cache, v_cache, self.slots)
        out = torch.empty_like(q)
        if self.decode is not None:
            ta.attend(q, k_cache, v_cache, out, self.decode, per_seq=True)
        if self.chunks is not None:
            ta.attend(q, k_cache, v_cache, out, self.chunks, per_seq=False)
        return out

    def plan_flashinfer(self, packed: PackedMeta, device: torch.device) -> None:
        """FlashInfer's batch prefill wrapper over the paged cache (decodes are 1-token
        queries), planned once per micro-batch and run by every layer. Not testable
        without a GPU and FlashInfer: written against its documented API, untested."""
        import flashinfer
        ln, need, flat, page_off, ctx = packed.flash_args
        qo_indptr = np.concatenate([[0], np.cumsum(ln)])
        kv_indptr = np.concatenate([[0], np.cumsum(need)])
        idx = np.concatenate([flat[o:o + k] for o, k in zip(page_off, need)]) if len(ln) else flat[:0]
        last = ctx - (need - 1) * packed.page_size

        def dev(x: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(x, dtype=np.int32), device=device)

        if device not in _FLASHINFER_WORKSPACE:   # one 128 MiB workspace per device
            _FLASHINFER_WORKSPACE[device] = torch.empty(128 * 2**20, dtype=torch.uint8, device=device)
        wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(_FLASHINFER_WORKSPACE[device],
                                                                 kv_layout="NHD")
        self.flashinfer = (wrapper, (dev(qo_indptr), dev(kv_indptr), dev(idx), dev(last)))


_FLASHINFER_WORKSPACE: dict[torch.device, torch.Tensor] = {}


def _flashinfer_attention(km: KernelMeta, q, k, v, k_cache, v_cache) -> torch.Tensor:
    wrapper, (qo, kv, idx, last) = km.flashinfer
    kv_heads, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kv_heads, d).index_copy_(0, km.slots.long(), k)
    v_cache.view(-1, kv_heads, d).index_copy_(0, km.slots.long(), v)
    if not getattr(wrapper, "_pipetwin_planned", False):
        wrapper.plan(qo, kv, idx, last, q.shape[1], kv_heads, d, k_cache.shape[1],
                     causal=True, q_data_type=q.dtype, kv_data_type=k_cache.dtype)
        wrapper._pipetwin_planned = True
    return wrapper.run(q, (k_cache, v_cache))
