import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.request import Request
from core.distributions import (
    Arrival, Empirical, Fixed, LogNormal, Uniform, all_at_once, constant_arrivals, gamma_arrivals,
    length_from_dict, poisson_arrivals,
)
from core.trace_file import read_trace
from core.workloads import Workload, default_workload

CONV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "traces" / "azure_conv_2023.csv"
if not CONV.exists():
    CONV = Path("/work/shared/data/traces/azure_conv_2023.csv")


def rng(seed=0):
    return np.random.default_rng(seed)


def cv(x):
    x = np.asarray(x, dtype=float)
    return x.std() / x.mean()


def close(a, b, rel=0.03):
    return a == pytest.approx(b, rel=rel)


# ---------------------------------------------------------------- arrivals

@pytest.mark.parametrize("burstiness, want_cv", [(1.0, 1.0), (0.25, 2.0), (4.0, 0.5)])
def test_gamma_gaps_have_mean_1_over_rate_and_cv_1_over_sqrt_shape(burstiness, want_cv):
    t = gamma_arrivals(200_000, 4.0, burstiness, rng())
    gaps = np.diff(t)
    assert t[0] == 0.0 and len(t) == 200_000
    assert close(gaps.mean(), 0.25)
    assert close(cv(gaps), want_cv)


def test_poisson_is_gamma_shape_1():
    t = poisson_arrivals(100_000, 10.0, rng(1))
    assert close(np.diff(t).mean(), 0.1) and close(cv(np.diff(t)), 1.0)
    assert np.array_equal(t, gamma_arrivals(100_000, 10.0, 1.0, rng(1)))


def test_constant_and_infinite_rates():
    assert np.allclose(constant_arrivals(5, 2.0), [0, 0.5, 1.0, 1.5, 2.0])
    for kind in ("poisson", "gamma", "constant", "all_at_once"):
        times = Arrival(kind, float("inf")).times(100, rng())
        assert times.shape == (100,) and not times.any()
    assert not gamma_arrivals(10, math.inf, 0.25, rng()).any()
    assert not all_at_once(3).any()
    assert Arrival("gamma", "inf").rate == math.inf


@given(kind=st.sampled_from(["poisson", "gamma", "constant"]),
       rate=st.floats(0.01, 1e4), n=st.integers(0, 50), seed=st.integers(0, 2**32))
@settings(max_examples=60, deadline=None)
def test_arrivals_start_at_zero_and_never_decrease(kind, rate, n, seed):
    t = Arrival(kind, rate, 0.5 if kind == "gamma" else 1.0).times(n, rng(seed))
    assert len(t) == n
    if n:
        assert t[0] == 0.0 and np.all(np.diff(t) >= 0)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(rate=-1), "arrival.rate must be > 0 or 'inf', got -1"),
    (dict(rate=0), "arrival.rate must be > 0 or 'inf', got 0"),
    (dict(rate="fast"), "arrival.rate must be > 0 or 'inf', got 'fast'"),
    (dict(rate=float("nan")), "arrival.rate must be > 0 or 'inf'"),
    (dict(rate=1, burstiness=0), "arrival.burstiness must be a finite number > 0, got 0"),
    (dict(kind="poisson", rate=1, burstiness=2), "arrival.burstiness applies only to kind 'gamma'"),
    (dict(kind="all_at_once", rate=3), "arrival.rate must be 'inf' for kind 'all_at_once'"),
    (dict(kind="poison", rate=1), "did you mean 'poisson'?"),
])
def test_arrival_validation(kwargs, msg):
    with pytest.raises(ValueError) as e:
        Arrival(**kwargs)
    assert msg in str(e.value)


# ---------------------------------------------------------------- lengths

def test_fixed_and_uniform():
    assert np.array_equal(Fixed(128).sample(4, rng()), [128] * 4)
    x = Uniform(3, 7).sample(100_000, rng())
    assert x.dtype == np.int64 and set(np.unique(x)) == {3, 4, 5, 6, 7}
    assert close(x.mean(), 5.0, rel=0.01)
    assert np.array_equal(Uniform(9, 9).sample(3, rng()), [9, 9, 9])


@pytest.mark.parametrize("mean, spread", [(1000, 0.5), (1155, 0.96), (211, 0.771), (5000, 2.0)])
def test_lognormal_matches_requested_mean_and_cv(mean, spread):
    x = LogNormal(mean, spread).sample(400_000, rng(2))
    assert x.dtype == np.int64 and x.min() >= 1
    tol = 0.03 if spread < 1.5 else 0.08   # the sample std of a heavy tail converges slowly
    assert close(x.mean(), mean, rel=0.02)
    assert close(cv(x), spread, rel=tol)


def test_lognormal_clipping_and_zero_spread():
    x = LogNormal(300, 2.0, min=16, max=512).sample(50_000, rng())
    assert x.min() == 16 and x.max() == 512
    assert np.array_equal(LogNormal(42, 0).sample(5, rng()), [42] * 5)


def test_empirical_samples_with_replacement_from_values():
    dist = Empirical(np.array([1, 10, 10, 100]))
    assert dist.values == (1, 10, 10, 100)
    x = dist.sample(100_000, rng())
    assert set(np.unique(x)) == {1, 10, 100}
    assert close((x == 10).mean(), 0.5, rel=0.02)


@given(dist=st.one_of(
    st.builds(Fixed, st.integers(1, 10_000)),
    st.integers(1, 5000).flatmap(lambda lo: st.builds(Uniform, st.just(lo), st.integers(lo, 10_000))),
    st.builds(LogNormal, st.floats(1, 4000), st.floats(0, 5), st.just(1), st.just(4096)),
    st.builds(Empirical, st.lists(st.integers(1, 9999), min_size=1, max_size=20).map(tuple)),
), n=st.integers(0, 200), seed=st.integers(0, 2**32))
@settings(max_examples=80, deadline=None)
def test_lengths_are_ints_at_least_one(dist, n, seed):
    x = dist.sample(n, rng(seed))
    assert x.shape == (n,) and x.dtype == np.int64
    assert np.all(x >= 1)
    if isinstance(dist, LogNormal):
        assert np.all(x <= dist.max)


@pytest.mark.parametrize("make, msg", [
    (lambda: Fixed(0), "fixed.value must be an integer >= 1, got 0"),
    (lambda: Fixed(2.5), "fixed.value must be an integer >= 1, got 2.5"),
    (lambda: Uniform(5, 4), "uniform.high must be an integer >= 5, got 4"),
    (lambda: LogNormal(0.5, 1), "lognormal.mean must be a finite number >= 1, got 0.5"),
    (lambda: LogNormal(100, -1), "lognormal.spread must be a finite number >= 0, got -1"),
    (lambda: LogNormal(100, 1, min=0), "lognormal.min must be an integer >= 1, got 0"),
    (lambda: LogNormal(100, 1, min=8, max=4), "lognormal.max must be an integer >= 8, got 4"),
    (lambda: LogNormal(2000, 1, max=1024), "lognormal.mean must be within [min, max] = [1, 1024]"),
    (lambda: Empirical([]), "empirical.values must be a non-empty list"),
    (lambda: Empirical([3, 0]), "empirical.values[1] must be an integer >= 1, got 0"),
])
def test_length_validation(make, msg):
    with pytest.raises(ValueError) as e:
        make()
    assert msg in str(e.value)


# ---------------------------------------------------------------- workload

def test_workload_is_deterministic_per_seed():
    w = default_workload(rate=4.0, num_requests=500, seed=7)
    a, b = w.requests(), w.requests()
    key = lambda rs: [(r.id, r.prompt_len, r.max_output, r.arrival) for r in rs]
    assert key(a) == key(b)
    assert all(isinstance(r, Request) for r in a) and [r.id for r in a] == list(range(500))
    c = default_workload(rate=4.0, num_requests=500, seed=8).requests()
    assert [r.arrival for r in a] != [r.arrival for r in c]
    assert [r.prompt_len for r in a] != [r.prompt_len for r in c]


def test_streams_are_independent():
    base = dict(num_requests=300, seed=3, arrival=Arrival("poisson", 2.0), prompt_len=Fixed(10))
    a = Workload(**base, output_len=Fixed(5)).requests()
    b = Workload(**base, output_len=LogNormal(200, 1.0)).requests()
    assert [r.arrival for r in a] == [r.arrival for r in b]


def test_default_workload_is_shaped_like_azure_conv():
    rs = default_workload(rate=5.5, num_requests=100_000, seed=0).requests()
    prompts = np.array([r.prompt_len for r in rs])
    outputs = np.array([r.max_output for r in rs])
    arrivals = np.array([r.arrival for r in rs])
    assert close(prompts.mean(), 1155, rel=0.02) and prompts.max() <= 8192
    assert close(outputs.mean(), 211, rel=0.02) and outputs.max() <= 2048
    assert 0.85 < cv(prompts) < 1.0 and close(cv(outputs), 0.771, rel=0.05)
    assert close(np.diff(arrivals).mean(), 1 / 5.5) and close(cv(np.diff(arrivals)), 1.0)
    assert not any(r.arrival for r in default_workload(num_requests=10).requests())


SPEC = {"num_requests": 2000, "seed": 0,
        "arrival": {"kind": "gamma", "rate": 4.0, "burstiness": 1.0},
        "prompt_len": {"kind": "lognormal", "mean": 1155, "spread": 1.0, "max": 8192},
        "output_len": {"kind": "fixed", "value": 128}}


def test_from_dict_and_round_trip():
    w = Workload.from_dict(SPEC)
    assert w.arrival == Arrival("gamma", 4.0, 1.0)
    assert w.prompt_len == LogNormal(1155, 1.0, max=8192) and w.output_len == Fixed(128)
    rs = w.requests()
    assert len(rs) == 2000 and {r.max_output for r in rs} == {128}
    for x in (w, default_workload(), default_workload(rate=2, burstiness=0.5),
              Workload(3, Arrival("all_at_once"), Uniform(1, 4), Empirical((5, 6)), seed=2)):
        assert Workload.from_dict(x.to_dict()) == x
    assert default_workload().to_dict()["arrival"]["rate"] == "inf"
    assert Workload.from_dict({**SPEC, "arrival": {"rate": "inf"}}).arrival.rate == math.inf


@pytest.mark.parametrize("spec, msgs", [
    ({**SPEC, "arival": {}}, ["unknown key 'arival'", "did you mean 'arrival'?", "allowed keys:"]),
    ({**SPEC, "prompt_len": {"kind": "lognormal", "mean": 9, "spread": 1, "mx": 99}},
     ["unknown key 'mx' in prompt_len", "did you mean 'max'?"]),
    ({**SPEC, "arrival": {"kind": "gamma", "rate": 1, "burstyness": 2}}, ["'burstyness'", "'burstiness'"]),
    ({**SPEC, "output_len": {"kind": "lognormel", "mean": 9, "spread": 1}},
     ["output_len.kind must be one of", "did you mean 'lognormal'?"]),
    ({**SPEC, "output_len": {"value": 3}}, ["output_len.kind must be one of fixed, uniform"]),
    ({**SPEC, "output_len": {"kind": "uniform", "low": 3}}, ["output_len.high is required"]),
    ({**SPEC, "arrival": {"kind": "gamma", "rate": -1}}, ["arrival.rate must be > 0 or 'inf', got -1"]),
    ({**SPEC, "prompt_len": {"kind": "lognormal", "mean": 0, "spread": 1}},
     ["prompt_len.mean must be a finite number >= 1, got 0"]),
    ({**SPEC, "output_len": {"kind": "fixed", "value": 0}}, ["output_len.value must be an integer >= 1, got 0"]),
    ({**SPEC, "num_requests": 0}, ["num_requests must be an integer >= 1, got 0"]),
    ({**SPEC, "seed": -3}, ["seed must be an integer >= 0, got -3"]),
    ({k: v for k, v in SPEC.items() if k != "output_len"}, ["output_len is required"]),
    ({**SPEC, "limit": 10}, ["limit applies only to a trace workload"]),
    ({"trace": "x.csv", "num_requests": 5}, ["num_requests does not apply to a trace workload; use limit"]),
    ({"trace": "x.csv", "time_scale": 2, "rate_scale": 2}, ["not both"]),
    ({"trace": "x.csv", "time_scale": 0.5, "arrival": {"rate": 3}}, ["arrival section replaces"]),
])
def test_from_dict_errors(spec, msgs):
    with pytest.raises(ValueError) as e:
        Workload.from_dict(spec)
    for m in msgs:
        assert m in str(e.value)


def test_length_from_dict_default_prefix():
    assert length_from_dict({"kind": "empirical", "values": [4, 5]}) == Empirical((4, 5))
    with pytest.raises(ValueError, match=r"^length\.value must be"):
        length_from_dict({"kind": "fixed", "value": -2})


# ---------------------------------------------------------------- trace reader

needs_trace = pytest.mark.skipif(not CONV.exists(), reason=f"{CONV} not present")


@needs_trace
def test_read_real_conv_trace():
    tr = read_trace(CONV)
    assert len(tr) == 19_366 and tr.clipped_outputs == 0
    assert tr.arrivals[0] == 0 and np.all(np.diff(tr.arrivals) >= 0)
    assert tr.arrivals[-1] == pytest.approx(3502, abs=1)
    assert tr.prompt_lens.mean() == pytest.approx(1154.7, abs=0.1)
    assert tr.output_lens.mean() == pytest.approx(211.1, abs=0.1)
    assert tr.prompt_lens.min() >= 1 and tr.output_lens.min() >= 1
    assert close(cv(tr.prompt_lens), 0.960, rel=0.005) and close(cv(tr.output_lens), 0.771, rel=0.005)

    fast = read_trace(CONV, time_scale=0.5)
    assert np.allclose(fast.arrivals, tr.arrivals * 0.5)
    assert np.allclose(read_trace(CONV, rate_scale=2.0).arrivals, fast.arrivals)

    part = read_trace(CONV, start=100, limit=1000)
    assert len(part) == 1000 and part.arrivals[0] == 0
    assert np.allclose(part.arrivals, tr.arrivals[100:1100] - tr.arrivals[100])
    assert np.array_equal(part.prompt_lens, tr.prompt_lens[100:1100])
    with pytest.raises(ValueError, match="not both"):
        read_trace(CONV, time_scale=0.5, rate_scale=2.0)
    with pytest.raises(ValueError, match="start must be < the number of data rows"):
        read_trace(CONV, start=19_366)


@needs_trace
def test_trace_workloads():
    w = Workload.from_dict({"trace": str(CONV), "time_scale": 1.0, "start": 0, "limit": 1000})
    rs = w.requests()
    tr = read_trace(CONV, limit=1000)
    assert len(rs) == 1000 and rs[0].arrival == 0
    assert [r.prompt_len for r in rs] == tr.prompt_lens.tolist()
    assert [r.max_output for r in rs] == tr.output_lens.tolist()
    assert [r.arrival for r in rs] == tr.arrivals.tolist()
    assert Workload.from_dict(w.to_dict()) == w

    sweep = Workload.from_dict({"trace": str(CONV), "limit": 1000, "arrival": {"rate": "inf"},
                                "output_len": {"kind": "fixed", "value": 64}}).requests()
    assert [r.prompt_len for r in sweep] == tr.prompt_lens.tolist()
    assert {r.max_output for r in sweep} == {64} and not any(r.arrival for r in sweep)


def write(tmp_path, text, name="t.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


HEADER = "arrived_at,num_prefill_tokens,num_decode_tokens\n"


@pytest.mark.parametrize("body, line, column, what", [
    ("arrived_at,num_prefill_tokens\n0,5\n", 1, "num_decode_tokens", "missing column"),
    (HEADER + "0,5,5\nabc,5,5\n", 3, "arrived_at", "not a number: 'abc'"),
    (HEADER + "-1,5,5\n", 2, "arrived_at", "must be >= 0"),
    (HEADER + "0,5,5\n2,5,5\n2,5,5\n1.5,5,5\n", 5, "arrived_at", "earlier than the previous row's 2"),
    (HEADER + "0,5,5\ninf,5,5\n", 3, "arrived_at", "must be finite"),
    (HEADER + "0,5,5\n1,0,5\n", 3, "num_prefill_tokens", "must be >= 1, got 0"),
    (HEADER + "0,5,5\n1,x,5\n", 3, "num_prefill_tokens", "not an integer: 'x'"),
    (HEADER + "0,5,-1\n", 2, "num_decode_tokens", "must be >= 0, got -1"),
    (HEADER + "0,5,3.5\n", 2, "num_decode_tokens", "not an integer: '3.5'"),
    (HEADER + "0,5,5\n\n1,5\n", 4, "num_decode_tokens", "missing value"),
])
def test_malformed_trace_errors_name_file_line_and_column(tmp_path, body, line, column, what):
    p = write(tmp_path, body)
    with pytest.raises(ValueError) as e:
        read_trace(p)
    msg = str(e.value)
    assert str(p) in msg and f"line {line}," in msg and f"column '{column}'" in msg and what in msg


def test_trace_edge_cases(tmp_path):
    with pytest.raises(ValueError, match="empty file"):
        read_trace(write(tmp_path, ""))
    with pytest.raises(ValueError, match="no data rows"):
        read_trace(write(tmp_path, HEADER))
    # extra columns, other column order, equal times, integral floats, a later bad row past `limit`
    p = write(tmp_path, "num_decode_tokens,id,arrived_at,num_prefill_tokens\n"
                        "3,a,10,7\n4,b,10,8.0\n5,c,12.5,9\n6,d,oops,9\n")
    tr = read_trace(p, limit=3)
    assert tr.arrivals.tolist() == [0, 0, 2.5]
    assert tr.prompt_lens.tolist() == [7, 8, 9] and tr.output_lens.tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="line 5"):
        read_trace(p)
    with pytest.raises(ValueError, match=r"assignment destination is read-only"):
        tr.arrivals[0] = 1.0


def test_zero_outputs_are_raised_to_one_with_a_warning(tmp_path):
    p = write(tmp_path, HEADER + "0,5,0\n1,5,3\n2,5,0\n")
    with pytest.warns(UserWarning, match=r"2 of 3 kept rows have num_decode_tokens = 0; raised to 1"):
        tr = read_trace(p)
    assert tr.output_lens.tolist() == [1, 3, 1] and tr.clipped_outputs == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_trace(p, start=1, limit=1).clipped_outputs == 0


def test_core_stays_free_of_simpy_and_torch():
    import subprocess
    code = "import sys, core.workloads; print(any(m in sys.modules for m in ('simpy', 'torch', 'pandas')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    assert out.stdout.strip() == "False"
