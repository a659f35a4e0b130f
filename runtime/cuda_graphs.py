"""One stage's forward passes, with CUDA graphs for decode-only micro-batches.

Eager PyTorch on a GPU is launch-bound at small batches (~0.65 ms per layer at one row
on an H200, issue 14): a decode step is a few hundred small kernels. As nano-vllm and
vLLM do, the stage captures its forward once per bucketed row count (1, 2, 4, 8, 16,
then multiples of 16, see runtime.kernel_layout.bucket_rows) over static input and
metadata buffers, and replays the graph: the step's metadata is copied into the
bucket's buffer (one copy), the inputs into the static inputs, padding rows attend
nothing and write no K/V. Anything else (prefill chunks, more rows than the largest
bucket, a context past the captured table width) runs eagerly. Graphs need the kernel
backend (the torch path's metadata holds Python lists); `enforce_eager` turns them off.
On CPU nothing is captured; `capture=False` runs the same static-buffer path eagerly,
which is how the CPU tests cover the padding and buffer logic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from runtime.batch_meta import BatchMeta, KernelMeta, PackedMeta
from runtime.kernel_layout import bucket_rows, bucket_width, staging


def graph_buckets(max_rows: int) -> list[int]:
    """The row counts graphs are captured at: every bucket_rows value up to max_rows'."""
    out, n = [], 1
    top = bucket_rows(max_rows)
    while True:
        b = bucket_rows(n)
        if b > top:
            return out
        out.append(b)
        n = b + 1


@dataclass(slots=True)
class GraphStep:
    """A decode-only micro-batch bound for the graph of `rows` rows."""
    rows: int
    num_rows: int               # real rows (the first ones)
    sample_rows: np.ndarray     # the real rows that sample
    packed: PackedMeta


class GraphRunner:
    """build_meta(starts, lens, pages, samples) then forward(inputs, meta), as the stage
    ran StageModel; decode-only steps go to a graph when one fits."""

    def __init__(self, model: torch.nn.Module, kv_cache: Any, page_size: int, backend: str,
                 device: torch.device | str, *, enforce_eager: bool | None = None,
                 max_rows: int = 256, max_context: int = 4096, capture: bool | None = None) -> None:
        self.model, self.kv_cache, self.page_size = model, kv_cache, page_size
        self.backend, self.device = backend, torch.device(device)
        on_cuda = self.device.type == "cuda"
        if enforce_eager is None:
            enforce_eager = not on_cuda
        # graphs need the kernel metadata (tensors); the torch path's is Python lists
        self.use_graphs = not enforce_eager and backend == "triton"
        self.capture = on_cuda if capture is None else capture
        self.max_context = max_context
        self.width = bucket_width(-(-max_context // page_size))
        self.buckets = graph_buckets(max_rows) if self.use_graphs else []
        self._graphs: dict[int, Any] = {}      # rows -> torch.cuda.CUDAGraph
        self._static: dict[int, tuple] = {}    # rows -> (meta buffer, meta, inputs, outputs)
        self._pool = None
        self.replays = 0
        self.eager_steps = 0

    # -- which path ---------------------------------------------------------------------
    def graph_rows(self, lens: Sequence[int], contexts: Sequence[int]) -> int | None:
        """The bucket a step runs in, or None (eager): not decode-only, too many rows,
        or a context past the captured width."""
        if not self.use_graphs or not lens or max(lens) != 1 or min(lens) != 1:
            return None
        rows = bucket_rows(len(lens))
        if rows > self.buckets[-1] or max(contexts) > self.width * self.page_size:
            return None
        return rows

    def build_meta(self, starts: Sequence[int], lens: Sequence[int],
                   pages: Sequence[Sequence[int]], samples: Sequence[bool]) -> BatchMeta | GraphStep:
        rows = longest = None
        if self.use_graphs:   # the CPU path pays nothing for graphs
            # decode rows attend their start + 1 keys (a step that is not decode-only goes
            # eager whatever its contexts): no per-row Python on the hot path
            longest = max(starts, default=-1) + 1
            rows = self.graph_rows(lens, (longest,))
        if rows is None:
            self.eager_steps += 1
            return BatchMeta.build(starts, lens, pages, samples, self.page_size, self.device,
                                   backend=self.backend)
        # the table only as wide as this step's longest row needs (bucketed): forward
        # copies those columns into the graph's full-width table, whose other columns are
        # never read (each row reads its seq_len's pages). At the model's full width a step
        # would build and copy rows x max_positions / page_size ids (8 MB at 256 rows of a
        # 128k-context model) whatever its contexts.
        width = bucket_width(-(-longest // self.page_size))
        packed = KernelMeta.build_decode_graph(starts, pages, self.page_size, rows, width,
                                               self.max_context)
        return GraphStep(rows, len(lens), np.flatnonzero(np.asarray(samples, dtype=bool)), packed)

    # -- running -------------------------------------------------------------------------
    @torch.inference_mode()   # static buffers are made, filled and read in one mode
    def forward(self, inputs: Any, meta: BatchMeta | GraphStep) -> Any:
        if isinstance(meta, BatchMeta):
            return self.model(inputs, meta, self.kv_cache)
        buf, static_meta, static_in, _ = self._ensure(meta.rows, inputs)
        p = meta.packed
        table_at = p.offsets()[6]         # decode-only: the page table is the last segment
        staging(self.device).upload_rows_into(p.host, buf, table_at, p.dec_rows, p.width, self.width)
        n = meta.num_rows
        if isinstance(static_in, tuple):
            static_in[0][:n].copy_(inputs[0])
            static_in[1][:n].copy_(inputs[1])
        else:
            static_in[:n].copy_(inputs)
        if self.capture:
            self._graphs[meta.rows].replay()
            out = self._static[meta.rows][3]
        else:   # the same buffers, run eagerly (CPU tests)
            out = self.model(static_in, static_meta, self.kv_cache)
        self.replays += 1
        if isinstance(out, tuple):       # not the last stage: the real rows go on
            return out[0][:n].clone(), out[1][:n].clone()
        if meta.sample_rows.size == n:   # every row samples (decodes do): no index upload
            return out[:n]               # read (sampled) before the next replay, in stream order
        return out.index_select(0, torch.as_tensor(meta.sample_rows, device=out.device))

    def _ensure(self, rows: int, example: Any) -> tuple:
        """The bucket's static buffers (and, on CUDA, its captured graph), made on first
        use: a warm-up run (Triton compiles there), then the capture."""
        if rows in self._static:
            return self._static[rows]
        dummy = KernelMeta.build_decode_graph([], [], self.page_size, rows, self.width,
                                              self.max_context)
        buf = torch.from_numpy(dummy.host).to(self.device)
        meta = dummy.views(buf)
        if isinstance(example, tuple):
            static_in = tuple(torch.zeros(rows, *x.shape[1:], dtype=x.dtype, device=self.device)
                              for x in example)
        else:
            static_in = torch.zeros(rows, dtype=example.dtype, device=self.device)
        out = None
        if self.capture:
            self.model(static_in, meta, self.kv_cache)          # warm-up: compile, allocate
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.model(static_in, meta, self.kv_cache)
            self._pool = graph.pool()
            self._graphs[rows] = graph
        self._static[rows] = (buf, meta, static_in, out)
        return self._static[rows]

    @torch.inference_mode()
    def capture_all(self, example: Any) -> None:
        """Capture every bucket now, largest first (their memory pool is shared and the
        largest sets its size), instead of on first use."""
        for rows in reversed(self.buckets):
            self._ensure(rows, example)
