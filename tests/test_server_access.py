"""Issue 18 defect 6, who may call the server: an API key on /v1/* (the pipetwin API
included) and the docs, /health and /metrics open; the docs and the pipetwin API can be
switched off; the Host header check that stops DNS rebinding against a loopback server;
the `pipetwin serve` flags that set these, and the start-up warning for an exposed
server without a key.
"""
from __future__ import annotations

import argparse

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from runtime.online import AsyncLLM  # noqa: E402
from server.access import LOOPBACK_HOSTS, host_name  # noqa: E402
from server.app import ServerOptions, build_app  # noqa: E402
from server.serve import (API_KEY_ENV, ServerThread, add_arguments, check_args, exposure_warning,  # noqa: E402
                          server_options)

NAME = "tiny"
KEY = "sk-test-4d1f"
CFG = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
           intermediate_size=64, vocab_size=300, max_position_embeddings=128, initializer_range=0.1)


@pytest.fixture(scope="module")
def engine():
    e = AsyncLLM(dict(CFG), pp=1, num_pages=16, page_size=8)
    yield e
    e.shutdown()


def serve(engine, **options) -> ServerThread:
    return ServerThread(build_app(engine, model_name=NAME, options=ServerOptions(**options)))


def status(url: str, path: str, key: str | None = None, **headers) -> int:
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return httpx.get(url + path, headers=headers).status_code


PROTECTED = ["/v1/models", "/v1/pipetwin/info", "/v1/pipetwin/stats", "/v1/pipetwin/stage_rows", "/docs",
             "/openapi.json", "/redoc"]


def test_api_key_guards_v1_and_the_docs(engine):
    with serve(engine, api_key=KEY) as srv:
        for path in PROTECTED:
            assert status(srv.url, path) == 401, path
            assert status(srv.url, path, "wrong") == 401, path
            assert status(srv.url, path, KEY) == 200, path
        r = httpx.get(srv.url + "/v1/pipetwin/info", headers={"authorization": f"Basic {KEY}"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
        # an unknown path under /v1 says nothing before the key is checked
        assert status(srv.url, "/v1/elsewhere") == 401 and status(srv.url, "/v1/elsewhere", KEY) == 404
        for path in ("/health", "/metrics", "/"):
            assert status(srv.url, path) == 200, path
        # the OpenAI client sends the key as a Bearer token
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        r = good.completions.create(model=NAME, prompt=[1, 2, 3], max_tokens=2, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
        text = httpx.get(srv.url + "/metrics").text
        assert 'pipetwin_http_requests_total{endpoint="pipetwin",status="401"}' in text
    with serve(engine) as srv:   # no key: open, as before
        assert all(status(srv.url, p) == 200 for p in PROTECTED)


def test_docs_and_the_pipetwin_api_can_be_switched_off(engine):
    with serve(engine, disable_docs=True, disable_pipetwin_api=True) as srv:
        for path in PROTECTED[1:]:
            assert status(srv.url, path) == 404, path
        assert status(srv.url, "/v1/models") == 200


def test_host_header_check(engine):
    assert host_name("LocalHost:8000") == "localhost" and host_name("[::1]:80") == "::1"
    assert host_name("127.0.0.1") == "127.0.0.1" and host_name("::1") == "::1"
    with serve(engine, allowed_hosts=LOOPBACK_HOSTS) as srv:
        assert status(srv.url, "/health") == 200     # httpx sends Host: 127.0.0.1:port
        for host in ("localhost:1234", "[::1]:1", "localhost"):
            assert status(srv.url, "/v1/models", host=host) == 200, host
        r = httpx.get(srv.url + "/v1/models", headers={"host": "attacker.example:8000"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
        assert status(srv.url, "/health", host="rebind.attacker.example") == 400


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p, str)
    return p.parse_args(["--model", "dummy:llama-32m", *argv])


def test_serve_flags(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    o = server_options(parse())
    assert o.api_key is None and o.allowed_hosts == LOOPBACK_HOSTS and o.max_request_bytes == 4 * 2**20
    assert exposure_warning("127.0.0.1", o) is None
    o = server_options(parse("--host", "0.0.0.0"))
    assert o.allowed_hosts is None and "without an API key" in exposure_warning("0.0.0.0", o)
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    o = server_options(parse("--host", "0.0.0.0", "--disable-docs", "--disable-pipetwin-api",
                             "--max-request-bytes", "5000", "--allowed-hosts", "a.example, B.example"))
    assert (o.api_key, o.disable_docs, o.disable_pipetwin_api, o.max_request_bytes, o.allowed_hosts) == \
        ("from-env", True, True, 5000, ("a.example", "b.example"))
    assert exposure_warning("0.0.0.0", o) is None
    assert server_options(parse("--api-key", "flag-wins")).api_key == "flag-wins"
    for argv, flag in ((("--max-request-bytes", "10"), "--max-request-bytes"),
                       (("--api-key", "has space"), "--api-key"), (("--allowed-hosts", " , "), "--allowed-hosts")):
        with pytest.raises(ValueError, match=flag):
            check_args(parse(*argv))
