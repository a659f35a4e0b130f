"""CUDA-graph decode steps, on CPU: bucketing, padding and the static-buffer path
(GraphRunner with capture=False runs exactly what a graph would replay, eagerly),
against the torch backend's eager forward."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from runtime.attention import KernelMeta  # noqa: E402
from runtime.config import ModelConfig  # noqa: E402
from runtime.cuda_graphs import GraphStep, GraphRunner, graph_buckets  # noqa: E402
from runtime.model import StageModel  # noqa: E402

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="the gpu extra (triton) is not installed")
CFG = ModelConfig(model_type="llama", hidden_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, intermediate_size=96, vocab_size=101)


def test_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(20) == [1, 2, 4, 8, 16, 32]
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]


def test_decode_graph_padding():
    """3 rows padded to 4: the padding token sits at position 0, writes no K/V (slot -1)
    and attends nothing (query length 0); all 4 rows "sample"."""
    packed = KernelMeta.build_decode_graph([4, 20, 0], [[7], [3, 5], [9]], 16, rows=4, width=8,
                                           max_context=128)
    meta = packed.views(torch.from_numpy(packed.host))
    assert meta.num_tokens == 4
    assert meta.positions.tolist() == [4, 20, 0, 0]
    assert meta.slots.tolist() == [7 * 16 + 4, 5 * 16 + 4, 9 * 16, -1]
    assert meta.sample_idx.tolist() == [0, 1, 2, 3]
    d = meta.kernel.decode
    assert d.q_lens.tolist() == [1, 1, 1, 0] and d.seq_lens.tolist() == [5, 21, 1, 0]
    assert d.table.shape == (4, 8) and d.table[1, :2].tolist() == [3, 5]
    # the split follows rows and max_context only: what the capture saw
    empty = KernelMeta.build_decode_graph([], [], 16, rows=4, width=8, max_context=128)
    assert empty.dec_splits == packed.dec_splits and empty.host.size == packed.host.size
    with pytest.raises(ValueError, match="5 decode rows, more than the graph's 4"):
        KernelMeta.build_decode_graph([1] * 5, [[0]] * 5, 16, rows=4, width=8, max_context=128)


def test_which_steps_take_a_graph():
    model = StageModel(CFG)
    kv = model.make_kv_cache(8, 16)
    r = GraphRunner(model, kv, 16, "triton", "cpu", enforce_eager=False, max_rows=8, max_context=64)
    assert r.buckets == [1, 2, 4, 8] and r.width == 4
    assert r.graph_rows([1, 1, 1], [10, 20, 30]) == 4
    assert r.graph_rows([1, 2], [10, 20]) is None              # a prefill chunk: eager
    assert r.graph_rows([1] * 9, [10] * 9) is None             # past the largest bucket
    assert r.graph_rows([1], [65]) is None                     # past the captured width
    assert not GraphRunner(model, kv, 16, "triton", "cpu").use_graphs        # CPU default: eager
    assert not GraphRunner(model, kv, 16, "torch", "cpu", enforce_eager=False).use_graphs
    assert not GraphRunner(model, kv, 16, "triton", "cpu", enforce_eager=True).use_graphs


def _init(model: StageModel) -> None:
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@needs_triton
@pytest.mark.parametrize("pp,max_context", [(1, 64), (2, 64), (2, 1024)])
def test_static_path_matches_eager(pp, max_context):
    """Prefill two prompts eagerly, then three decode steps of the graph path (3 rows in
    a bucket of 4, one row not sampling) on both stages of a pp=2 split: the same
    logits as the torch backend's eager forward, and the same KV cache. With a model
    context of 1024 the graph's table is 64 pages wide and a step fills only the 4 it
    needs (the other columns are left as they were)."""
    stages = [StageModel(CFG, s, pp) for s in range(pp)]
    for m in stages:
        _init(m)
    prompts = [[5, 9, 2, 7, 1], [3] * 19, [8, 8]]
    pages = [[2], [0, 5], [7]]
    results = []
    for backend in ("torch", "triton"):
        kvs = [m.make_kv_cache(8, 16) for m in stages]
        runners = [GraphRunner(m, kv, 16, backend, "cpu", enforce_eager=backend == "torch",
                               capture=False, max_rows=8, max_context=max_context)
                   for m, kv in zip(stages, kvs)]
        starts = [0, 0, 0]
        lens = [len(p) for p in prompts]
        ids = torch.tensor([t for p in prompts for t in p])
        logits = []
        for step in range(4):
            samples = [True, step != 2, True]
            x = ids
            for r in runners:
                meta = r.build_meta(starts, lens, pages, samples)
                assert isinstance(meta, GraphStep) == (step > 0 and backend == "triton")
                x = r.forward(x, meta)
            logits.append(x)
            ids = x.argmax(-1)
            if step == 2:   # the middle row did not sample: feed it a fixed token
                ids = torch.tensor([ids[0].item(), 4, ids[1].item()])
            starts = [s + n for s, n in zip(starts, lens)]
            lens = [1, 1, 1]
        results.append((logits, [kv.data.clone() for kv in kvs], runners[-1]))
    (ref, ref_kv, _), (out, out_kv, runner) = results
    assert runner.replays == 3 and runner.eager_steps == 1
    for a, b in zip(ref, out):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(ref_kv, out_kv):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_triton
def test_stage_captures_every_bucket_at_start(monkeypatch):
    """StageRunner.allocate makes every bucket's graph (here: its static buffers) before
    the first step, largest first (the shared pool is sized by the largest), with inputs
    of the stage's kind: a capture later, on a stage's compute thread, would race the
    Inbox thread's uploads of prefill metadata."""
    from runtime import worker
    from runtime.llm import build_engine_config
    tiny = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 128,
            "max_position_embeddings": 256, "torch_dtype": "float32"}
    opts, _, _ = build_engine_config(tiny, pp=2, attention_backend="triton")
    made = []

    class Runner(GraphRunner):     # graphs on, as on CUDA; capture=False: buffers only
        def __init__(self, *a, **kw):
            super().__init__(*a, **dict(kw, enforce_eager=False, capture=False))
            self.order = []
            made.append(self)

        def _ensure(self, rows, example):
            self.order.append(rows)
            return super()._ensure(rows, example)
    monkeypatch.setattr(worker, "GraphRunner", Runner)
    for stage in (0, 1):
        r = worker.StageRunner(opts, stage)
        r.allocate(16)
        g = made[-1]
        assert g.order == sorted(graph_buckets(256), reverse=True) and len(g.order) == 20
        static_in = g._static[1][2]
        if stage == 0:
            assert static_in.dtype == torch.long and static_in.shape == (1,)
        else:
            assert [x.shape for x in static_in] == [(1, 64), (1, 64)]
            assert all(x.dtype == torch.float32 for x in static_in)


def test_staging_waits_on_the_copy_stream_of_its_device(monkeypatch):
    """The pinned buffer's 'copy done' event is recorded on the stream of the device the
    copy went to, not the thread's current device's (a stage on cuda:1 builds metadata
    on a thread whose current device is cuda:0), and waited for before reuse."""
    from runtime.kernel_layout import _Staging
    log = []

    class Event:
        def record(self, stream=None):
            log.append(("record", stream))

        def synchronize(self):
            log.append(("synchronize",))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    st = _Staging(torch.device("cuda", 1))
    st.buf = torch.zeros(4096, dtype=torch.int32)     # stands in for the pinned buffer
    dst = torch.zeros(8, dtype=torch.int32)           # stands in for a graph's static buffer
    host = np.arange(8, dtype=np.int32)
    st.upload_into(host, dst)
    st.upload_into(host + 1, dst)
    assert log == [("record", "stream of cuda:1"), ("synchronize",), ("record", "stream of cuda:1")]
    assert dst.tolist() == list(range(1, 9))


def test_staging_fills_only_the_columns_a_step_uses():
    """A decode step's table narrower than the graph's: the head and the first columns are
    written, the other columns keep their old values (never read: a row reads only its
    seq_len's pages); a table that cannot fit is an error, not a silent truncation."""
    from runtime.kernel_layout import _Staging
    st = _Staging(torch.device("cpu"))
    dst = torch.full((3 + 2 * 8,), -7, dtype=torch.int32)      # head 3, table [2, 8]
    host = np.arange(3 + 2 * 4, dtype=np.int32)                # head 3, table [2, 4]
    st.upload_rows_into(host, dst, 3, 2, 4, 8)
    assert dst[:3].tolist() == [0, 1, 2]
    assert dst[3:].view(2, 8).tolist() == [[3, 4, 5, 6, -7, -7, -7, -7], [7, 8, 9, 10, -7, -7, -7, -7]]
    st.upload_rows_into(np.arange(3 + 16, dtype=np.int32) + 100, dst, 3, 2, 8, 8)   # full width: one copy
    assert dst.tolist() == list(range(100, 119))
    with pytest.raises(ValueError, match=r"a \[2, 16\] table after 3 ints does not fit a \[2, 8\] one"):
        st.upload_rows_into(np.zeros(3 + 32, dtype=np.int32), dst, 3, 2, 16, 8)
