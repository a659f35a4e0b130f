"""Issue 18, a pipeline that fails under the server (pp = 2, a tiny dummy Llama, the byte
fallback): a killed stage process. Clients get a short reason and a 503 (a stream its
error event), never a traceback, path, pid or port; /health says so; /metrics shows the
engine down and no frozen running/KV values. No timing is asserted.
"""
from __future__ import annotations

import json
import logging
import re
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from runtime.online import AsyncLLM  # noqa: E402
from server.app import build_app  # noqa: E402
from server.serve import ServerThread  # noqa: E402

NAME = "tiny"
CFG = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=128, vocab_size=320, max_position_embeddings=512, initializer_range=0.1)
# what must never reach a client: tracebacks, source paths, pids, ports
LEAKS = re.compile(r"Traceback|File \"|\.py\b|/\w+/|pid|port|\bline \d+", re.I)


def wait_until(cond, what: str, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def stage_pids(server_pid: int) -> list[int]:
    """The spawned stage processes of a server process (children running spawn_main)."""
    from pathlib import Path

    out = []
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) if d.name.isdigit() else -1
            if ppid == server_pid and b"spawn_main" in (d / "cmdline").read_bytes():
                out.append(int(d.name))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(out)


def assert_clean(message: str) -> None:
    assert len(message) < 200 and not LEAKS.search(message), message


def test_killed_stage_clean_errors_health_and_metrics(caplog):
    engine = AsyncLLM(dict(CFG), pp=2, num_pages=64, page_size=8)
    try:
        with ServerThread(build_app(engine, model_name=NAME)) as srv, httpx.Client(timeout=60) as c:
            url = srv.url
            body = {"model": NAME, "prompt": [5] * 20, "max_tokens": 480, "ignore_eos": True, "stream": True}
            with caplog.at_level(logging.ERROR, logger="pipetwin.server"):
                with c.stream("POST", f"{url}/v1/completions", json=body) as r:
                    lines = r.iter_lines()
                    assert next(lines).startswith("data: {")
                    wait_until(lambda: metrics(url)["pipetwin_kv_cache_used_pages"] > 0, "pages in use")
                    engine.engine._procs[1].kill()
                    rest = [line for line in lines if line.startswith("data: ")]
                assert rest[-1] == "data: [DONE]"
                event = json.loads(rest[-2][len("data: "):])
                assert event["error"]["code"] == "engine_dead"
                assert_clean(event["error"]["message"])
                h = c.get(url + "/health")
                assert h.status_code == 503 and h.json()["status"] == "error"
                assert "stage" in h.json()["error"]["message"]
                assert_clean(h.json()["error"]["message"])
                r = c.post(f"{url}/v1/completions", json={**body, "stream": False})
                assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
                assert_clean(r.json()["error"]["message"])
                m = metrics(url)
            # the full cause, pids included, is in the server log, once
            logged = [r.getMessage() for r in caplog.records if "engine is down" in r.getMessage()]
            assert len(logged) == 1 and "pid" in logged[0]
            assert m["pipetwin_engine_healthy"] == 0 and m["pipetwin_engine_failures_total"] == 1
            assert m["pipetwin_kv_cache_used_pages"] == 0 and m["pipetwin_num_requests_running"] == 0
            assert m['pipetwin_http_requests_total{endpoint="completions",status="503"}'] == 1
            assert m['pipetwin_http_requests_total{endpoint="health",status="503"}'] >= 1
    finally:
        engine.shutdown()


def test_exit_mode_stops_the_server_non_zero(tmp_path):
    """`pipetwin serve` (default --on-engine-failure exit): a killed stage ends the process
    with status 1 (for a process supervisor to restart), the cause in its log."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "experiments.cli", "serve", "--model", "dummy:" + json.dumps(CFG), "--pp", "2",
           "--num-pages", "32", "--port", str(port), "--log-level", "warning"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.HTTPError:
                assert proc.poll() is None, log.read_text()
                return False
        wait_until(up, "the server is up", 120)
        os.kill(max(stage_pids(proc.pid)), signal.SIGKILL)
        assert proc.wait(60) == 1
        text = log.read_text()
        assert "engine is down" in text and "exiting (--on-engine-failure exit)" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
