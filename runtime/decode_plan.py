"""How the torch path attends a micro-batch's single-token items (decodes, 1-token prefill
chunks): each row's keys cut into in-place runs of consecutive pages and a gathered tail,
tails of similar length batched into padded groups by a small dynamic program. Built once
per micro-batch (BatchMeta.build) and read by every layer (runtime/attention.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

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
