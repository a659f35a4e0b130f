"""Stage 0's host work per micro-batch on the kernel path (benchmarks/host_step.py times
it): the runtime's requests keep page ids as array('i') so a step's lists join by memcpy;
the metadata must be exactly what Python lists give, whatever the batch shape."""
from __future__ import annotations

from array import array

import numpy as np
import pytest
import torch

from core.policies import make_policy
from core.request import Request
from core.scheduler import Scheduler, SchedulerConfig
from runtime.batch_meta import BatchMeta, KernelMeta, _flat_pages
from runtime.cuda_graphs import GraphRunner, GraphStep
from runtime.stage0_loop import page_list, step_meta
from tests.helpers import drive, make_requests


def _pages(rng: np.random.Generator, counts: list[int], typecode: str | None) -> list:
    out, nxt = [], 0
    for k in counts:
        ids = [int(x) for x in rng.permutation(4 * k)[:k] + nxt]   # scattered, not consecutive
        nxt += 4 * k
        out.append(array(typecode, ids) if typecode else ids)
    return out


@pytest.mark.parametrize("shape", ["decode_only", "chunks_only", "mixed", "extra_pages_held"])
def test_array_pages_build_the_same_metadata_as_lists(shape):
    rng = np.random.default_rng(3)
    if shape == "decode_only":
        starts, lens = [0, 15, 16, 200, 1023], [1] * 5
    elif shape == "chunks_only":
        starts, lens = [0, 40, 300], [37, 64, 5]
    else:
        starts, lens = [7, 0, 99, 300, 31], [1, 50, 1, 17, 1]
    need = [-(-(s + n) // 16) for s, n in zip(starts, lens)]
    held = [k + 2 for k in need] if shape == "extra_pages_held" else need   # the gather path
    samples = [True, False, True, True, False][:len(starts)]
    lists = _pages(rng, held, None)
    arrays = [array("i", p) for p in lists]
    a = KernelMeta.build(starts, lens, lists, samples, 16)
    b = KernelMeta.build(starts, lens, arrays, samples, 16)
    assert a.sizes() == b.sizes() and np.array_equal(a.host, b.host)
    # and the table holds each row's pages, in order, read from the list form
    meta = a.views(torch.from_numpy(a.host))
    for launch, rows in ((meta.kernel.decode, [i for i, n in enumerate(lens) if n == 1]),
                         (meta.kernel.chunks, [i for i, n in enumerate(lens) if n != 1])):
        for j, i in enumerate(rows):
            assert launch.table[j, :need[i]].tolist() == lists[i][:need[i]]
    if all(n == 1 for n in lens):
        g1 = KernelMeta.build_decode_graph(starts, lists, 16, rows=8, width=128, max_context=2048)
        g2 = KernelMeta.build_decode_graph(starts, arrays, 16, rows=8, width=128, max_context=2048)
        assert np.array_equal(g1.host, g2.host)


def test_flat_pages_takes_only_4_byte_ids_as_bytes():
    big = [array("q", [1, 2**40]), array("q", [3])]        # 8-byte ids: not reinterpreted
    assert _flat_pages(big, 3).tolist() == [1, 2**40, 3]
    assert _flat_pages([array("i", [5, 6]), array("i", [])], 2).tolist() == [5, 6]
    assert _flat_pages([[5, 6], [7]], 3).tolist() == [5, 6, 7]
    assert _flat_pages([], 0).size == 0


def test_preemption_keeps_the_runtime_page_list_kind():
    # pp=1, 3 pages of 4 tokens: two requests fill the cache and one must be preempted.
    s = Scheduler(SchedulerConfig(1, 3, 4), make_policy("sarathi", {"budget": 64}))
    a, b = make_requests([(4, 4), (4, 4)])
    a.pages, b.pages = page_list(), page_list()
    drive(s, [a, b])
    assert a.preemptions + b.preemptions >= 1
    assert type(a.pages) is array and type(b.pages) is array   # freed to an empty array, not a list


def _runtime_scheduler(n: int, prompt: int, ps: int = 4) -> tuple[Scheduler, list[Request]]:
    s = Scheduler(SchedulerConfig(1, 10_000, ps), make_policy("token_throttling", {}))
    reqs = [Request(i, prompt + i, 50, prompt_ids=list(range(100 + i, 100 + i + prompt + i)), pages=page_list())
            for i in range(n)]
    for r in reqs:
        s.add(r, 0.0)
    return s, reqs


def test_step_meta_hands_own_page_lists_and_metadata_survives_the_next_schedule():
    ps = 4
    s, reqs = _runtime_scheduler(5, 6, ps)
    b = s.next_batch(0.0)                        # prefill of every prompt
    m, ids = step_meta(b, {}, True, [], ps)
    assert ids == [t for r in reqs for t in r.prompt_ids]
    assert all(p is r.pages for p, r in zip(m.pages, reqs))   # exact: no copy
    s.complete(b, 0.0, [7] * b.num_samples)
    b = s.next_batch(0.0)                        # decodes: each reads its prompt + token 7
    m, ids = step_meta(b, {}, True, [], ps)
    assert ids == [7] * 5 and m.lens == [1] * 5 and m.starts == [r.prompt_len for r in reqs]
    before = KernelMeta.build(m.starts, m.lens, m.pages, m.samples, ps).host.copy()
    s.complete(b, 0.0, [8] * 5)
    s.next_batch(0.0)                            # the lists grow (a page each at a boundary)
    assert any(len(p) > -(-(st + 1) // ps) for p, st in zip(m.pages, m.starts))
    after = KernelMeta.build(m.starts, m.lens, m.pages, m.samples, ps).host
    assert np.array_equal(before, after)         # only the pages the pass reads count


def test_graph_runner_takes_decode_steps_to_graphs_and_others_eager():
    gr = GraphRunner(None, None, 16, "triton", "cpu", enforce_eager=False, max_context=256, capture=False)
    pages = [array("i", range(k)) for k in (1, 2, 16)]
    step = gr.build_meta([3, 20, 255], [1, 1, 1], pages, [True] * 3)
    assert isinstance(step, GraphStep) and step.rows == 4 and step.num_rows == 3
    assert step.sample_rows.tolist() == [0, 1, 2]
    # a context past the captured width (256 tokens) or a chunk: eager
    assert isinstance(gr.build_meta([256], [1], [array("i", range(17))], [True]), BatchMeta)
    assert isinstance(gr.build_meta([0, 20], [4, 1], pages[:2], [True, True]), BatchMeta)


def test_step_meta_pickles_array_pages_as_one_buffer_and_builds_the_same():
    import pickle

    from runtime.comm import PageRows, StepMeta
    rng = np.random.default_rng(5)
    starts, lens = [0, 40, 15, 300], [37, 64, 1, 1]
    need = [-(-(s + n) // 16) for s, n in zip(starts, lens)]
    arrays = [array("i", p) for p in _pages(rng, need, None)]
    m = StepMeta(7, starts, lens, arrays, [True, False, True, True], 101, 2, [1, 3, 4])
    back = pickle.loads(pickle.dumps(("batch", m), protocol=pickle.HIGHEST_PROTOCOL))[1]
    assert isinstance(back.pages, PageRows) and len(back.pages) == 4
    assert [list(p) for p in back.pages] == [list(p) for p in arrays]
    assert (back.batch_id, back.starts, back.lens, back.sample_ids) == (7, starts, lens, [1, 3, 4])
    for backend in ("triton", "torch"):   # the kernel metadata, and the CPU path's plan
        a = BatchMeta.build(starts, lens, arrays, m.samples, 16, backend=backend)
        b = BatchMeta.build(back.starts, back.lens, back.pages, back.samples, 16, backend=backend)
        for name in ("positions", "slots", "sample_idx"):
            assert torch.equal(getattr(a, name), getattr(b, name))
        if backend == "triton":
            assert torch.equal(a.kernel.decode.table, b.kernel.decode.table)
            assert torch.equal(a.kernel.chunks.table, b.kernel.chunks.table)
        else:
            assert [c.first_page for c in a.chunks] == [c.first_page for c in b.chunks]
            assert a.describe_decode() == b.describe_decode()
    # Python lists (the profiler's, tests') travel as they are; a packed meta pickles again
    lists = StepMeta(1, [0], [4], [[3, 4]], [True], 4, 0, [0])
    assert pickle.loads(pickle.dumps(lists)).pages == [[3, 4]]
    assert [list(p) for p in pickle.loads(pickle.dumps(back)).pages] == [list(p) for p in arrays]


def test_page_rows_index_like_a_list():
    from runtime.comm import PageRows
    rows = PageRows(array("i", [1, 2, 3, 4, 5, 6]).tobytes(), [2, 0, 4])
    assert [list(r) for r in rows] == [[1, 2], [], [3, 4, 5, 6]]
    assert list(rows[-1]) == [3, 4, 5, 6] and list(rows[0][:1]) == [1]
    assert [list(r) for r in rows[1:]] == [[], [3, 4, 5, 6]]
    with pytest.raises(IndexError):
        rows[3]
    with pytest.raises(IndexError):
        rows[-4]
    with pytest.raises(ValueError, match="page counts sum to 7, the buffer holds 6 ids"):
        PageRows(array("i", [1, 2, 3, 4, 5, 6]).tobytes(), [2, 1, 4])
