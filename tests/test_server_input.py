"""Issue 18, what a hostile client can send (pp = 2, a tiny dummy Llama with the byte
fallback): sampling values on the sampler's edges that used to kill the engine for
everyone, bodies that are not JSON objects, too deep, too big, not declared JSON (the
CORS hole), text with lone surrogates, unknown paths and methods; /metrics counting the
status each got; internals kept out of error bodies. No timing is asserted.
"""
from __future__ import annotations

import json
import logging
import re
import threading

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import server.intake as server_intake  # noqa: E402
from runtime.llm import SamplingParams  # noqa: E402
from runtime.online import AsyncLLM  # noqa: E402
from server.app import ServerOptions, build_app  # noqa: E402
from server.serve import ServerThread  # noqa: E402

NAME = "tiny"
CFG = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=128, vocab_size=320, max_position_embeddings=256, initializer_range=0.1)


@pytest.fixture(scope="module")
def engine():
    e = AsyncLLM(dict(CFG), pp=2, num_pages=64, page_size=8)
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def app(engine):
    return build_app(engine, model_name=NAME, options=ServerOptions(max_request_bytes=256 * 1024, thread_bytes=4096))


@pytest.fixture(scope="module")
def url(app):
    with ServerThread(app) as srv:
        yield srv.url


def post(url: str, body, path: str = "completions", **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", json=body, timeout=60, **kw)


def raw_post(url: str, content: bytes, ctype: str | None = "application/json", path: str = "completions",
             **headers) -> httpx.Response:
    h = {"content-type": ctype} if ctype else {}
    return httpx.post(f"{url}/v1/{path}", content=content, headers={**h, **headers}, timeout=60)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def counted(url: str, endpoint: str, status: int) -> float:
    m = re.search(rf'^pipetwin_http_requests_total\{{endpoint="{endpoint}",status="{status}"\}} (\S+)$',
                  httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def tokens(url: str, **sampling) -> list[str]:
    body = {"model": NAME, "prompt": [5, 6, 7, 8], "max_tokens": 6, "ignore_eos": True, **sampling}
    r = post(url, body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


# ---------------------------------------------------------------- defect 1: sampling edges

def test_sampling_edges_are_served_and_the_engine_survives(url):
    greedy = tokens(url, temperature=0)
    # below the floor (float32 makes 1e-300 a 0 divisor) the request is greedy
    assert tokens(url, temperature=1e-300) == greedy
    assert tokens(url, temperature=9e-6, seed=3) == greedy
    # a top_p that rounds to 0 keeps the top token: the same as greedy
    assert tokens(url, temperature=1.0, top_p=1e-300, seed=1) == greedy
    # top_k past the vocabulary is off; -1 is off (vLLM's spelling)
    assert tokens(url, temperature=1.0, top_k=10**30, seed=4) == tokens(url, temperature=1.0, seed=4)
    assert tokens(url, temperature=1.0, top_k=-1, seed=4) == tokens(url, temperature=1.0, seed=4)
    assert tokens(url, temperature=1.0, seed=2**63 - 1) == tokens(url, temperature=1.0, seed=2**63 - 1)
    tokens(url, temperature=1.0, seed=-2**63)
    for bad, param in (({"seed": 2**64}, "seed"), ({"seed": -2**63 - 1}, "seed"), ({"top_k": -2}, "top_k"),
                       ({"top_p": 1e-320 * 0}, "top_p"), ({"temperature": 2.5}, "temperature")):
        err = error_of(post(url, {"model": NAME, "prompt": [1], **bad}), 400)
        assert err["param"] == param
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert tokens(url, temperature=0) == greedy


def test_sampler_edges_directly():
    import torch

    from runtime.sampling import FAILED, Sampler, SamplingParams as SP

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    top = logits.argmax(dim=-1).tolist()
    s = Sampler()
    assert s.sample(logits, [0, 1, 2], SP(temperature=1e-300)) == top
    assert s.sample(logits, [3, 4, 5], SP(temperature=1.0, top_p=1e-300)) == top
    big = s.sample(logits, [6, 7, 8], SP(temperature=1.0, top_k=10**30, seed=2**64 + 5))
    assert big == Sampler().sample(logits, [6, 7, 8], SP(temperature=1.0, seed=5))
    # a row with a NaN (or no finite) logit fails alone, greedy or sampled
    bad = logits.clone()
    bad[1, 7] = float("nan")
    bad[2] = float("-inf")
    assert Sampler.greedy(bad) == [top[0], FAILED, FAILED]
    assert s.sample(bad, [9, 10, 11], SP(temperature=1.0, seed=1))[1:] == [FAILED, FAILED]
    huge = logits.clone()
    huge[0, 3] = float("inf")      # +inf: no finite maximum
    assert Sampler.greedy(huge)[0] == FAILED and Sampler.greedy(huge)[1:] == top[1:]


# ---------------------------------------------------------------- defect 1: content type (CORS)

def test_posts_must_declare_json(url):
    body = json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 2}).encode()
    before = counted(url, "completions", 415)
    err = error_of(raw_post(url, body, "text/plain", Origin="https://evil.example"), 415)
    assert "application/json" in err["message"] and err["code"] == "unsupported_media_type"
    error_of(raw_post(url, body, None), 415)
    error_of(raw_post(url, body, "application/x-www-form-urlencoded", path="chat/completions"), 415)
    assert counted(url, "completions", 415) == before + 2
    assert raw_post(url, body, "application/json; charset=utf-8").status_code == 200


# ---------------------------------------------------------------- defect 4: 400s, not 500s

def test_lone_surrogates_are_400s_naming_the_field(url):
    cases = [
        (b'{"model":"tiny","prompt":"a\\ud800b","max_tokens":2}', "completions", "prompt"),
        (b'{"model":"tiny","prompt":["a\\udfffb"],"max_tokens":2}', "completions", "prompt"),
        (b'{"model":"tiny","messages":[{"role":"user","content":"ok"},{"role":"user","content":"x\\ud800"}]}',
         "chat/completions", "messages[1].content"),
        (b'{"model":"tiny","messages":[{"role":"user","content":[{"type":"text","text":"\\udc00"}]}]}',
         "chat/completions", "messages[0].content"),
    ]
    for body, path, param in cases:
        err = error_of(raw_post(url, body, path=path), 400)
        assert err["param"] == param and "surrogate" in err["message"], err
    # a surrogate echoed back in an error message still encodes
    err = error_of(raw_post(url, b'{"model":"m\\ud800","prompt":"x"}'), 404)
    assert err["param"] == "model"


def test_bodies_that_are_not_plain_json_objects_are_400s(url):
    before = counted(url, "completions", 400)
    nested = b"[" * 100_000 + b"]" * 100_000
    assert "deeply" in error_of(raw_post(url, b'{"model":"tiny","prompt":' + nested + b"}"), 400)["message"]
    assert "deeply" in error_of(raw_post(url, b"[" * 2000 + b"]" * 2000), 400)["message"]   # on the loop
    error_of(raw_post(url, b'{"model":"tiny","prompt":"x","temperature":NaN}'), 400)
    error_of(raw_post(url, b'{"model":"tiny","prompt":"x","seed":' + b"9" * 5000 + b"}"), 400)
    error_of(raw_post(url, b"\xff\xfe"), 400)
    assert counted(url, "completions", 400) == before + 5
    assert counted(url, "completions", 500) == 0


def test_unknown_paths_methods_and_query_values_are_openai_errors(url):
    assert error_of(httpx.get(url + "/v1/nothing"), 404)["code"] == "not_found"
    r = httpx.get(url + "/v1/completions")
    assert error_of(r, 405)["code"] == "method_not_allowed" and "POST" in r.headers["allow"]
    assert error_of(httpx.get(url + "/v1/pipetwin/stage_rows", params={"since": "soon"}), 400)["param"] == "since"
    assert counted(url, "other", 404) >= 1 and counted(url, "completions", 405) >= 1


# ---------------------------------------------------------------- defect 5: size, parsing off the loop

def test_body_size_limit_and_long_prompts(app, url, monkeypatch):
    big = json.dumps({"model": NAME, "prompt": "a" * 300_000}).encode()
    assert error_of(raw_post(url, big), 413)["code"] == "request_too_large"

    def chunks():   # no content-length: counted as it arrives
        yield b'{"model":"tiny","prompt":"'
        for _ in range(70):
            yield b"b" * 4096
        yield b'"}'
    r = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert error_of(r, 413)["code"] == "request_too_large"
    # under the body limit but more characters than the context can hold: refused before tokenizing
    codec = app.state.server.codec
    encoded = []
    monkeypatch.setattr(codec, "encode", lambda text: encoded.append(text) or list(text.encode()))
    err = error_of(post(url, {"model": NAME, "prompt": "c" * 40_000}), 400)
    assert err["code"] == "context_length_exceeded" and "characters" in err["message"] and not encoded
    # 200 characters, 400 byte tokens: only tokenizing tells, then it is refused
    err = error_of(post(url, {"model": NAME, "prompt": "é" * 200}), 400)
    assert err["code"] == "context_length_exceeded" and encoded == ["é" * 200]


def test_large_bodies_are_parsed_off_the_event_loop(url, monkeypatch):
    threads = []
    real = server_intake.decode_body

    def spy(raw, cls):
        threads.append(threading.current_thread().name)
        return real(raw, cls)

    monkeypatch.setattr(server_intake, "decode_body", spy)
    assert post(url, {"model": NAME, "prompt": [1, 2], "max_tokens": 1}).status_code == 200
    assert post(url, {"model": NAME, "prompt": [1, 2], "max_tokens": 1, "user": "u" * 5000}).status_code == 200
    assert threads[0] == "pipetwin-server" and threads[1] != "pipetwin-server"


# ---------------------------------------------------------------- truthful 500s, no internals

class _Broken(SamplingParams):
    def __init__(self, **kw) -> None:
        raise RuntimeError("/secret/path/to/module.py pid 4242 exploded")


def test_a_500_is_counted_as_500_and_keeps_internals_in_the_log(engine, caplog):
    with ServerThread(build_app(engine, model_name=NAME, sampling_params=_Broken)) as srv:
        with caplog.at_level(logging.ERROR, logger="pipetwin.server"):
            err = error_of(post(srv.url, {"model": NAME, "prompt": [1, 2]}), 500)
        assert err["type"] == "server_error" and "/secret" not in err["message"] and "4242" not in err["message"]
        ref = re.search(r"reference (\w+)", err["message"]).group(1)
        assert any(ref in r.getMessage() and r.exc_info for r in caplog.records)
        assert counted(srv.url, "completions", 500) == 1 and counted(srv.url, "completions", 200) == 0
