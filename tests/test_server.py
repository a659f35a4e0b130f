"""The OpenAI-compatible server (server/) over the real AsyncLLM (pp = 2, a tiny random
Llama with a tiny byte-level BPE tokenizer and a chat template), on a loopback port,
driven by the official `openai` client: completions and chat, streaming and not, 64
concurrent streams, malformed requests, stop strings, a client disconnect that frees KV
pages (seen in /metrics), a dead engine (a stage process killed). No timing is asserted.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from runtime.online import AsyncLLM  # noqa: E402
from server.app import build_app  # noqa: E402
from server.serve import ServerThread  # noqa: E402
from server.tokens import ByteCodec, StopChecker, plain_chat_text  # noqa: E402
from tests.helpers import wait_until  # noqa: E402

NAME = "tiny-llama"
CFG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=320,
           max_position_embeddings=512, initializer_range=0.1, rms_norm_eps=1e-5, torch_dtype="float32",
           tie_word_embeddings=False)
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello server", "pipeline bubbles",
          "tokens stream out as micro-batches finish", "user assistant system"] * 4


def make_model_dir(path):
    """config.json (random weights: load_format='dummy') + a byte-level BPE tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CFG))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(path))
    assert len(tok) <= CFG["vocab_size"]
    return tok


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    tok = make_model_dir(d)
    engine = AsyncLLM(str(d), pp=2, load_format="dummy", num_pages=128, page_size=8)
    try:
        with ServerThread(build_app(engine, model_name=NAME, info={"pp": 2})) as srv:
            yield srv, engine, tok
    finally:
        engine.shutdown()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))




# ---------------------------------------------------------------- happy paths

def test_completions_text_and_token_ids(served, client):
    srv, engine, tok = served
    r = client.completions.create(model=NAME, prompt="hello world", max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    ids = tok.encode("hello world")
    assert r.object == "text_completion" and r.model == NAME and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 7, len(ids) + 7)
    same = client.completions.create(model=NAME, prompt=ids, max_tokens=7, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert same.choices[0].text == r.choices[0].text   # greedy: text and token-id prompts agree
    seeded = [client.completions.create(model=NAME, prompt=ids, max_tokens=7, temperature=1.0, seed=5,
                                        extra_body={"ignore_eos": True}).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_chat_uses_the_tokenizer_template(served, client):
    srv, engine, tok = served
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello server"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    want = tok.encode(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(want) and r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"
    # max_completion_tokens is the newer name
    r2 = client.chat.completions.create(model=NAME, messages=msgs, max_completion_tokens=3, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert r2.usage.completion_tokens == 3


def test_streaming_matches_non_streaming(served, client):
    kw = dict(model=NAME, max_tokens=9, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(prompt="the lazy dog", **kw).choices[0].text
    chunks = list(client.completions.create(prompt="the lazy dog", stream=True,
                                            stream_options={"include_usage": True}, **kw))
    token_chunks = [c for c in chunks if c.choices]
    assert len(token_chunks) == 9                      # one chunk per token
    assert "".join(c.choices[0].text for c in token_chunks) == full
    assert token_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in token_chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 9 and not chunks[-1].choices

    msgs = [{"role": "user", "content": "hello"}]
    ckw = dict(model=NAME, messages=msgs, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**ckw).choices[0].message.content
    parts = list(client.chat.completions.create(stream=True, **ckw))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == full
    assert parts[-1].choices[0].finish_reason == "length" and len(parts) == 6


def test_64_concurrent_streams_all_finish_with_their_token_counts(served):
    srv = served[0]
    want = [3 + (i * 7) % 29 for i in range(64)]

    async def one(c, i):
        n_chunks, usage = 0, None
        stream = await c.completions.create(model=NAME, prompt=[1 + i, 2, 3 + i % 5] * (1 + i % 4),
                                            max_tokens=want[i], temperature=0.7, seed=i, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
        async for ch in stream:
            if ch.choices:
                n_chunks += 1
                finish = ch.choices[0].finish_reason or None
            if ch.usage:
                usage = ch.usage.completion_tokens
        return n_chunks, usage, finish

    async def run():
        async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0,
                                      http_client=openai.DefaultAsyncHttpxClient(
                                          limits=httpx.Limits(max_connections=100))) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    got = asyncio.run(run())
    assert [g[0] for g in got] == want and [g[1] for g in got] == want
    assert {g[2] for g in got} == {"length"}
    wait_until(lambda: metric(srv.url, "pipetwin_kv_cache_used_pages") == 0, "all pages free")


def test_stop_strings_cut_the_text(served, client):
    kw = dict(model=NAME, prompt="hello world", temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
    ref = client.completions.create(**kw).choices[0].text
    assert len(ref) >= 6
    stop = ref[3:6]
    first = ref.find(stop)
    r = client.completions.create(stop=[stop, "\x00never"], **kw)
    assert r.choices[0].text == ref[:first] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens <= 24
    parts = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(p.choices[0].text for p in parts if p.choices) == ref[:first]
    assert parts[-1].choices[0].finish_reason == "stop"


def test_models_health_metrics(served, client):
    srv = served[0]
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    # one generation of its own: under xdist this test may be the first of the module on its worker
    client.completions.create(model=NAME, prompt="hi", max_tokens=2, temperature=0)
    text = httpx.get(srv.url + "/metrics").text
    for name in ("pipetwin_num_requests_running", "pipetwin_num_requests_waiting", "pipetwin_kv_cache_usage_ratio",
                 "pipetwin_bubble_ratio", "pipetwin_prompt_tokens_total", "pipetwin_generation_tokens_total",
                 "pipetwin_time_to_first_token_seconds_bucket", "pipetwin_time_per_output_token_seconds_count"):
        assert re.search(rf"^{name}", text, re.M), name
    assert metric(srv.url, "pipetwin_generation_tokens_total") > 0
    rows = httpx.get(srv.url + "/v1/pipetwin/stage_rows", params={"since": 0}).json()
    assert rows["columns"][:2] == ["batch_id", "stage"]
    info = httpx.get(srv.url + "/v1/pipetwin/info").json()
    assert info["pp"] == 2 and info["tokenizer"] == "hf" and info["max_model_len"] == 512


# ---------------------------------------------------------------- errors

BAD = [
    # (endpoint, body, status, param)
    ("completions", {"model": NAME}, 400, "prompt"),
    ("completions", {"prompt": "x"}, 400, "model"),
    ("completions", {"model": NAME, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "x", "max_tokens": 5.0}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"model": NAME, "prompt": "x", "temperature": 3}, 400, "temperature"),
    ("completions", {"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "x", "n": 2}, 400, "n"),
    ("completions", {"model": NAME, "prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ("completions", {"model": NAME, "prompt": "x", "best_of": 2}, 400, "best_of"),
    ("completions", {"model": NAME, "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("completions", {"model": NAME, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("completions", {"model": NAME, "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("completions", {"model": NAME, "prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": []}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": [1, 999]}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("completions", {"model": NAME, "prompt": [1] * 500, "max_tokens": 20}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": [1] * 600}, 400, "prompt"),
    ("completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("chat/completions", {"model": NAME}, 400, "messages"),
    ("chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                          "tools": [{"type": "function"}]}, 400, "tools"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                          "max_completion_tokens": 10_000}, 400, "max_completion_tokens"),
]


@pytest.mark.parametrize("endpoint,body,status,param", BAD, ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_malformed_requests_get_openai_errors(served, endpoint, body, status, param):
    r = httpx.post(f"{served[0].url}/v1/{endpoint}", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_bad_json_and_the_openai_client_sees_errors(served, client):
    url = served[0].url
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json=[1, 2])
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the request body must be")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", n=3)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")


def test_client_disconnect_mid_stream_aborts_and_frees_pages(served):
    url = served[0].url
    body = {"model": NAME, "prompt": [5] * 40, "max_tokens": 400, "stream": True, "ignore_eos": True,
            "temperature": 0}
    aborted = metric_or_zero(url, 'pipetwin_request_finished_total{finish_reason="abort"}')
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert got[0].startswith("data: ")
            assert metric(url, "pipetwin_kv_cache_used_pages") > 0
            assert metric(url, "pipetwin_num_requests_running") == 1
    # the client is gone after ~3 of 400 tokens: the request is aborted and its pages freed
    wait_until(lambda: metric(url, "pipetwin_kv_cache_used_pages") == 0, "pages freed after disconnect")
    wait_until(lambda: metric(url, "pipetwin_num_requests_running") == 0, "request gone")
    wait_until(lambda: metric_or_zero(url, 'pipetwin_request_finished_total{finish_reason="abort"}') == aborted + 1,
               "abort counted")
    # a non-streaming client that gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 480 - 40}, timeout=0.5)
    wait_until(lambda: metric(url, "pipetwin_kv_cache_used_pages") == 0, "pages freed (non-streaming)")
    wait_until(lambda: metric(url, "pipetwin_num_requests_running") == 0, "non-streaming request gone")


def metric_or_zero(url: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def test_dead_engine_turns_health_red_and_requests_503(caplog):
    """A stage process dies: /health is 503 naming the cause, requests get 503, the cause is logged.
    No tokenizer here (a dummy config): text goes through the byte fallback."""
    caplog.set_level(logging.ERROR, logger="pipetwin.server")
    cfg = {k: v for k, v in CFG.items() if k != "architectures"}
    engine = AsyncLLM(cfg, pp=2, num_pages=32, page_size=8)
    try:
        with ServerThread(build_app(engine, model_name="dummy")) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
            r = c.completions.create(model="dummy", prompt="héllo", max_tokens=3, extra_body={"ignore_eos": True})
            assert r.usage.prompt_tokens == len("héllo".encode()) and r.usage.completion_tokens == 3
            engine.engine._procs[1].kill()
            wait_until(lambda: httpx.get(srv.url + "/health").status_code == 503, "health turns red")
            with caplog.at_level(logging.ERROR, logger="pipetwin.server"):
                h = httpx.get(srv.url + "/health").json()
                assert h["status"] == "error" and "stage" in h["error"]["message"]
                with pytest.raises(openai.InternalServerError) as e:
                    c.completions.create(model="dummy", prompt=[1, 2], max_tokens=3)
                assert e.value.status_code == 503 and e.value.body["code"] == "engine_dead"
            assert metric(srv.url, "pipetwin_engine_healthy") == 0
            assert any("engine is down" in r.getMessage() and "stage" in r.getMessage() for r in caplog.records)
    finally:
        engine.shutdown()


# ---------------------------------------------------------------- tokens.py (no engine)

def test_byte_fallback_codec():
    codec = ByteCodec(320)
    ids = codec.encode("aé€")
    assert ids == list("aé€".encode()) and max(ids) < 256
    d = codec.decoder()
    out = "".join(d.add([t]) for t in ids) + d.add([300]) + d.flush()
    assert out == "aé€<|300|>"
    d = codec.decoder()
    assert d.add([0xC3]) == "" and d.add([0xA9]) == "é"     # a split character waits for its second byte
    assert codec.chat_prompt([("user", "hi")]) == codec.encode("user: hi\nassistant:")
    assert plain_chat_text([("system", "s"), ("user", "u")]) == "system: s\nuser: u\nassistant:"
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        ByteCodec(100)


def test_stop_checker_holds_back_possible_stops():
    codec = ByteCodec(320)
    s = StopChecker(codec.decoder(), ["END"])
    emitted = [s.add([t]) for t in codec.encode("abcEN")]
    assert "".join(emitted) == "abc" and not s.stopped        # "EN" may start "END": held back
    assert s.add(codec.encode("x")) == "ENx"
    assert s.add(codec.encode("yEND")) == "y" and s.stopped
    s = StopChecker(codec.decoder(), ["END"])
    s.add(codec.encode("abE"))
    assert s.finish() == "E"                                   # the end of generation flushes
