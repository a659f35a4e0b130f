"""The stage model against Hugging Face transformers on tiny random models.

Greedy tokens must match `generate(do_sample=False)` exactly and logits within 1e-4
(float32), for pp = 1, 2, 3 (uneven split, and half-layer splits whose stage boundary
falls between a layer's attention and its MLP), with chunked prefill mixed with decodes
and pages handed out by the shared allocator.
"""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from core.batch import BatchItem, MicroBatch  # noqa: E402
from core.kv_cache import PageAllocator  # noqa: E402
from core.request import Request  # noqa: E402
from runtime import attention, decode_plan  # noqa: E402
from runtime.config import ModelConfig, kv_layers, layer_split  # noqa: E402
from runtime.engine_config import EngineConfig  # noqa: E402
from runtime.kv_cache import NO_KV_LIMIT, KVCache, kv_bytes_per_page, pages_that_fit  # noqa: E402
from runtime.local import LocalPipeline  # noqa: E402
from runtime.sampling import Sampler, SamplingParams  # noqa: E402
from runtime.model import AttentionHalf, DecoderLayer, MLPHalf  # noqa: E402
from runtime.weights import hf_sources, load_stage  # noqa: E402
from runtime.worker import StageRunner  # noqa: E402

PROMPTS = [[5, 17, 99, 3, 200, 41, 7], [1, 2, 3],
           [250, 9, 14, 88, 120, 66, 31, 12, 190, 45, 77, 23, 8], [42]]
NEW_TOKENS = 6
COMMON = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=256, max_position_embeddings=128,
              # wider than the default init so greedy is never decided by a rounding-level tie
              initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _save(model, path, **kw) -> None:
    model.save_pretrained(path, safe_serialization=True, **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (directory, HF model). Llama: tied embeddings, llama3 RoPE, one file.
    Qwen2: untied, qkv bias, sharded with an index."""
    out = {}
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        **COMMON, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
    m = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("llama")
    _save(m, d)
    out["llama"] = (d, m)
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(**COMMON, tie_word_embeddings=False)
    m = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases; make them matter
        for layer in m.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    d = tmp_path_factory.mktemp("qwen2")
    _save(m, d, max_shard_size="100KB")
    assert (d / "model.safetensors.index.json").is_file()
    out["qwen2"] = (d, m)
    return out


def run_greedy(pipe: LocalPipeline, prompts, new_tokens, chunk, num_pages=64):
    """A minimal scheduler: each pass, every unfinished request contributes a prefill
    chunk of up to `chunk` tokens or one decode. Returns outputs and per-step logits."""
    alloc = PageAllocator(num_pages, pipe.page_size)
    reqs = [Request(i, len(p), new_tokens, prompt_ids=list(p)) for i, p in enumerate(prompts)]
    logits = {r.id: [] for r in reqs}
    for step in range(100):
        live = [r for r in reqs if len(r.output_ids) < new_tokens]
        if not live:
            return [r.output_ids for r in reqs], logits
        batch = MicroBatch(step, 0.0)
        for r in live:
            n = min(chunk, r.num_tokens - r.num_computed)
            r.pages += alloc.allocate(alloc.extra_pages(len(r.pages), r.num_computed + n))
            done = r.num_computed + n == r.num_tokens
            batch.add(BatchItem(r, r.num_computed, n, r.num_computed < r.prompt_len, done))
        out = pipe.run(batch)
        sampling = [it.request for it in batch.items if it.samples]
        assert out.shape == (len(sampling), pipe.cfg.vocab_size)
        for it in batch.items:
            it.request.num_computed += it.num_tokens
        for r, row in zip(sampling, out):
            logits[r.id].append(row)
            r.output_ids.append(int(row.argmax()))
            r.token_times.append(float(step))  # what Scheduler.complete records: the count
    raise AssertionError("did not finish")


CASES = [("llama", 1, None, 4, 4), ("llama", 2, None, 5, 3), ("llama", 3, "2,1,1", 4, 5),
         ("qwen2", 1, None, 3, 4), ("qwen2", 2, "3,1", 4, 2), ("qwen2", 3, None, 16, 6),
         # half layers: one boundary, both boundaries, and a stage holding only an MLP half
         ("llama", 2, "1.5,2.5", 4, 5), ("llama", 3, "1.5,1,1.5", 2, 4),
         ("qwen2", 2, "2.5,1.5", 4, 3), ("qwen2", 3, "1.5,0.5,2", 4, 16)]


def _held_layers(model) -> float:
    """Layers a stage model holds, counting an attention or MLP half as 0.5."""
    return sum(1 if isinstance(layer, DecoderLayer) else 0.5 for layer in model.layers)


@pytest.mark.parametrize("name,pp,split,page_size,chunk", CASES)
def test_greedy_matches_hf(models, name, pp, split, page_size, chunk):
    path, hf = models[name]
    pipe = LocalPipeline(path, pp=pp, split=split, page_size=page_size, num_pages=64)
    assert [_held_layers(m) for m in pipe.stages] == layer_split(4, pp, split)
    outs, logits = run_greedy(pipe, PROMPTS, NEW_TOKENS, chunk)
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
            assert outs[i] == ref[0, len(prompt):].tolist(), f"prompt {i}"
            full = torch.tensor([prompt + outs[i][:-1]])
            ref_logits = hf(full).logits[0, len(prompt) - 1:]
            torch.testing.assert_close(torch.stack(logits[i]), ref_logits, atol=1e-4, rtol=0)


def test_greedy_matches_hf_in_place_runs(models, monkeypatch):
    """Decode rows read runs of consecutive pages in place (one page is a run here) and
    merge them with the gathered tail by log-sum-exp: still HF's greedy tokens."""
    monkeypatch.setattr(decode_plan, "MIN_RUN_PAGES", 1)
    path, hf = models["llama"]
    pipe = LocalPipeline(path, pp=2, page_size=2, num_pages=64)
    outs, logits = run_greedy(pipe, PROMPTS, NEW_TOKENS, chunk=16)
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
            assert outs[i] == ref[0, len(prompt):].tolist(), f"prompt {i}"


def _reference_attention(q, k_cache, v_cache, starts, lens, pages, page_size):
    """Plain softmax attention per item over its keys read token by token."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    out, offset = [], 0
    for start, n, ps in zip(starts, lens, pages):
        ctx = start + n
        slots = [ps[p // page_size] * page_size + p % page_size for p in range(ctx)]
        k = k_cache.view(-1, kv_heads, k_cache.shape[-1])[slots].repeat_interleave(heads // kv_heads, 1)
        v = v_cache.view(-1, kv_heads, v_cache.shape[-1])[slots].repeat_interleave(heads // kv_heads, 1)
        qi = q[offset:offset + n].transpose(0, 1)                     # [heads, n, d]
        s = qi @ k.permute(1, 2, 0) / k.shape[-1] ** 0.5              # [heads, n, ctx]
        causal = torch.arange(ctx)[None, :] <= torch.arange(start, ctx)[:, None]
        s = s.masked_fill(~causal, float("-inf"))
        out.append((s.softmax(-1) @ v.transpose(0, 1)).transpose(0, 1))
        offset += n
    return torch.cat(out)


@pytest.mark.parametrize("mode", ["auto", "grouped", "padded", "rows"])
def test_decode_modes_match_reference(mode, monkeypatch):
    """Every decode plan (one padded group, a group per row, groups by length, in-place
    runs + gathered tails) gives the same attention as a plain reference, mixed
    with prefill chunks (one read in place, one gathered) and uneven contexts."""
    monkeypatch.setattr(decode_plan, "MIN_RUN_PAGES", 2)
    page_size, kv_heads, heads, d = 4, 2, 4, 8
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(64, page_size, kv_heads, d, generator=g)
    v_cache = torch.randn(64, page_size, kv_heads, d, generator=g)
    # decodes: long with a consecutive prefix, short, equal pair, one page, two runs with
    # a page between them; two chunks
    starts = [40, 2, 13, 13, 0, 9, 5, 29]
    lens = [1, 1, 1, 1, 1, 6, 1, 1]
    pages = [list(range(20, 30)) + [3], [4], [5, 6, 7, 8], [40, 41, 42, 9],
             [10], list(range(50, 54)), [11, 12], [30, 31, 32, 44, 60, 61, 62, 45]]
    t = sum(lens)
    q = torch.randn(t, heads, d, generator=g)
    k = torch.randn(t, kv_heads, d, generator=g)
    v = torch.randn(t, kv_heads, d, generator=g)
    meta = attention.BatchMeta.build(starts, lens, pages, [True] * len(lens), page_size,
                                     decode_mode=mode)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = attention.paged_attention(q, k, v, kc, vc, meta)
    ref = _reference_attention(q, kc, vc, starts, lens, pages, page_size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if mode == "auto":
        assert meta.decode.runs == [(0, 20, 10), (2, 5, 3), (3, 40, 3), (6, 30, 3), (6, 60, 3)]
        assert meta.chunks[0].pages is None    # consecutive chunk pages: read in place
    assert attention.group_decodes([7, 7, 7]) == [[0, 1, 2]]
    assert attention.group_decodes([500, 10, 12], overhead=64) == [[1, 2], [0]]


def test_dummy_weights_same_for_any_split(models):
    cfg = ModelConfig.from_dir(models["qwen2"][0])
    one = LocalPipeline(None, pp=1, load_format="dummy", cfg=cfg, page_size=4)
    three = LocalPipeline(None, pp=3, split="1,2,1", load_format="dummy", cfg=cfg, page_size=4)
    halves = LocalPipeline(None, pp=3, split="0.5,2,1.5", load_format="dummy", cfg=cfg, page_size=4)
    a, la = run_greedy(one, PROMPTS[:2], 3, chunk=4)
    for pipe in (three, halves):
        b, lb = run_greedy(pipe, PROMPTS[:2], 3, chunk=4)
        assert a == b
        torch.testing.assert_close(torch.stack(la[0]), torch.stack(lb[0]))
    # the same tensors, bit for bit, whichever stage holds which half
    assert torch.equal(halves.stages[0].layers[0].self_attn.qkv_proj.weight,
                       one.stages[0].layers[0].self_attn.qkv_proj.weight)
    assert torch.equal(halves.stages[1].layers[0].mlp.down_proj.weight,
                       one.stages[0].layers[0].mlp.down_proj.weight)


def test_dummy_weights_drawn_in_parallel_are_the_serial_draws(models, monkeypatch):
    """dummy_weights draws tensors in threads; each has its own generator seeded by its HF
    name, so the values are exactly the one-thread ones, and those of a direct draw."""
    import zlib

    from runtime import weights
    cfg = ModelConfig.from_dir(models["qwen2"][0])
    parallel = load_stage(None, 0, 1, load_format="dummy", cfg=cfg, seed=3)
    monkeypatch.setattr(weights.os, "cpu_count", lambda: 1)
    serial = load_stage(None, 0, 1, load_format="dummy", cfg=cfg, seed=3)
    a, b = parallel.state_dict(), serial.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    g = torch.Generator().manual_seed(zlib.crc32(b"model.layers.0.mlp.down_proj.weight") ^ 3)
    direct = torch.randn(parallel.layers[0].mlp.down_proj.weight.shape, generator=g) * 0.02
    assert torch.equal(parallel.layers[0].mlp.down_proj.weight, direct.to(parallel.dtype))
    assert torch.equal(parallel.norm.weight, torch.ones_like(parallel.norm.weight))


def test_stage_interfaces(models):
    path, _ = models["llama"]
    first = load_stage(path, 0, 2)
    last = load_stage(path, 1, 2)
    # the tied LM head of a non-first last stage is its own copy of the embedding
    assert first.lm_head is None and last.embed_tokens is None
    assert torch.equal(last.lm_head.weight, first.embed_tokens.weight)
    solo = load_stage(path, 0, 1)
    assert solo.lm_head.weight is solo.embed_tokens.weight


def _hf_layer_tensors(model) -> set[str]:
    return {hf for sources in hf_sources(model).values() for hf, _, _ in sources
            if hf.startswith("model.layers.")}


def test_half_split_stage_contents(models):
    """1.5,2.5: stage 0 holds layer 0 and layer 1's attention half (and its KV), stage 1
    layer 1's MLP half (no KV) and layers 2-3; between them they read every layer tensor
    of the checkpoint exactly once, equal to the HF model's."""
    path, hf = models["llama"]
    first, last = load_stage(path, 0, 2, "1.5,2.5"), load_stage(path, 1, 2, [1.5, 2.5])
    assert first.split == [1.5, 2.5] and list(first.layer_ids) == [0, 1] and list(last.layer_ids) == [1, 2, 3]
    assert [type(x) for x in first.layers] == [DecoderLayer, AttentionHalf]
    assert [type(x) for x in last.layers] == [MLPHalf, DecoderLayer, DecoderLayer]
    assert {n for n, _ in first.layers[1].named_parameters()} == {
        "input_layernorm.weight", "self_attn.qkv_proj.weight", "self_attn.o_proj.weight"}
    assert {n for n, _ in last.layers[0].named_parameters()} == {
        "post_attention_layernorm.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"}
    a, b = _hf_layer_tensors(first), _hf_layer_tensors(last)
    assert not a & b and a | b == {k for k in load_file(path / "model.safetensors") if k.startswith("model.layers.")}
    assert {k for k in a if k.startswith("model.layers.1.")} == {
        "model.layers.1.input_layernorm.weight", "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.self_attn.o_proj.weight"}
    ref = hf.model.layers[1]
    assert torch.equal(first.layers[1].self_attn.o_proj.weight, ref.self_attn.o_proj.weight)
    assert torch.equal(last.layers[0].mlp.down_proj.weight, ref.mlp.down_proj.weight)
    assert torch.equal(last.layers[0].post_attention_layernorm.weight, ref.post_attention_layernorm.weight)
    # no weight beyond what a whole-layer split of the same model holds
    whole = [load_stage(path, s, 2, "2,2") for s in range(2)]
    count = lambda ms: sum(p.numel() for m in ms for p in m.parameters())  # noqa: E731
    assert count([first, last]) == count(whole)
    # KV: one slot per layer whose attention the stage holds
    assert (first.num_kv_layers, last.num_kv_layers) == (2, 2) and last.kv_slots == (None, 0, 1)
    assert first.make_kv_cache(8, 4).num_layers == 2 and last.make_kv_cache(8, 4).num_layers == 2
    assert [kv_layers([1.5, 2.5], s) for s in range(2)] == [2, 2]
    assert [kv_layers([1, 0.5, 2.5], s) for s in range(3)] == [1, 1, 2]


def test_half_split_kv_sizing(models):
    """bytes_per_page counts the layers whose attention a stage holds; a stage with only
    an MLP half holds no KV and leaves the page count to the others."""
    path, _ = models["qwen2"]
    cfg = ModelConfig.from_dir(path)
    opts = EngineConfig(model_path=str(path), model_cfg=cfg, pp=3, layer_split="1.5,0.5,2",
                        page_size=4, kv_cache_gib=0.001)
    assert opts.layer_split == (1.5, 0.5, 2)
    runners = [StageRunner(opts, s) for s in range(3)]
    assert [r.model.num_kv_layers for r in runners] == [2, 0, 2]
    per_layer = kv_bytes_per_page(4, 1, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    assert [r.bytes_per_page() for r in runners] == [2 * per_layer, 0, 2 * per_layer]
    fits = [r.pages_that_fit()[0] for r in runners]
    assert fits[1] == NO_KV_LIMIT and min(fits) == fits[0] == int(0.001 * 2**30 // (2 * per_layer))
    assert pages_that_fit(10**6, 4, 0, cfg.num_kv_heads, cfg.head_dim, torch.float32) == NO_KV_LIMIT
    runners[1].allocate(min(fits))
    assert runners[1].cache.num_layers == 0 and runners[1].cache.nbytes == 0


def test_config_from_hf_fields(models):
    cfg = ModelConfig.from_dir(models["qwen2"][0])
    assert cfg.model_type == "qwen2" and cfg.qkv_bias and not cfg.o_bias
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
    llama = ModelConfig.from_dir(models["llama"][0])
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.tie_word_embeddings
    # transformers 4.x spelling
    old = ModelConfig.from_hf({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "intermediate_size": 8, "vocab_size": 16,
                               "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2},
                               "torch_dtype": "bfloat16"})
    assert old.rope_theta == 5e5 and old.rope_scaling == {"rope_type": "linear", "factor": 2}
    assert old.torch_dtype == torch.bfloat16 and old.num_kv_heads == 4


@pytest.mark.parametrize("change,match", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_size": None}, "hidden_size"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 2.0}}, "low_freq_factor"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"torch_dtype": "float64"}, "torch_dtype"),
])
def test_config_errors(models, change, match):
    d = json.loads((models["qwen2"][0] / "config.json").read_text())
    d.update(change)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(d)


def test_directory_errors(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory"):
        load_stage(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_stage(tmp_path)
    src = models["llama"][0]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_stage(tmp_path)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    load_stage(tmp_path, 0, 2)  # stage 0 holds layers 0-1 and never needs it
    with pytest.raises(KeyError, match="model.layers.2.mlp.up_proj.weight"):
        load_stage(tmp_path, 1, 2)
    (tmp_path / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    d = json.loads((src / "config.json").read_text())
    d["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight.*\[128, 64\].*\[96, 64\]"):
        load_stage(tmp_path)
    with pytest.raises(ValueError, match="load_format"):
        load_stage(src, load_format="pt")


def test_layer_split():
    assert layer_split(10, 3) == [4, 3, 3]
    assert layer_split(24, 4) == [6, 6, 6, 6]
    assert layer_split(8, 3) == [3, 3, 2]
    assert layer_split(24, 3, "9,9,6") == [9, 9, 6]
    assert layer_split(4, 2, [3, 1]) == [3, 1]
    for bad in ("9,9,5", "12,12", "24,0,0", "9,x,6"):
        with pytest.raises(ValueError, match=r"24"):
            layer_split(24, 3, bad)
    with pytest.raises(ValueError, match="pp=3"):
        layer_split(24, 3, "12,12")
    with pytest.raises(ValueError):
        layer_split(2, 3)


def test_layer_split_halves():
    assert layer_split(8, 2, "4.5,3.5") == [4.5, 3.5]
    assert layer_split(8, 3, [2.5, 3, 2.5]) == [2.5, 3, 2.5]
    # whole entries stay ints, however they were written
    for whole in ("4,4", [4, 4], [4.0, 4.0], " 4 , 4.0 "):
        split = layer_split(8, 2, whole)
        assert split == [4, 4] and all(type(x) is int for x in split), whole
    assert [type(x) for x in layer_split(8, 2, "4.5,3.5")] == [float, float]
    assert [type(x) for x in layer_split(8, 3, "2.5,3,2.5")] == [float, int, float]
    for bad, problem in [("4.25,3.75", "'4.25' is not a multiple of 0.5"),
                         ("0,8", "'0' is not positive"), ("-0.5,8.5", "'-0.5' is not positive"),
                         ("4.5,4.5", "sums to 9"), ("3.5,4", "sums to 7.5"),
                         ("a,b", "'a' is not a number"), ("4,", "'' is not a number"),
                         ("nan,8", "'nan' is not a number"), ([True, 7], "'True' is not a number"),
                         ("8", "has 1 entry"), ("2.5,2.5,3", "has 3 entries")]:
        with pytest.raises(ValueError, match="layer split") as e:
            layer_split(8, 2, bad)
        assert problem in str(e.value) and "pp=2" in str(e.value) and "num_layers=8" in str(e.value), bad


def test_kv_sizing():
    per = kv_bytes_per_page(16, 4, 2, 64, torch.float16)
    assert per == 2 * 4 * 16 * 2 * 64 * 2
    assert pages_that_fit(per * 10 + 5, 16, 4, 2, 64, torch.float16) == 10
    cache = KVCache(10, 16, 4, 2, 64, torch.float16)
    assert cache.nbytes == per * 10 and cache.layer(3)[0].shape == (10, 16, 2, 64)


def test_sampling_determinism():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 256, generator=g) * 3
    hot = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=1234)

    def draw(sampler, rows, ids, params, steps=8):
        return [sampler.sample(logits[rows], ids, params) for _ in range(steps)]

    a = draw(Sampler(), [0, 1], [7, 8], hot)
    assert a == draw(Sampler(), [0, 1], [7, 8], hot)
    # a request's draws do not depend on who shares its batch
    alone = draw(Sampler(), [0], [7], hot)
    assert [x[0] for x in a] == [x[0] for x in alone]
    assert a != draw(Sampler(), [0, 1], [7, 8], SamplingParams(temperature=1.0, seed=99))
    # seedless requests are seeded from the sampler seed and request id
    free = SamplingParams(temperature=1.0)
    assert draw(Sampler(3), [2], [5], free) == draw(Sampler(3), [2], [5], free)
    assert draw(Sampler(3), [2], [5], free) != draw(Sampler(4), [2], [5], free)
    greedy = Sampler().sample(logits, [0, 1, 2, 3], SamplingParams())
    assert greedy == logits.argmax(-1).tolist()
    narrow = [SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=2.0, top_p=1e-6)]
    assert Sampler().sample(logits[:2], [0, 1], narrow) == greedy[:2]
    # top-k keeps only the k best
    top3 = set(logits[3].topk(3).indices.tolist())
    picks = draw(Sampler(), [3], [9], SamplingParams(temperature=5.0, top_k=3), steps=30)
    assert {p[0] for p in picks} <= top3
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
