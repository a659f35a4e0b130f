"""The capacity search: only sustainable runs count, never above the max throughput, and the
report names the condition that bound each search."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from experiments.capacity import binding_condition, probe_failures, sustain_failures, sustainability
from experiments.config import ConfigError, expand, parse_experiment, probe_config
from experiments.runner import execute, run_sweep

PROFILE = "qwen2.5-32b_a100-80gb_pp4"


def served_in_order(arrival: np.ndarray, service_rate: float, latency) -> pd.DataFrame:
    """Requests admitted in arrival order, at most `service_rate` a second, each with its
    first token 0.1 s and its last `latency` (a number or one per request) after admission."""
    scheduled = np.empty(len(arrival))
    free = 0.0
    for k, a in enumerate(arrival):
        scheduled[k] = free = max(a, free)
        free += 1 / service_rate
    return pd.DataFrame({"arrival": arrival, "first_scheduled": scheduled, "first_token": scheduled + 0.1,
                         "finish": scheduled + latency})


def fifo_server(arrival_rate: float, service_rate: float, n: int = 2000, latency: float = 0.5) -> pd.DataFrame:
    """Requests arriving evenly, served in order (`served_in_order`)."""
    return served_in_order(np.arange(n) / arrival_rate, service_rate, latency)


def test_sustainability_of_a_light_and_an_overloaded_server():
    light = sustainability(fifo_server(4.0, 5.0))
    assert light["steady_offered_rps"] == pytest.approx(4.0, rel=0.005)   # counted over a finite window
    assert light["steady_delivered_rps"] == pytest.approx(4.0, rel=0.005)
    assert light["queue_growth"] == pytest.approx(0.0, abs=0.005)   # 0 or 1 request, sampled
    assert sustain_failures(light, 0.05) == []

    over = sustainability(fifo_server(5.0, 4.0))
    assert over["steady_delivered_rps"] == pytest.approx(4.0, rel=0.005)
    assert over["queue_growth"] == pytest.approx(1 - 4.0 / 5.0, rel=0.02)
    assert [m.split()[0] for m in sustain_failures(over, 0.05)] == ["queue"]
    # all at once: no arrival rate to keep up with, nothing to fail
    assert all(math.isnan(v) for v in sustainability(fifo_server(math.inf, 1.0)).values())


def bursty_server(service_rate: float, latency_of, n: int = 1000, seed: int = 0) -> pd.DataFrame:
    """A server of `service_rate` admissions a second fed a bursty trace (gamma arrivals,
    CV 3, as the Azure traces), each request finishing `latency_of(k)` after admission."""
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.gamma(1 / 9, 9 / 1.0, n))  # rate 1, CV 3
    return served_in_order(arrival, service_rate, np.array([latency_of(k) for k in range(n)]))


def test_a_burst_in_a_light_run_is_not_an_overload():
    """Requests lasting 1-100x the mean arrival gap on gamma (CV 3) arrivals, served with 3x
    headroom: the queue does not grow, and that is what is judged (the delivered rate is
    reported; experiments/capacity.py says why it is not judged)."""
    rng = np.random.default_rng(1)
    lat = rng.lognormal(np.log(10.0), 1.0, 1000)
    for seed in range(5):
        s = sustainability(bursty_server(3.0, lambda k: lat[k], seed=seed))
        assert sustain_failures(s, 0.05) == [], (seed, s)
        assert abs(s["queue_growth"]) < 0.01
        assert s["steady_delivered_rps"] == pytest.approx(s["steady_offered_rps"], rel=0.05)


def test_unfinished_requests_count_as_never_delivered():
    t = fifo_server(4.0, 5.0)
    t.loc[t.index[len(t) // 2:], ["first_scheduled", "first_token", "finish"]] = math.nan
    s = sustainability(t)
    assert s["steady_delivered_rps"] < 0.5 * s["steady_offered_rps"]
    assert s["queue_growth"] > 0.9


def test_prompts_started_but_not_finished_still_count_as_queued():
    """A scheduler that starts every arriving prompt with a small chunk (a per-request chunk
    cap) but finishes prefills at only 4 a second, against 5 arrivals a second: every request
    is "scheduled" on arrival, yet first tokens fall behind. The queue is counted to the first
    token, so this is an overload (measured: `pipetwin tune` chased exactly this, see
    experiments/capacity.py)."""
    t = fifo_server(5.0, 4.0)
    t["first_token"], t["first_scheduled"] = t["first_scheduled"] + 0.1, t["arrival"]
    s = sustainability(t)
    assert s["queue_growth"] == pytest.approx(1 - 4.0 / 5.0, rel=0.02)
    assert [m.split()[0] for m in sustain_failures(s, 0.05)] == ["queue"]


def test_starving_a_few_long_prompts_shows_in_the_queue_of_tokens():
    """A shorter-first server that never reaches one prompt in 25 (10,000 tokens each; the
    others 100): the waiting *count* grows at 4% of arrivals, under the 5% limit, while the
    waiting *work* grows at ~80%. The token-weighted queue fails it (measured on the
    simulator: experiments/capacity.py's docstring)."""
    t = fifo_server(4.0, 5.0)
    t["prompt_len"] = 100
    starved = t.index % 25 == 24
    t.loc[starved, "prompt_len"] = 10_000
    t.loc[starved, ["first_scheduled", "first_token", "finish"]] = math.nan
    s = sustainability(t)
    assert s["queue_growth"] == pytest.approx(0.04, abs=0.005)
    assert s["queue_growth_tokens"] == pytest.approx(10_000 / (24 * 100 + 10_000), rel=0.03)
    assert [m.split(" grows")[0] for m in sustain_failures(s, 0.05)] == ["queue of prompt tokens"]


def test_served_in_order_the_two_queues_agree():
    """First come, first served, equal prompts: the count and the tokens grow alike, both
    when light and when overloaded."""
    for arrival_rate, service_rate in ((4.0, 5.0), (5.0, 4.0)):
        t = fifo_server(arrival_rate, service_rate)
        t["prompt_len"] = 300
        s = sustainability(t)
        assert s["queue_growth_tokens"] == pytest.approx(s["queue_growth"], abs=1e-9)


def test_probe_failures_and_the_binding_condition():
    ok = {"ttft_p99": 1.0, "offered_rps": 3.0, "steady_offered_rps": 3.0, "steady_delivered_rps": 2.99,
          "queue_growth": 0.0}
    assert probe_failures(ok, {"ttft_p99": 2.0}, 0.05, max_rps=3.5) == {}
    fast = {**ok, "offered_rps": 4.0}
    assert list(probe_failures(fast, {"ttft_p99": 2.0}, 0.05, max_rps=3.5)) == ["max_throughput"]
    slow = {**ok, "ttft_p99": 3.0, "queue_growth": 0.2}
    assert list(probe_failures(slow, {"ttft_p99": 2.0}, 0.05)) == ["slo", "sustain"]
    probes = [(1.0, {}), (2.0, {}), (3.0, {"slo": ["ttft_p99=3 > 2"], "sustain": ["x"]}),
              (8.0, {"max_throughput": ["y"]})]
    assert binding_condition(probes, 2.0, 1.0, 8.0) == "slo ttft_p99 + sustainability"
    assert binding_condition([(8.0, {})], 8.0, 1.0, 8.0) == "search range (hi)"
    assert binding_condition([(8.0, {"x": 1}), (1.0, {"max_throughput": ["y"]})], 0.0, 1.0, 8.0) \
        == "below lo: max throughput"


def test_capacity_config_sustain_is_checked():
    d = {"base": {"profile": PROFILE}, "policies": ["sarathi"],
         "capacity": {"slo": {"ttft_p99": 5}, "sustain": 1.5}}
    with pytest.raises(ConfigError, match="capacity.sustain"):
        expand(parse_experiment(d))
    d["capacity"]["sustain"] = 0.1
    assert parse_experiment(d).capacity.sustain == 0.1


def test_an_overloaded_run_meeting_a_loose_slo_is_not_a_capacity(tmp_path):
    # Sarathi with a small budget, 200 requests, a TTFT SLO loose enough that even the
    # highest probe (every run is finite) meets it: by the SLO alone the capacity would be
    # the search's top, 40 req/s, ten times what the policy can serve.
    workload = {"num_requests": 200, "arrival": {"kind": "gamma", "rate": 2.0},
                "prompt_len": {"kind": "lognormal", "mean": 1155, "spread": 0.96, "max": 8192},
                "output_len": {"kind": "lognormal", "mean": 211, "spread": 0.771, "max": 2048}}
    d = {"base": {"profile": PROFILE, "workload": workload}, "grid": {"workload.arrival.rate": [2]},
         "policies": [{"name": "sarathi", "label": "Sarathi 512", "params": {"budget": 512}}],
         "capacity": {"lo": 0.5, "hi": 40, "tol": 0.5, "slo": {"ttft_p99": 30}}, "report": {"plots": []}}
    exp = parse_experiment(d)
    res = run_sweep(exp, tmp_path, workers=1, progress=False, report=False)
    probes = pd.read_csv(tmp_path / "capacity_runs.csv")
    cap = res.capacity.iloc[0]
    # the top probe offers more than the max throughput: failed without being simulated ...
    skipped = probes[probes["workload.arrival.rate"] == 40].iloc[0]
    assert not skipped["simulated"] and skipped["failed"] == "max_throughput"
    assert skipped["offered_rps"] > 10 * cap["max_throughput_rps"]
    # ... simulated, it meets the SLO (the old capacity) and is plainly not sustainable
    top = execute(probe_config(expand(exp)[0], "workload.arrival.rate", 40))
    assert top["ttft_p99"] <= 30 and top["unfinished"] == 0 and top["rejected"] == 0
    assert top["offered_rps"] == skipped["offered_rps"]
    assert list(probe_failures(top, exp.capacity.slo, 0.05)) == ["sustain"]
    assert top["steady_delivered_rps"] < 0.5 * top["steady_offered_rps"]
    assert 0 < cap["capacity_rps"] <= cap["max_throughput_rps"]
    assert cap["bound"] in ("max throughput", "sustainability", "max throughput + sustainability")
    assert set(probes.loc[~probes["meets"], "failed"]) <= {"max_throughput", "sustain"}


def test_capacity_progress_bar_ends_full(tmp_path, monkeypatch):
    # The bar's total is the most runs a search could take; a bisection that stops early
    # gives its unused probes back, so the bar ends at 100%, not at e.g. 24/27.
    import tqdm

    bars = []

    class Recorded(tqdm.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            bars.append(self)

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    workload = {"num_requests": 80, "arrival": {"kind": "poisson", "rate": 1.0},
                "prompt_len": {"kind": "lognormal", "mean": 1155, "spread": 0.96, "max": 8192},
                "output_len": {"kind": "lognormal", "mean": 211, "spread": 0.771, "max": 2048}}
    d = {"base": {"profile": PROFILE, "workload": workload},
         "grid": {"workload.arrival.rate": [1]},
         "policies": ["token_throttling", {"name": "sarathi", "params": {"budget": 512}}],
         "capacity": {"lo": 0.5, "hi": 2, "tol": 0.1, "slo": {"ttft_p99": 30}}, "report": {"plots": []}}
    exp = parse_experiment(d)
    run_sweep(exp, tmp_path, workers=2, progress=True, report=False, log=lambda s: None)
    cap_bar = next(b for b in bars if b.desc == "capacity")
    most = 2 * (exp.capacity.probes() + 1)
    runs = len(pd.read_csv(tmp_path / "capacity_runs.csv")) + 2   # + the max-throughput runs
    assert runs < most   # the case that left the bar short
    assert cap_bar.n == cap_bar.total == runs
