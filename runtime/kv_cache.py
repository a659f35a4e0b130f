"""Paged KV cache of one stage and its sizing.

Every stage holds K/V for its own layers only, indexed by the page ids of the one page
table shared by the whole pipeline (core.kv_cache.PageAllocator). Token `pos` of a
request lives in slot `pages[pos // page_size] * page_size + pos % page_size`.
"""
from __future__ import annotations

import torch

# Pages "fitting" a stage that holds no attention (only an MLP half, e.g. the middle stage
# of 1.5,0.5,2): it stores no KV, so the other stages decide (stage 0 always holds some).
NO_KV_LIMIT = 2**31 - 1


def kv_bytes_per_page(page_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype) -> int:
    """Bytes one page takes on a stage holding the attention (K and V) of `num_layers`
    layers; with half-layer splits that is not the stage's split entry (see
    runtime.config.kv_layers)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * page_size * num_kv_heads * head_dim * itemsize


def pages_that_fit(memory_bytes: int, page_size: int, num_layers: int, num_kv_heads: int,
                   head_dim: int, dtype: torch.dtype) -> int:
    """Pages a stage can hold in `memory_bytes`. The pipeline uses the minimum over stages
    so that one page table fits every stage."""
    per_page = kv_bytes_per_page(page_size, num_layers, num_kv_heads, head_dim, dtype)
    if per_page == 0:   # only an MLP half on this stage: no KV, so no limit from it
        return NO_KV_LIMIT
    return max(0, int(memory_bytes) // per_page)


class KVCache:
    """Tensor [layers, 2 (K, V), num_pages, page_size, kv_heads, head_dim]."""

    __slots__ = ("data", "num_pages", "page_size")

    def __init__(self, num_pages: int, page_size: int, num_layers: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # zeros, not empty: padded decode rows read unused slots, and masked garbage that
        # happens to be NaN would still poison the softmax (NaN * 0 is NaN).
        self.data = torch.zeros(num_layers, 2, num_pages, page_size, num_kv_heads, head_dim,
                                dtype=dtype, device=device)

    @property
    def num_layers(self) -> int:
        return self.data.shape[0]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of local layer i, each [num_pages, page_size, kv_heads, head_dim]."""
        return self.data[i, 0], self.data[i, 1]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
