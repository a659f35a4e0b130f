"""`pipetwin bench serve` against a live `server` (the real AsyncLLM, pp = 2, a tiny random
Llama) on a loopback port: every request finishes with its length, the results folder is
`pipetwin bench`'s (tables load back, summary.json from core.metrics), the requests are the
core workload's, and user errors exit 2 naming the flag. No timing is asserted.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from core.metrics import summarize  # noqa: E402
from core.trace import Trace  # noqa: E402
from twin import bench_serve  # noqa: E402
from twin.results import write_results  # noqa: E402
from twin.workload import workload_requests  # noqa: E402
from cli.main import main  # noqa: E402
from runtime.online import AsyncLLM  # noqa: E402
from server.app import ServerOptions, build_app  # noqa: E402
from server.serve import ServerThread  # noqa: E402

CFG = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=128, vocab_size=256, max_position_embeddings=256, initializer_range=0.1)
WORKLOAD = {"num_requests": 24, "arrival": {"kind": "gamma", "rate": 40.0, "burstiness": 0.5},
            "prompt_len": {"kind": "uniform", "low": 4, "high": 40},
            "output_len": {"kind": "uniform", "low": 2, "high": 20}}


@pytest.fixture(scope="module")
def server():
    engine = AsyncLLM(dict(CFG), pp=2, num_pages=48, page_size=8, policy="sarathi", policy_params={"budget": 64})
    try:
        info = {"pp": 2, "policy": "sarathi", "policy_params": {"budget": 64}, "source_model": "dummy:tiny"}
        with ServerThread(build_app(engine, model_name="tiny", info=info)) as srv:
            yield srv
    finally:
        engine.shutdown()


def test_load_generator_against_the_live_server(server, tmp_path):
    trace, outcomes = bench_serve.run(server.url, WORKLOAD, seed=3, max_concurrency=16)
    reqs = workload_requests(WORKLOAD, 3)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok][:3]
    assert [(o.prompt_len, o.max_output) for o in outcomes] == [(r.prompt_len, r.max_output) for r in reqs]
    assert [len(o.token_times) for o in outcomes] == [r.max_output for r in reqs]   # ignore_eos: exact
    assert trace.meta["pp"] == 2 and trace.meta["policy"] == "sarathi" and trace.meta["source"] == "server"
    assert set(trace.batches["stage"]) == {0, 1} and len(trace.samples) > 0
    s = summarize(trace, {"ttft": 10.0, "tpot": 10.0})
    assert s["finished"] == 24 and s["unfinished"] == 0 and s["goodput_rps"] == s["throughput_rps"] > 0
    assert s["output_tps"] > 0 and 0 <= s["bubble_ratio"] <= 1 and s["itl_p50"] >= 0
    text = bench_serve.report(s, outcomes, {"ttft": 10.0})
    for line in ("Successful requests:", "Mean TTFT (ms):", "Median TPOT (ms):", "P99 ITL (ms):",
                 "P99 E2E (ms):", "Goodput (req/s)"):
        assert line in text
    out = write_results(tmp_path / "r", trace, s, {"url": server.url})
    back = Trace.load(out)
    assert len(back.requests) == 24 and len(back.tokens) == sum(r.max_output for r in reqs)
    assert (out / "perfetto.json").is_file() and (out / "summary.json").is_file()


def test_cli_bench_serve_writes_the_bench_results_folder(server, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["bench", "serve", "--url", server.url, "--rate", "inf", "--num-requests", "12", "--input-len", "16",
               "--output-len", "6", "--range-ratio", "0.5", "--seed", "1", "--ttft-slo", "60000", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "Serving Benchmark Result" in printed and "Successful requests:                            12" in printed
    for f in ("requests.csv", "batches.csv", "tokens.csv", "samples.csv", "meta.json", "summary.json",
              "config.yaml", "perfetto.json"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] == 12 and summary["goodput_rps"] == summary["throughput_rps"]
    tr = Trace.load(out)
    assert tr.requests["prompt_len"].between(8, 24).all() and tr.requests["max_output"].between(3, 9).all()
    assert (tr.requests["output_len"] == tr.requests["max_output"]).all()


def test_cli_bench_serve_user_errors(server, tmp_path, capsys):
    def err(*argv: str) -> str:
        with pytest.raises(SystemExit) as e:
            main(["bench", "serve", *argv])
        assert e.value.code == 2
        return capsys.readouterr().err

    assert "--url" in err("--rate", "1")                                    # required
    assert "--rate must be" in err("--url", server.url, "--rate", "fast")
    assert "--max-concurrency" in err("--url", server.url, "--max-concurrency", "0")
    assert "--tpot-slo" in err("--url", server.url, "--tpot-slo", "-1")
    assert "cannot reach" in err("--url", "http://127.0.0.1:9", "--num-requests", "1", "--input-len", "4",
                                 "--output-len", "2")
    assert "--model 'nope'" in err("--url", server.url, "--model", "nope", "--num-requests", "1")
    assert "max_model_len" in err("--url", server.url, "--num-requests", "2", "--input-len", "300",
                                  "--output-len", "2")


def test_cli_bench_serve_replays_a_trace(server, tmp_path):
    trace_csv = tmp_path / "t.csv"
    rows = [(0.0, 12, 3), (0.05, 30, 5), (0.05, 7, 1), (0.2, 20, 8), (0.21, 16, 2)]
    trace_csv.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                         + "".join(f"{a},{p},{d}\n" for a, p, d in rows))
    out = tmp_path / "replay"
    assert main(["bench", "serve", "--url", server.url, "--trace", str(trace_csv), "--max-concurrency", "2",
                 "--out", str(out)]) == 0
    tr = Trace.load(out)
    assert list(zip(tr.requests["prompt_len"], tr.requests["max_output"], tr.requests["output_len"])) == \
        [(p, d, d) for _, p, d in rows]


def test_bench_serve_sends_the_servers_api_key(tmp_path, capsys):
    """A server started with --api-key: without the key bench serve stops with an error naming
    --api-key; with it every request is served."""
    engine = AsyncLLM(dict(CFG), pp=1, num_pages=48, page_size=8)
    try:
        app = build_app(engine, model_name="tiny", options=ServerOptions(api_key="s3cret"))
        with ServerThread(app) as srv:
            small = {**WORKLOAD, "num_requests": 4}
            with pytest.raises(bench_serve.ServeBenchError, match="--api-key"):
                bench_serve.run(srv.url, small, seed=1)
            with pytest.raises(bench_serve.ServeBenchError, match="--api-key"):
                bench_serve.run(srv.url, small, seed=1, api_key="wrong")
            trace, outcomes = bench_serve.run(srv.url, small, seed=1, api_key="s3cret")
            assert len(outcomes) == 4 and all(o.ok for o in outcomes)
            assert [len(o.token_times) for o in outcomes] == [r.max_output for r in workload_requests(small, 1)]
    finally:
        engine.shutdown()
