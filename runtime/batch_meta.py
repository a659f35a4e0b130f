"""Per-micro-batch attention metadata, built once and shared by every layer of a stage:
`BatchMeta` (positions, KV slots, sampled rows) with either the torch path's plan
(prefill `Chunk`s, the decode plan of runtime/decode_plan.py) or, for the kernel backends
(attention_backend triton / flashinfer, for GPUs), `KernelMeta`: the same batch as a few
int32 tensors, built with numpy (no per-row Python but the page lists' concatenation),
packed in one buffer copied to the device once (`PackedMeta`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Sequence

import numpy as np
import torch

from core.batch import MicroBatch
from runtime.decode_plan import DecodePlan, plan_decodes
from runtime.kernel_layout import bucket_rows, bucket_width, num_splits, staging

@dataclass(slots=True)
class Chunk:
    offset: int              # index of the chunk's first token in the packed batch
    num_tokens: int
    start: int               # position of that token (KV already held before it)
    pages: torch.Tensor | None   # [pages covering start + num_tokens]; None if consecutive
    first_page: int          # the first of them (read in place when consecutive)
    mask: torch.Tensor | None  # [num_tokens, context] bool; None when start == 0 (causal)


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


def _flat_pages(pages: Sequence[Sequence[int]], total: int) -> np.ndarray:
    """Every item's page ids end to end. The runtime's requests keep theirs as array('i')
    (runtime.stage0_loop.page_list): one join, a memcpy each; Python lists go id by id."""
    try:
        joined = b"".join(pages)            # TypeError for Python lists
    except TypeError:
        joined = b""
    if len(joined) == 4 * total:            # 4-byte ids (array('i')), not 8-byte ones
        return np.frombuffer(joined, dtype=np.int32)
    return np.fromiter(chain.from_iterable(pages), dtype=np.int64, count=total)


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


_ALIGN = 4   # int32 elements: 16 bytes


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

    def offsets(self) -> list[int]:
        """Where each segment starts in the array, then its length: every segment on 16
        bytes. Triton specializes a kernel on each pointer argument's 16-byte alignment, so
        segments packed end to end would compile a new variant for every alignment
        pattern the micro-batches' sizes happen to give (seconds each on a GPU)."""
        out, at = [], 0
        for n in self.sizes():
            out.append(at)
            at += -(-n // _ALIGN) * _ALIGN
        return out + [at]

    def views(self, buf: torch.Tensor) -> "BatchMeta":
        offs = self.offsets()
        parts = [buf[o:o + n] for o, n in zip(offs, self.sizes())]
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


@dataclass(slots=True)
class KernelMeta:
    slots: torch.Tensor                 # [T] int32 flat cache slot per token (-1 = padding)
    decode: KernelLaunch | None
    chunks: KernelLaunch | None
    backend: str = "triton"
    flashinfer: "FlashInferStep | None" = None   # its wrapper and page table

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
        flat = _flat_pages(pages, int(have.sum()))
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
        offs = packed.offsets()
        host = np.zeros(offs[-1], dtype=np.int32)
        seg = iter([host[o:o + n] for o, n in zip(offs, packed.sizes())])
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
            total = int(nr.sum())
            first = np.cumsum(nr) - nr               # each row's first page among those written
            rank = np.arange(total)
            dst = rank + np.repeat(np.arange(k) * width - first, nr)
            if total == flat.size and k == n:         # every item, each holding just its pages
                table[dst] = flat                     # (a decode-only step): no gather
            else:
                table[dst] = flat[rank + np.repeat(page_off[rows] - first, nr)]

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
        queries): its CSR page table, made once per micro-batch and planned by the first
        layer (plan wants the head counts), run by every layer. The indptr arrays stay in
        host memory: plan reads them on the host, and a device copy would make it wait for
        the GPU to drain, on a stage's metadata thread while the compute thread works. Run
        on CPU only against a reference of FlashInfer's documented semantics
        (tests/test_flashinfer_plumbing.py): no GPU build of FlashInfer was at hand."""
        import flashinfer
        ln, need, flat, page_off, ctx = packed.flash_args
        qo_indptr = np.concatenate([[0], np.cumsum(ln)])
        kv_indptr = np.concatenate([[0], np.cumsum(need)])
        idx = np.concatenate([flat[o:o + k] for o, k in zip(page_off, need)]) if len(ln) else flat[:0]
        last = ctx - (need - 1) * packed.page_size

        def host(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int32))

        if device not in _FLASHINFER_WORKSPACE:   # one 128 MiB workspace per device
            _FLASHINFER_WORKSPACE[device] = torch.empty(128 * 2**20, dtype=torch.uint8, device=device)
        wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(_FLASHINFER_WORKSPACE[device],
                                                                 kv_layout="NHD")
        indices = host(idx)
        if device.type == "cuda":   # pinned, so the copy does not wait for the GPU to drain
            indices = indices.pin_memory().to(device, non_blocking=True)
        self.flashinfer = FlashInferStep(wrapper, host(qo_indptr), host(kv_indptr), indices, host(last))


@dataclass(slots=True)
class FlashInferStep:
    """A micro-batch's FlashInfer wrapper and page table (indptrs on the host)."""
    wrapper: object
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    last_page_len: torch.Tensor
    planned: bool = False


_FLASHINFER_WORKSPACE: dict[torch.device, torch.Tensor] = {}


def _flashinfer_attention(km: KernelMeta, q, k, v, k_cache, v_cache) -> torch.Tensor:
    step = km.flashinfer
    kv_heads, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kv_heads, d).index_copy_(0, km.slots.long(), k)
    v_cache.view(-1, kv_heads, d).index_copy_(0, km.slots.long(), v)
    if not step.planned:
        step.wrapper.plan(step.qo_indptr, step.kv_indptr, step.kv_indices, step.last_page_len,
                          q.shape[1], kv_heads, d, k_cache.shape[1],
                          causal=True, q_data_type=q.dtype, kv_data_type=k_cache.dtype)
        step.planned = True
    return step.wrapper.run(q, (k_cache, v_cache))
