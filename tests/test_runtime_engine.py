"""The real runtime end to end: stage processes around the core scheduler, the LLM API.

Greedy outputs must equal Hugging Face `generate(do_sample=False)` for the same weights
(tiny Llama and Qwen2), at pp = 1, 2 and 3 (uneven split, and a split with both stage
boundaries inside layers, between attention and MLP), under every policy, with
prefill chunking and with preemption forced by a tiny KV cache. Spawning stage processes
costs seconds, so each pipeline is started once (module fixtures) and serves several
checks; policies are switched with `LLM.set_policy` between generate calls.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from core.metrics import summarize  # noqa: E402
from runtime.engine import StageFailure  # noqa: E402
from runtime.llm import LLM, SamplingParams, build_engine_config  # noqa: E402
from runtime.worker import FAULT_ENV  # noqa: E402

PROMPTS = [[5, 17, 99, 3, 200, 41, 7], [1, 2, 3],
           [250, 9, 14, 88, 120, 66, 31, 12, 190, 45, 77, 23, 8], [42],
           [7, 7, 130, 54, 201, 9, 88, 16, 3, 240, 111, 61, 5, 19, 222, 47, 90, 33, 128, 2, 64]]
NEW = 6
GREEDY = SamplingParams(max_tokens=NEW)
COMMON = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=256, max_position_embeddings=128,
              # wider than the default init so greedy is never decided by a rounding-level tie
              initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
# (policy, params): sarathi's small budget and vllm's chunk cap force chunked prefill
POLICIES = {"token_throttling": ("token_throttling", None),
            "sarathi": ("sarathi", {"budget": 5}),
            "vllm": ("vllm", {"max_num_batched_tokens": 16, "long_prefill_token_threshold": 6}),
            # later gLLM: chunks of one prompt in consecutive micro-batches, several in flight
            "tt_requeue": ("token_throttling", {"maxp": 6, "minp": 3, "requeue_chunks": True})}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (directory, HF model, HF greedy outputs for PROMPTS)."""
    out = {}
    for name, cls, cfg_cls, seed in (("llama", transformers.LlamaForCausalLM, transformers.LlamaConfig, 0),
                                      ("qwen2", transformers.Qwen2ForCausalLM, transformers.Qwen2Config, 1)):
        torch.manual_seed(seed)
        m = cls(cfg_cls(**COMMON, tie_word_embeddings=name == "llama")).eval()
        if name == "qwen2":
            with torch.no_grad():  # HF zero-inits biases; make them matter
                for layer in m.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0, 0.1)
        d = tmp_path_factory.mktemp(name)
        m.save_pretrained(d, safe_serialization=True)
        with torch.no_grad():
            ref = [m.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)[0, len(p):].tolist()
                   for p in PROMPTS]
        out[name] = (d, m, ref)
    return out


@pytest.fixture(scope="module")
def llama_pp2(models):
    with LLM(models["llama"][0], pp=2, num_pages=64, page_size=4) as llm:
        yield llm


@pytest.fixture(scope="module")
def qwen_pp3(models):
    with LLM(models["qwen2"][0], pp=3, layer_split="2,1,1", num_pages=64, page_size=4) as llm:
        yield llm


def _check_greedy(llm: LLM, ref, policy: str) -> None:
    llm.set_policy(*POLICIES[policy])
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == ref, policy
    assert all(o.finish_reason == "length" and o.prompt_token_ids == p for o, p in zip(outs, PROMPTS))


# ------------------------------------------------------------------ equals HF

@pytest.mark.parametrize("name,policies", [("llama", ["token_throttling", "sarathi", "vllm"]),
                                           ("qwen2", ["token_throttling", "tt_requeue"])])
def test_pp1_in_process_matches_hf(models, name, policies):
    path, _, ref = models[name]
    with LLM(path, pp=1, num_pages=64, page_size=4) as llm:
        assert llm.engine.mode == "local"
        for policy in policies:
            _check_greedy(llm, ref, policy)


@pytest.mark.parametrize("policy", ["token_throttling", "sarathi", "vllm"])
def test_pp2_matches_hf(models, llama_pp2, policy):
    _check_greedy(llama_pp2, models["llama"][2], policy)
    if policy != "token_throttling":  # chunked prefill really happened
        b = llama_pp2.trace().batches
        assert len(b) > 2 * len(PROMPTS) and b["prefill_tokens"].max() <= 16


@pytest.mark.parametrize("policy", ["token_throttling", "sarathi", "tt_requeue"])
def test_pp3_uneven_split_matches_hf(models, qwen_pp3, policy):
    assert qwen_pp3.config.layer_split == (2, 1, 1)
    _check_greedy(qwen_pp3, models["qwen2"][2], policy)


def test_time_balanced_is_priced_by_the_tables_model_and_matches_hf(models, llama_pp2):
    """time_balanced on the real pipeline: the runtime hands stage 0's scheduler the fitted
    model of a latency table (the shipped CPU one); greedy outputs are unchanged. Without a
    model it fails in the caller, before any stage process is asked, naming the policy."""
    from profiles.latency_model import SlowestStage
    llama_pp2.set_policy("time_balanced", {"maxp": 6, "minp": 3, "requeue_chunks": True},
                         SlowestStage.of_profile("llama-32m_cpu-1thread_pp2"))
    outs = llama_pp2.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == models["llama"][2]
    assert llama_pp2.trace().batches["prefill_tokens"].max() <= 6   # maxp caps the filled batches too
    for call in (lambda: llama_pp2.set_policy("time_balanced"),
                 lambda: LLM(models["llama"][0], pp=2, policy="time_balanced")):
        with pytest.raises(ValueError, match="time_balanced needs a stage-time model"):
            call()


def test_pp3_half_layer_split_matches_hf(models):
    """1.5,1,1.5: both boundaries fall between a layer's attention and its MLP. Stage
    processes size their KV caches from memory; stage 0 (two attentions) sets the count."""
    path, _, ref = models["qwen2"]
    page_bytes = 2 * 4 * COMMON["num_key_value_heads"] * 16 * 4   # K+V, page 4, head_dim 16, fp32
    with LLM(path, pp=3, layer_split="1.5,1,1.5", page_size=4,
             kv_cache_gib=100 * 2 * page_bytes / 2**30) as llm:
        assert llm.config.layer_split == (1.5, 1, 1.5) and type(llm.config.layer_split[1]) is int
        assert llm.engine.num_pages == 100
        _check_greedy(llm, ref, "token_throttling")
        assert llm.trace().meta["layer_split"] == [1.5, 1, 1.5]


def test_engine_config_split_values(models):
    """Whole splits stay ints (as configs, traces and tables had them); halves are floats."""
    path = models["llama"][0]
    for split in ("2,2", [2, 2], (2.0, 2.0), None, ""):
        opts = build_engine_config(path, pp=2, layer_split=split)[0]
        assert opts.layer_split == (2, 2) and all(type(x) is int for x in opts.layer_split), split
    assert build_engine_config(path, pp=2, layer_split=[2.5, 1.5])[0].layer_split == (2.5, 1.5)
    for bad, problem in (("2.25,1.75", "multiple of 0.5"), ("0,4", "not positive"),
                         ("2.5,2.5", "sums to 5"), ("a,b", "not a number"), ("1.5,1.5,1", "3 entries")):
        with pytest.raises(ValueError, match=rf"layer split.*{problem}.*num_layers=4"):
            build_engine_config(path, pp=2, layer_split=bad)


def test_preemption_with_tiny_kv_cache(models):
    path, _, ref = models["qwen2"]
    with LLM(path, pp=2, num_pages=10, page_size=4) as llm:
        for policy in ("token_throttling", "vllm"):
            llm.set_policy(policy)
            outs = llm.generate(PROMPTS, GREEDY)
            assert [o.token_ids for o in outs] == ref, policy
            trace = llm.trace()
            assert trace.requests["preemptions"].sum() > 0, policy
            assert sum(o.metrics.preemptions for o in outs) == trace.requests["preemptions"].sum()
            assert trace.samples["kv_used"].max() <= 10


# ------------------------------------------------------------------ trace and metrics

def test_trace_rows_and_metrics(llama_pp2):
    llama_pp2.set_policy("token_throttling")
    outs = llama_pp2.generate(PROMPTS, GREEDY)
    trace = llama_pp2.trace()
    assert trace.meta["pp"] == 2 and trace.meta["world"] == "runtime"
    b = trace.batches
    per_batch = b.groupby("batch_id")["stage"].apply(sorted)
    assert all(stages == [0, 1] for stages in per_batch), "one row per batch per stage"
    assert (b["end"] >= b["start"]).all() and (b["start"] >= 0).all()
    tokens = b[b["stage"] == 0]
    assert tokens["prefill_tokens"].sum() == sum(map(len, PROMPTS))
    assert tokens["decode_tokens"].sum() == len(PROMPTS) * (NEW - 1)
    for s in (0, 1):  # a stage runs its micro-batches one at a time, in order
        rows = b[b["stage"] == s].sort_values("batch_id")
        assert (rows["start"].to_numpy()[1:] >= rows["end"].to_numpy()[:-1] - 1e-6).all()
    # one time axis: a batch starts on stage 1 after it started on stage 0
    wide = b.pivot(index="batch_id", columns="stage", values="start")
    assert (wide[1] > wide[0]).all()
    s = summarize(trace)
    assert s["finished"] == len(PROMPTS) and s["unfinished"] == 0
    assert 0 <= s["bubble_ratio"] <= 1 and s["output_tps"] > 0
    assert {"bubble_ratio_stage0", "bubble_ratio_stage1"} <= set(s)
    assert len(trace.tokens) == len(PROMPTS) * NEW
    for o, row in zip(outs, trace.requests.itertuples()):
        assert o.metrics.ttft == pytest.approx(row.first_token - row.arrival)


def test_arrival_times_are_honoured(models, llama_pp2):
    llama_pp2.set_policy("token_throttling")
    arrivals = [0.0, 0.0, 0.25, 0.5, 0.5]
    outs = llama_pp2.generate(PROMPTS, GREEDY, arrival_times=arrivals)
    assert [o.token_ids for o in outs] == models["llama"][2]
    req = llama_pp2.trace().requests
    assert req["arrival"].tolist() == arrivals
    assert (req["first_scheduled"] >= req["arrival"]).all()
    assert req["first_scheduled"].iloc[3] >= 0.5


def test_seeded_sampling_same_across_pp(models, llama_pp2):
    params = [SamplingParams(max_tokens=8, temperature=1.0, top_k=40, seed=7),
              SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9),
              SamplingParams(max_tokens=8)]
    llama_pp2.set_policy("token_throttling")
    two = [o.token_ids for o in llama_pp2.generate(PROMPTS[:3], params)]
    assert two == [o.token_ids for o in llama_pp2.generate(PROMPTS[:3], params)]
    with LLM(models["llama"][0], pp=1, num_pages=64, page_size=4) as one:
        assert two == [o.token_ids for o in one.generate(PROMPTS[:3], params)]
    assert two[2] == models["llama"][2][2][:NEW] + two[2][NEW:]  # greedy row unaffected


def test_stop_tokens_and_eos(models):
    path, _, ref = models["llama"]
    with LLM(path, num_pages=64, page_size=4) as llm:
        stop = ref[0][2]
        out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=NEW, stop_token_ids=[stop]))[0]
        first = ref[0].index(stop)
        assert out.token_ids == ref[0][:first + 1] and out.finish_reason == "stop"
        llm._eos = frozenset({stop})  # as if config.json named it eos_token_id
        assert llm.generate([PROMPTS[0]], GREEDY)[0].finish_reason == "stop"
        out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=NEW, ignore_eos=True))[0]
        assert out.token_ids == ref[0] and out.finish_reason == "length"


def test_text_prompts_with_tokenizer(models, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    src = models["llama"][0]
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    vocab = {f"w{i}": i for i in range(256)} | {"[UNK]": 256}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    with LLM(tmp_path, num_pages=64, page_size=4) as llm:
        out = llm.generate(["w5 w17 w99 w3 w200 w41 w7"], GREEDY)[0]
        assert out.prompt_token_ids == PROMPTS[0] and out.token_ids == models["llama"][2][0]
        assert out.text == " ".join(f"w{t}" for t in out.token_ids)


def test_dummy_model_specs(models, tmp_path):
    """dummy:<config path>, a config dict, and load_format='dummy' on a directory agree."""
    path = models["qwen2"][0]
    d = json.loads((path / "config.json").read_text())
    outs = []
    for spec, fmt in ((f"dummy:{path / 'config.json'}", "auto"), (d, "auto"), (str(path), "dummy"),
                      ("dummy:" + json.dumps(d), "auto")):
        with LLM(spec, load_format=fmt, num_pages=32, page_size=4, seed=3) as llm:
            outs.append([o.token_ids for o in llm.generate(PROMPTS[:2], GREEDY)])
    assert all(o == outs[0] for o in outs)


TORCHRUN_SCRIPT = """
import json, sys
from runtime.llm import LLM, SamplingParams
llm = LLM(sys.argv[1], pp=2, num_pages=64, page_size=4)  # ranks != 0 serve, then exit here
outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(max_tokens=int(sys.argv[3])))
trace = llm.trace()
llm.shutdown()
print("RESULT", json.dumps({"tokens": [o.token_ids for o in outs],
                            "stages": sorted(set(trace.batches["stage"]))}))
"""


def test_torchrun_launch(models, tmp_path):
    """`torchrun --nproc-per-node 2 script.py`: env:// rendezvous, rank 0 drives in-process."""
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop(FAULT_ENV, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(models["llama"][0]), json.dumps(PROMPTS[:3]), str(NEW)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout  # only rank 0 gets past LLM(...)
    result = json.loads(lines[0][len("RESULT "):])
    assert result["tokens"] == models["llama"][2][:3] and result["stages"] == [0, 1]


# ------------------------------------------------------------------ errors

def test_config_errors(models, tmp_path):
    llama = models["llama"][0]
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        LLM(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(tmp_path)
    (tmp_path / "config.json").write_text((llama / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(tmp_path)
    with pytest.raises(ValueError, match=r"layer split.*3,3.*num_layers=4"):
        LLM(llama, pp=2, layer_split="3,3")
    with pytest.raises(ValueError, match="pp=3"):
        LLM(llama, pp=3, layer_split=[2, 2])
    with pytest.raises(ValueError, match="num_pages"):
        LLM(llama, pp=2, num_pages=0)
    with pytest.raises(ValueError, match="fits no page"):
        LLM(llama, kv_cache_gib=1e-9)
    with pytest.raises(ValueError, match="policy"):
        LLM(llama, pp=2, policy="fifo")
    with pytest.raises(ValueError, match="maxpp"):
        LLM(llama, pp=2, policy_params={"maxpp": 4})
    with pytest.raises(ValueError, match="load_format"):
        LLM(llama, load_format="pt")
    with pytest.raises(ValueError, match="hidden_act"):
        LLM({**json.loads((llama / "config.json").read_text()), "hidden_act": "gelu"})


@pytest.mark.parametrize("kw,match", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"seed": 1.5}, "seed"), ({"stop_token_ids": "7"}, "stop_token_ids"),
    ({"ignore_eos": 1}, "ignore_eos"),
])
def test_sampling_params_errors(kw, match):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{match}"):
        SamplingParams(**kw)


def test_request_errors(models):
    with LLM(models["llama"][0], num_pages=4, page_size=4) as llm:
        with pytest.raises(ValueError, match=r"prompt 1: 21 prompt tokens .* need 7 KV pages .* has 4"):
            llm.generate([[1], PROMPTS[4]], GREEDY)
        with pytest.raises(ValueError, match="tokenizer"):
            llm.generate(["hello"])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            llm.generate([[1, 256]])
        with pytest.raises(ValueError, match="empty"):
            llm.generate([[]])
        with pytest.raises(ValueError, match="arrival_times"):
            llm.generate([[1], [2]], arrival_times=[0.0])
        with pytest.raises(ValueError, match="sampling_params"):
            llm.generate([[1], [2]], [GREEDY])
        assert llm.generate([[1, 2]], SamplingParams(max_tokens=2))[0].token_ids  # still usable
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([[1]])


@pytest.mark.parametrize("pp,fault,match", [
    (2, "stage=1,batch=2", r"pipeline stage 1 failed: RuntimeError: injected fault"),
    # a middle stage killed: its neighbours fail with connection errors, it is still named
    (3, "stage=1,batch=1,kind=exit", r"pipeline stage 1 \(pid \d+\) died unexpectedly \(exit code 13\)"),
])
@pytest.mark.timeout(120)  # a hang fails the test; no wall-clock assertion (shared machines)
def test_stage_failure_is_reported_fast(models, monkeypatch, pp, fault, match):
    monkeypatch.setenv(FAULT_ENV, fault)
    with LLM(models["llama"][0], pp=pp, num_pages=64, page_size=4) as llm:
        monkeypatch.delenv(FAULT_ENV)
        with pytest.raises(StageFailure, match=match):
            llm.generate(PROMPTS, GREEDY)
        assert not any(p.is_alive() for p in llm.engine._procs)
        with pytest.raises(StageFailure, match="down after an earlier failure"):
            llm.generate(PROMPTS, GREEDY)


def test_no_env_fault_leaks():
    assert FAULT_ENV not in os.environ
