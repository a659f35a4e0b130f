"""The kernel backend and CUDA-graph options wired through the engine: config and flag
errors, and greedy generation through the engine with attention_backend triton (run by
the Triton interpreter on CPU; pp=1 in process and pp=2 in stage processes) equal to
the torch backend's."""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # inherited by the stage processes

import importlib.util  # noqa: E402
import pickle  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from runtime.engine_args import add_engine_args, check_engine_values, engine_kwargs  # noqa: E402
from runtime.engine_config import EngineConfig  # noqa: E402
from runtime.llm import LLM, SamplingParams, build_engine_config  # noqa: E402

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="the gpu extra (triton) is not installed")
TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 128,
        "max_position_embeddings": 256, "torch_dtype": "float32"}
PROMPTS = [[5, 17, 99, 3, 100, 41, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [1, 2, 3], [42]]


@needs_triton
def test_config_values_and_errors():
    opts, _, _ = build_engine_config(dict(TINY))
    assert opts.attention_backend == "torch" and opts.enforce_eager is False   # auto on CPU
    opts, _, _ = build_engine_config(dict(TINY), attention_backend="triton", enforce_eager=True)
    assert opts.attention_backend == "triton" and opts.enforce_eager
    with pytest.raises(ValueError, match="attention_backend must be one of auto, torch, triton, flashinfer"):
        build_engine_config(dict(TINY), attention_backend="sdpa")
    with pytest.raises(ValueError, match="enforce_eager must be true or false"):
        build_engine_config(dict(TINY), enforce_eager="yes")
    with pytest.raises(ValueError, match="flashinfer"):
        build_engine_config(dict(TINY), attention_backend="flashinfer")


def test_flags():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = p.parse_args(["--model", "dummy:llama-32m", "--attention-backend", "triton", "--enforce-eager"])
    kw = engine_kwargs(args)
    assert kw["attention_backend"] == "triton" and kw["enforce_eager"] is True
    assert engine_kwargs(p.parse_args(["--model", "x"]))["attention_backend"] == "auto"
    with pytest.raises(ValueError, match="--attention-backend must be one of auto, torch, triton, flashinfer, got 'cuda'"):
        check_engine_values({"attention_backend": "cuda"})
    with pytest.raises(ValueError, match="enforce_eager must be true or false"):
        check_engine_values({"enforce_eager": "no"}, name=lambda k: k)


def test_one_gpu_functional_mode(monkeypatch):
    """pp=2 on a machine with one GPU: both stages on cuda:0, activations over gloo."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    opts, _, _ = build_engine_config(dict(TINY), pp=2, device="cuda", attention_backend="torch")
    assert opts.shared_gpu and opts.backend == "gloo"
    assert [opts.stage_device(s) for s in range(2)] == ["cuda:0", "cuda:0"]
    # in a spawned stage process: the config arrives pickled and runtime.processes.stage_main
    # has set WORLD_SIZE and LOCAL_RANK; stage 1 must still take cuda:0 and gloo
    staged = pickle.loads(pickle.dumps(opts))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert staged.shared_gpu and staged.backend == "gloo" and staged.stage_device(1) == "cuda:0"
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    opts, _, _ = build_engine_config(dict(TINY), pp=2, device="cuda", attention_backend="torch")
    assert not opts.shared_gpu and opts.backend == "nccl" and opts.stage_device(1) == "cuda:1"


@needs_triton
@pytest.mark.parametrize("pp", [1, 2])
def test_engine_greedy_triton_equals_torch(pp):
    outs = []
    for backend in ("torch", "triton"):
        with LLM(dict(TINY), pp=pp, attention_backend=backend, num_pages=64, page_size=8) as llm:
            assert llm.config.attention_backend == backend
            res = llm.generate(PROMPTS, SamplingParams(max_tokens=5, ignore_eos=True))
        outs.append([r.token_ids for r in res])
    assert outs[0] == outs[1]
    assert all(len(t) == 5 for t in outs[0])


def test_profile_grid_decodes_have_varied_contexts():
    """The profiler's decode rows vary in length as serving's do, summing to the table's
    feature exactly; one row, or spread 0, keeps one length."""
    from profiles.measure.profile_grid import GRIDS, Shape, grid_shapes
    s = Shape((), 16, 256, 0.96)
    ctx = s.contexts()
    assert sum(ctx) == 16 * 256 == s.decode_context and min(ctx) >= 1
    assert max(ctx) > 2 * min(ctx)                     # really varied
    assert s.contexts() == ctx                          # seeded by the shape
    assert s.items()[0][:16] == [c - 1 for c in ctx]
    assert s.label() == "d16x256~0.96"
    assert Shape((), 16, 256).contexts() == [256] * 16 and Shape((), 1, 300, 0.96).contexts() == [300]
    assert GRIDS["default"].decode_spread == 0.96
    shapes = grid_shapes("default")
    assert any(len(sh.prefills) == 8 and sh.decodes for sh in shapes)   # mixed, 8 chunks
    assert all(sum(sh.contexts()) == sh.decode_context for sh in shapes)


@needs_triton
def test_profile_passes_the_attention_flags(monkeypatch, tmp_path):
    from cli.main import main
    from profiles.measure import profiler
    from profiles.measure.options import ProfileOptions, ProfilerError
    seen = {}

    class Stop(Exception):
        pass

    def fake(opts):
        seen["opts"] = opts
        raise Stop
    monkeypatch.setattr(profiler, "profile", fake)
    with pytest.raises(Stop):
        main(["profile", "--model", "dummy:llama-32m", "--attention-backend", "triton", "--enforce-eager",
              "--out", str(tmp_path / "t"), "--no-progress"])
    assert seen["opts"].attention_backend == "triton" and seen["opts"].enforce_eager
    opts = ProfileOptions(model="dummy:llama-32m", attention_backend="triton", out=tmp_path / "u").validate()
    assert opts.attention_backend == "triton"
    with pytest.raises(ProfilerError, match="--attention-backend: attention_backend must be one of"):
        ProfileOptions(model="dummy:llama-32m", attention_backend="sdpa", out=tmp_path / "v").validate()


def test_validate_report_flags_slow_stages():
    import pandas as pd

    from twin.validate.report import slow_stage_lines
    errors = pd.DataFrame({"policy": ["tt", "tt", "vllm"], "load": [2.0, "inf", 2.0],
                           "real_vs_table": [1.05, 1.31, 4.8]})
    text = " ".join(slow_stage_lines(errors))
    assert "in 2 of 3 cells:** tt at inf (1.31x), vllm at 2.0 (4.80x)" in text
    assert "tt at 2.0" not in text
    ok = " ".join(slow_stage_lines(errors.assign(real_vs_table=[1.0, 1.2, 0.9])))
    assert ok.startswith("Every cell's real stage time is within 1.2x")


def test_kv_sizing_on_one_gpu(monkeypatch):
    """KV pages from free GPU memory: torch's cached blocks are released first (an earlier
    engine's KV cache would otherwise count as used, leaving the next one no page), and
    stages sharing one GPU split the budget (each sizes before any allocates)."""
    from runtime.engine import Engine
    from runtime.worker import StageRunner
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))

    def mem_get_info(device):
        calls.append("mem_get_info")
        return 100 * 2**30, 140 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(StageRunner, "bytes_per_page", lambda self: 2**20)
    fits = {}
    for pp in (1, 2):
        opts, _, _ = build_engine_config(dict(TINY), pp=pp, device="cuda", attention_backend="torch")
        runner = object.__new__(StageRunner)      # no model: sizing only
        runner.opts, runner.device = opts, torch.device("cuda:0")
        fits[pp], how = runner.pages_that_fit()
        assert calls[-2:] == ["empty_cache", "mem_get_info"]
    assert fits[1] == 86 * 1024 and fits[2] == 43 * 1024      # (100 - 0.1 x 140) GiB of 1 MiB pages
    assert "shared by 2 stages" in how

    class Driver:
        def close(self):
            calls.append("close")
    engine = object.__new__(Engine)               # a pp=1 engine on cuda, shutting down
    engine.opts, engine.mode, engine._closed, engine._online, engine._driver = opts, "local", False, None, Driver()
    engine.shutdown()
    assert calls[-2:] == ["close", "empty_cache"] and engine._driver is None


def test_sampler_never_hands_multinomial_an_invalid_row(monkeypatch):
    """Finite logits that overflow when divided by a small temperature fail their row
    before multinomial: on CUDA multinomial over inf/NaN is a device-side assert that
    ends the process (CPU raises, which the sampler also catches)."""
    from runtime.sampling import FAILED, Sampler, SamplingParams
    real = torch.multinomial

    def cuda_like(probs, n, generator=None):
        if not (torch.isfinite(probs).all() and (probs >= 0).all() and probs.sum() > 0):
            raise AssertionError("device-side assert: probability tensor contains inf, nan or < 0")
        return real(probs, n, generator=generator)
    monkeypatch.setattr(torch, "multinomial", cuda_like)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    logits[1, 4] = 3e38                      # finite; / 1e-3 overflows to inf
    out = Sampler().sample(logits, [0, 1, 2], SamplingParams(temperature=1e-3, seed=1))
    assert out[1] == FAILED and FAILED not in (out[0], out[2])


def test_metadata_thread_takes_the_stage_device(monkeypatch):
    """A stage on cuda:1 builds metadata on its Inbox thread, whose current device is
    cuda:0 until set (set_device is per thread)."""
    from types import SimpleNamespace

    from runtime.comm import StepMeta
    from runtime.worker import StageRunner
    current = {"dev": 0}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["dev"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.update(dev=torch.device(d).index))
    runner = object.__new__(StageRunner)
    runner.device = torch.device("cuda:1")
    runner.graphs = SimpleNamespace(build_meta=lambda *a: ("meta on", current["dev"]))
    m = StepMeta(0, [0], [1], [[0]], [True], 0, 1, [0])
    assert runner.build_meta(m) == ("meta on", 1)
