"""benchmarks/saturation_headroom.py: the bounds it reports must be bounds."""
import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def headroom_module():
    return load_benchmark("saturation_headroom")


@pytest.fixture
def small_trace(tmp_path):
    # Output lengths deliberately out of order, with a tie (40, ids 1 and 4).
    rows = [(0.0, 300, 12), (0.5, 120, 40), (1.0, 800, 5), (1.5, 64, 90), (2.0, 500, 40), (2.5, 200, 7)]
    path = tmp_path / "trace.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                    + "".join(f"{t},{p},{o}\n" for t, p, o in rows))
    return str(path), rows


def test_longest_output_first_orders_by_output_then_trace_order(headroom_module, small_trace):
    path, rows = small_trace
    workload = {"trace": path, "arrival": {"kind": "all_at_once", "rate": "inf"}}
    reqs = headroom_module.longest_output_first(workload)
    assert [r.id for r in reqs] == list(range(len(rows)))
    assert all(r.arrival == 0.0 for r in reqs)
    # (prompt, output) pairs travel together; the tie keeps the trace's order (120 before 500)
    assert [(r.prompt_len, r.max_output) for r in reqs] == [(64, 90), (120, 40), (500, 40), (300, 12),
                                                           (200, 7), (800, 5)]


@pytest.mark.parametrize("order", ["arrival", "longest-output-first"])
def test_the_reported_bounds_hold_on_the_run_itself(headroom_module, small_trace, order):
    path, rows = small_trace
    r = headroom_module.headroom("qwen2.5-14b_a100-80gb_pp4", "token_throttling", {"maxp": 256},
                                 path, len(rows), order)
    assert r["policy"].endswith("(oracle: longest output first)") == (order == "longest-output-first")
    # Lower bounds on the makespan cannot exceed it: no schedule beats the longest request's
    # own trips, nor the busiest stage's work.
    assert 0 < r["longest output alone"] <= 1
    assert 0 < r["busiest stage busy"] <= 1 and r["no idle: gain"] >= 0
    assert 0 <= r["bubble"] < 1 and r["decode-only tail"] > 0


def test_a_replayed_trace_keeps_its_arrivals(headroom_module, small_trace):
    path, rows = small_trace
    at_once = headroom_module.headroom("qwen2.5-14b_a100-80gb_pp4", "token_throttling", {"maxp": 256}, path, None)
    replayed = headroom_module.headroom("qwen2.5-14b_a100-80gb_pp4", "token_throttling", {"maxp": 256}, path, None,
                                        rate_scale=0.5)
    # At half speed the last request arrives at 5 s, so the run cannot be as short as with all at t=0.
    assert replayed["req/s"] < at_once["req/s"] and replayed["req/s"] < len(rows) / 5.0


@pytest.mark.parametrize("text, value", [("all", None), ("7", 7)])
def test_limit_takes_a_count_or_all(headroom_module, text, value):
    assert headroom_module.limit_arg(text) == value


@pytest.mark.parametrize("text", ["0", "-3", "most"])
def test_a_bad_limit_names_the_flag(headroom_module, text):
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="--limit"):
        headroom_module.limit_arg(text)


@pytest.mark.parametrize("order, rate_scale, named", [("shortest-first", None, "order must be one of"),
                                                     ("longest-output-first", 2.0, "rate_scale")])
def test_an_order_it_cannot_run_is_an_error(headroom_module, small_trace, order, rate_scale, named):
    path, rows = small_trace
    with pytest.raises(ValueError, match=named):
        headroom_module.headroom("qwen2.5-14b_a100-80gb_pp4", "token_throttling", {}, path, None, order, rate_scale)
