"""The sampler's batched draws: one uniform per row from a counter-based hash, then the
inverse CDF (runtime.sampling). The uniform must be the hash it says (checked against
numpy's well-defined uint64 arithmetic); draws must follow the softmax (and top-k /
top-p's renormalized one), advance per request, and never use a generator per row."""
from __future__ import annotations

import numpy as np
import torch

from runtime.sampling import FAILED, Sampler, SamplingParams, row_uniforms

M64 = (1 << 64) - 1


def _mix_ref(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def test_row_uniforms_are_the_documented_hash():
    seeds = [0, 1, -1, -2**63, 2**63 - 1, 123456789]
    draws = [0, 0, 5, 1, 2**40, 3]
    with np.errstate(over="ignore"):
        key = _mix_ref((np.array(draws, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15))
        key = _mix_ref(_mix_ref(key ^ np.array([s & M64 for s in seeds], dtype=np.uint64)))
    want = ((key >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0 ** 53
    got = row_uniforms(torch.tensor(seeds), torch.tensor(draws)).numpy()
    assert np.array_equal(got, want) and ((got > 0) & (got < 1)).all()


def _first_draws(logits_row: torch.Tensor, params: SamplingParams, n: int) -> np.ndarray:
    """The first token of `n` different requests that share one logit row."""
    s = Sampler(seed=11)
    return np.array(s.sample(logits_row.expand(n, -1).clone(), list(range(n)), params))


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_draws_follow_the_softmax_and_its_top_k_top_p_restrictions():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20_000
    for temp in (1.0, 0.5):
        p = torch.softmax(logits / temp, -1).numpy()
        counts = np.bincount(_first_draws(logits, SamplingParams(temperature=temp), n), minlength=6)
        assert _chi2(counts, p) < 20.5          # 5 degrees of freedom, p = 0.001
    p = torch.softmax(logits, -1).numpy()
    counts = np.bincount(_first_draws(logits, SamplingParams(temperature=1.0, top_k=2), n), minlength=6)
    assert counts[2:].sum() == 0 and _chi2(counts[:2], p[:2] / p[:2].sum()) < 10.8   # 1 dof
    # top_p 0.8: tokens 0..2 hold 0.561, 0.206, 0.125 of the mass; the ones above token 2
    # cover 0.767 < 0.8, so it stays, and token 3 (0.892 above it) goes
    counts = np.bincount(_first_draws(logits, SamplingParams(temperature=1.0, top_p=0.8), n), minlength=6)
    assert counts[3:].sum() == 0 and _chi2(counts[:3], p[:3] / p[:3].sum()) < 13.8   # 2 dof


def test_each_request_advances_its_own_draws_and_release_restarts_them():
    logits = torch.zeros(1, 1000)                # uniform: 1000 tokens, repeats are unlikely
    s = Sampler()
    hot = SamplingParams(temperature=1.0, seed=5)
    seq = [s.sample(logits, [7], hot)[0] for _ in range(5)]
    assert len(set(seq)) == 5
    s.release(7)
    assert [s.sample(logits, [7], hot)[0] for _ in range(5)] == seq
    # two requests with one seed draw the same stream; the row order does not matter
    s2 = Sampler()
    pair = [s2.sample(logits.expand(2, -1), [1, 2], hot) for _ in range(3)]
    assert [a for a, _ in pair] == [b for _, b in pair] == seq[:3]


def test_no_generator_per_row_and_failures_stay_per_row(monkeypatch):
    def no_generator(*a, **k):
        raise AssertionError("the sampler must not build a torch.Generator per request")
    monkeypatch.setattr(torch, "Generator", no_generator)
    logits = torch.randn(4, 30, generator=None)
    logits[1] = float("nan")
    logits[2, 3] = 3e38                          # finite, overflows once divided by 1e-3
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1e-3), SamplingParams()]
    out = Sampler().sample(logits, [0, 1, 2, 3], params)
    assert out[1] == FAILED and out[2] == FAILED
    assert 0 <= out[0] < 30 and out[3] == int(logits[3].argmax())
