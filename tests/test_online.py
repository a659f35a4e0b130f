"""Online serving (runtime.online.AsyncLLM): streamed tokens equal the offline engine's
(which tests/test_runtime_engine.py checks against Hugging Face), aborts free KV pages,
overload queues, stop tokens end a stream, a dead stage fails every stream with its name.
"""
from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("torch")

from runtime.llm import LLM, SamplingParams  # noqa: E402
from runtime.online import AsyncLLM, EngineDeadError  # noqa: E402
from runtime.worker import FAULT_ENV  # noqa: E402
from tests.helpers import wait_until  # noqa: E402

CFG = dict(model_type="llama", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, intermediate_size=128, vocab_size=256, max_position_embeddings=256,
           initializer_range=0.1)
PROMPTS = [[5, 17, 99, 3, 200, 41, 7], [1, 2, 3], [42] * 13, [250, 9, 14, 88, 120, 66, 31, 12, 190, 45, 77, 23, 8]]
NEW = 6
FIXED = SamplingParams(max_tokens=NEW, ignore_eos=True)


def offline(pp: int) -> list[list[int]]:
    """The offline engine's outputs (dummy weights depend on the split, so per pp)."""
    with LLM(dict(CFG), pp=pp, num_pages=64, page_size=4) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, FIXED)]


@pytest.fixture(scope="module")
def reference():
    return offline(1)


async def collect(engine: AsyncLLM, prompt, params=FIXED):
    deltas = [d async for d in engine.generate(prompt, params)]
    return [t for d in deltas for t in d.token_ids], deltas




@pytest.mark.parametrize("pp", [1, 2])
def test_streams_equal_offline_generate(pp):
    async def run():
        with AsyncLLM(dict(CFG), pp=pp, num_pages=64, page_size=4) as engine:
            results = await asyncio.gather(*(collect(engine, p) for p in PROMPTS))
            wait_until(lambda: {r[1] for r in engine.stage_rows()} == set(range(pp)), "rows of every stage")
            return results, engine.stats(), engine.recent_bubble_ratio()

    results, stats, bubble = asyncio.run(run())
    assert [tokens for tokens, _ in results] == offline(pp)
    for _, deltas in results:
        assert [d.finish_reason for d in deltas][-1] == "length"
        assert all(d.finish_reason is None for d in deltas[:-1])
        assert len(deltas) == NEW  # one decode per micro-batch: tokens stream one by one
    assert stats.prompt_tokens_total == sum(map(len, PROMPTS))
    assert stats.generation_tokens_total == NEW * len(PROMPTS)
    assert stats.requests_finished_total == len(PROMPTS)
    assert (stats.running, stats.waiting, stats.kv_used_pages) == (0, 0, 0)
    assert bubble is not None and 0.0 <= bubble < 1.0


def test_time_balanced_online_gets_its_model_through_the_stage_process():
    """The stage-time model travels with the serve command to stage 0's process (pp = 2);
    without one the policy fails in the constructor, naming itself."""
    from profiles.latency_model import SlowestStage

    async def run():
        with AsyncLLM(dict(CFG), pp=2, policy="time_balanced", policy_params={"requeue_chunks": True},
                      stage_time_model=SlowestStage.of_profile("llama-32m_cpu-1thread_pp2"),
                      num_pages=64, page_size=4) as engine:
            return await asyncio.gather(*(collect(engine, p) for p in PROMPTS))

    assert [tokens for tokens, _ in asyncio.run(run())] == offline(2)
    with pytest.raises(ValueError, match="time_balanced needs a stage-time model"):
        AsyncLLM(dict(CFG), pp=2, policy="time_balanced")


def test_abort_and_cancel_free_pages():
    async def run(engine: AsyncLLM):
        long = SamplingParams(max_tokens=200, ignore_eos=True)
        stream = engine.generate([7] * 20, long)
        got = 0
        async for d in stream:
            got += len(d.token_ids)
            if got >= 3:
                break
        assert engine.stats().kv_used_pages > 0
        await stream.aclose()           # the client went away
        task = asyncio.ensure_future(collect(engine, [9] * 30, long))
        while engine.stats().generation_tokens_total < got + 3:
            await asyncio.sleep(0.01)
        task.cancel()                   # a cancelled handler (disconnect) aborts too
        with pytest.raises(asyncio.CancelledError):
            await task
        return got

    with AsyncLLM(dict(CFG), pp=2, num_pages=64, page_size=4) as engine:
        asyncio.run(run(engine))
        wait_until(lambda: engine.stats().kv_used_pages == 0 and engine.stats().running == 0,
                   "aborted requests freed their pages")
        assert engine.stats().generation_tokens_total < 2 * 200
        # the engine goes on serving after aborts
        tokens, _ = asyncio.run(collect(engine, PROMPTS[0]))
        assert len(tokens) == NEW


def test_overload_queues_and_every_request_finishes():
    """Far more work than KV pages: requests wait (or are preempted), none is refused."""
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = [[(i * 7) % 250 + 1] * (5 + i % 9) for i in range(64)]

    async def run():
        with AsyncLLM(dict(CFG), pp=2, num_pages=12, page_size=4) as engine:
            out = await asyncio.gather(*(collect(engine, p, params) for p in prompts))
            return out, engine.stats()

    out, stats = asyncio.run(run())
    assert all(len(tokens) == 8 and deltas[-1].finish_reason == "length" for tokens, deltas in out)
    assert stats.requests_finished_total == 64 and stats.kv_used_pages == 0


def test_stop_tokens_end_the_stream(reference):
    stop = reference[0][2]
    params = SamplingParams(max_tokens=NEW, stop_token_ids=[stop])
    with AsyncLLM(dict(CFG), num_pages=64, page_size=4) as engine:
        tokens, deltas = asyncio.run(collect(engine, PROMPTS[0], params))
    cut = reference[0].index(stop) + 1
    assert tokens == reference[0][:cut] and deltas[-1].finish_reason == "stop"


def test_requests_it_can_never_serve_are_refused():
    with AsyncLLM(dict(CFG), num_pages=4, page_size=4) as engine:
        assert engine.max_model_len == 17
        for prompt, params, match in (([1] * 10, SamplingParams(max_tokens=8), "exceed the model length 17"),
                                      ([1, 256], FIXED, "outside the vocabulary"),
                                      ([], FIXED, "empty"),
                                      ("text", FIXED, "list of int token ids")):
            with pytest.raises(ValueError, match=match):
                asyncio.run(collect(engine, prompt, params))
        assert asyncio.run(collect(engine, [1] * 9, SamplingParams(max_tokens=8, ignore_eos=True)))[0]


@pytest.mark.timeout(120)
def test_dead_stage_fails_streams_with_its_name(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "stage=1,batch=3")
    with AsyncLLM(dict(CFG), pp=2, num_pages=64, page_size=4) as engine:
        monkeypatch.delenv(FAULT_ENV)
        with pytest.raises(EngineDeadError, match="pipeline stage 1 failed: RuntimeError: injected fault"):
            asyncio.run(collect(engine, PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True)))
        assert not engine.healthy and "stage 1" in engine.error
        with pytest.raises(EngineDeadError, match="stage 1"):
            asyncio.run(collect(engine, PROMPTS[1]))
        assert not any(p.is_alive() for p in engine.engine._procs)
