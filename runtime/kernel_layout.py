"""The kernel backends' bucketed shapes and buffers: rows and page-table widths padded to
few sizes (CUDA graphs are captured at them), the flash-decoding split of long decode
rows, and the pinned staging buffer a micro-batch's metadata crosses to the GPU in."""
from __future__ import annotations

import threading

import numpy as np
import torch

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
        src = self._pinned(host)
        if dst is None:
            dst = src.to(self.device, non_blocking=True)
        else:
            dst[:n].copy_(src, non_blocking=True)
        self._copied()
        return dst

    def upload_rows_into(self, host: np.ndarray, dst: torch.Tensor, head: int, rows: int,
                         width: int, dst_width: int) -> None:
        """`host`, `head` ints then a [rows, width] table, into `dst`, whose table (at the
        same offset) is [rows, dst_width]: the head and the table's first `width` columns.
        The other columns keep what they held."""
        if width == dst_width:
            self.upload_into(host, dst)
            return
        if width > dst_width or host.size != head + rows * width:
            raise ValueError(f"a [{rows}, {width}] table after {head} ints does not fit a "
                             f"[{rows}, {dst_width}] one ({host.size} ints given)")
        src = self._pinned(host)
        dst[:head].copy_(src[:head], non_blocking=True)
        table = dst[head:head + rows * dst_width].view(rows, dst_width)
        table[:, :width].copy_(src[head:].view(rows, width), non_blocking=True)
        self._copied()

    def _pinned(self, host: np.ndarray) -> torch.Tensor:
        """`host` copied into the pinned buffer (grown as needed), once the previous copy
        out of it is done."""
        n = host.size
        if self.buf is None or self.buf.numel() < n:
            self.buf = torch.empty(max(n, 4096, 2 * (0 if self.buf is None else self.buf.numel())),
                                   dtype=torch.int32, pin_memory=self.device.type == "cuda")
        elif self.done is not None:
            self.done.synchronize()
        self.buf[:n].numpy()[:] = host
        return self.buf[:n]

    def _copied(self) -> None:
        if self.device.type == "cuda":
            # the stream the copy went on: the thread's current device may be another GPU
            # (set_device is per thread; a stage's Inbox thread never calls it)
            self.done = torch.cuda.Event()
            self.done.record(torch.cuda.current_stream(self.device))


_STAGING: dict[tuple[torch.device, int], _Staging] = {}


def staging(device: torch.device) -> _Staging:
    """This thread's staging buffer for `device`: a stage builds metadata on its receive
    thread and fills CUDA-graph buffers on its compute thread, so they must not share one."""
    key = (device, threading.get_ident())
    if key not in _STAGING:
        _STAGING[key] = _Staging(device)
    return _STAGING[key]
