"""The FlashInfer backend's side of the API, on CPU: FlashInfer itself needs a GPU, so a
stand-in module implements what its documentation says `BatchPrefillWithPagedKVCacheWrapper`
computes (CSR page table: qo_indptr, paged_kv_indptr, paged_kv_indices,
paged_kv_last_page_len; NHD cache; causal with the queries aligned to the end of their
keys; GQA), in plain torch. A stage on the flashinfer backend must then give the torch
backend's logits, and plan once per micro-batch with host-side indptrs."""
from __future__ import annotations

import sys
import types
from array import array

import pytest
import torch

from runtime.batch_meta import BatchMeta
from tests.model_helpers import tiny_gqa_stage


class ReferenceWrapper:
    """FlashInfer's BatchPrefillWithPagedKVCacheWrapper as documented, without kernels."""
    made: list["ReferenceWrapper"] = []

    def __init__(self, workspace: torch.Tensor, kv_layout: str = "NHD") -> None:
        assert kv_layout == "NHD" and workspace.dtype == torch.uint8
        self.plans: list[dict] = []
        self.runs = 0
        ReferenceWrapper.made.append(self)

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
             num_qo_heads, num_kv_heads, head_dim, page_size, *, causal=False,
             q_data_type=None, kv_data_type=None) -> None:
        self.plans.append(dict(qo=qo_indptr, kv=paged_kv_indptr, idx=paged_kv_indices,
                               last=paged_kv_last_page_len, heads=num_qo_heads,
                               kv_heads=num_kv_heads, d=head_dim, page=page_size, causal=causal))

    def run(self, q: torch.Tensor, paged_kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        p = self.plans[-1]
        self.runs += 1
        k_cache, v_cache = paged_kv_cache            # [pages, page_size, kv_heads, d]
        group = p["heads"] // p["kv_heads"]
        out = torch.empty_like(q)
        qo, kv, idx, last = (p[k].tolist() for k in ("qo", "kv", "idx", "last"))
        for i in range(len(qo) - 1):
            pages = idx[kv[i]:kv[i + 1]]
            kv_len = (len(pages) - 1) * p["page"] + last[i]
            keys = k_cache[pages].reshape(-1, p["kv_heads"], p["d"])[:kv_len]
            vals = v_cache[pages].reshape(-1, p["kv_heads"], p["d"])[:kv_len]
            qi = q[qo[i]:qo[i + 1]]                     # [qo_len, heads, d]
            qo_len = qi.shape[0]
            keys = keys.repeat_interleave(group, dim=1)
            vals = vals.repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", qi.float(), keys.float()) / p["d"] ** 0.5
            if p["causal"]:   # query j sits at position kv_len - qo_len + j
                allowed = (torch.arange(kv_len)[None, :]
                           <= torch.arange(qo_len)[:, None] + kv_len - qo_len)
                scores = scores.masked_fill(~allowed, float("-inf"))
            out[qo[i]:qo[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vals.float()).to(q.dtype)
        return out


@pytest.fixture
def flashinfer_stand_in(monkeypatch):
    mod = types.ModuleType("flashinfer")
    mod.BatchPrefillWithPagedKVCacheWrapper = ReferenceWrapper
    monkeypatch.setitem(sys.modules, "flashinfer", mod)
    ReferenceWrapper.made = []
    return ReferenceWrapper


def test_flashinfer_backend_gives_the_torch_backends_logits(flashinfer_stand_in):
    model = tiny_gqa_stage()
    # two prompts (one across scattered pages), then a step mixing a decode with a second
    # chunk of a third prompt on top of its first (prior context: the causal alignment)
    steps = [([0, 0, 0], [9, 18, 20], [[0], [3, 1], [5, 2]], [True, True, False]),
             ([9, 20], [1, 13], [array("i", [0]), array("i", [5, 2, 4])], [True, True])]
    outs = {}
    for backend in ("torch", "flashinfer"):
        kv = model.make_kv_cache(6, 16)
        gen = torch.Generator().manual_seed(1)
        logits = []
        for starts, lens, pages, samples in steps:
            ids = torch.randint(0, 101, (sum(lens),), generator=gen)
            meta = BatchMeta.build(starts, lens, pages, samples, 16, backend=backend)
            logits.append(model(ids, meta, kv))
        outs[backend] = logits
    for a, b in zip(outs["torch"], outs["flashinfer"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # one wrapper per micro-batch, planned once (by the first layer), run by every layer
    assert len(flashinfer_stand_in.made) == 2
    for w in flashinfer_stand_in.made:
        assert len(w.plans) == 1 and w.runs == model.cfg.num_layers
        plan = w.plans[0]
        assert plan["causal"] and (plan["heads"], plan["kv_heads"], plan["d"], plan["page"]) == (4, 2, 16, 16)
        assert all(plan[k].device.type == "cpu" and plan[k].dtype == torch.int32 for k in ("qo", "kv", "last"))
    second = flashinfer_stand_in.made[1].plans[0]
    assert second["qo"].tolist() == [0, 1, 14] and second["kv"].tolist() == [0, 1, 4]   # 33 keys: 3 pages
    assert second["idx"].tolist() == [0, 5, 2, 4] and second["last"].tolist() == [10, 1]
