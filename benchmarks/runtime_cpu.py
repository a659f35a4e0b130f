"""Our pipeline-parallel engine vs Hugging Face transformers `generate`, on CPU, same run.

Model: a 32M-parameter random Llama (hidden 512, 8 layers, 8 heads, 4 KV heads,
intermediate 1408, vocab 8192, float32), saved once as safetensors so both sides load
the very same weights.

Workloads (every request present at t = 0, i.e. at saturation):
  (a) equal   32 prompts of 256 tokens, 128 output tokens each; HF: one batch of 32.
  (b) varied  64 requests shaped like the Azure 2023 conversation trace, scaled down:
              lognormal prompts (mean 250, CV 0.96) and outputs (mean 100, CV 0.77);
              HF: static batches of 32 in arrival order, left-padded, each running to its
              longest output (useful tokens are each request's own output length).
Output tok/s = useful output tokens / wall time of the generate call(s), after a warm-up.
The engine's bubble ratio comes from its trace, by core.metrics.summarize.

    .venv/bin/python benchmarks/runtime_cpu.py --json results/runtime_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = dict(model_type="llama", hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, intermediate_size=1408, vocab_size=8192, max_position_embeddings=4096,
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float32",
             bos_token_id=None, eos_token_id=None, pad_token_id=None)


def make_model(folder: Path) -> Path:
    import torch
    import transformers

    cfg = {k: v for k, v in MODEL.items() if k != "model_type"}
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def workloads(quick: bool, seed: int = 0) -> dict[str, list[tuple[list[int], int]]]:
    """name -> [(prompt token ids, output length)]."""
    import numpy as np

    from core.workloads import AZURE_CONV_OUTPUT_CV, AZURE_CONV_PROMPT_CV, LogNormal

    rng = np.random.default_rng(seed)
    vocab = MODEL["vocab_size"]
    n_a, p_a, o_a = (8, 64, 16) if quick else (32, 256, 128)
    equal = [(rng.integers(0, vocab, p_a).tolist(), o_a) for _ in range(n_a)]
    n_b, p_b, o_b = (16, 60, 25) if quick else (64, 250, 100)
    prompts = LogNormal(p_b, AZURE_CONV_PROMPT_CV, min=4, max=8 * p_b).sample(n_b, rng)
    outputs = LogNormal(o_b, AZURE_CONV_OUTPUT_CV, min=1, max=8 * o_b).sample(n_b, rng)
    varied = [(rng.integers(0, vocab, int(p)).tolist(), int(o)) for p, o in zip(prompts, outputs)]
    return {"equal": equal, "varied": varied}


def run_hf(path: Path, reqs: list[tuple[list[int], int]], batch: int, threads: int | None) -> dict:
    import torch
    import transformers

    if threads is not None:
        torch.set_num_threads(threads)
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def generate(group: list[tuple[list[int], int]]) -> None:
        longest = max(len(p) for p, _ in group)
        ids = torch.zeros(len(group), longest, dtype=torch.long)
        mask = torch.zeros(len(group), longest, dtype=torch.long)
        for i, (p, _) in enumerate(group):  # left padding
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        new = max(o for _, o in group)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0)
        assert out.shape[1] == longest + new

    generate([(reqs[0][0][:16], 4)])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(reqs), batch):
        generate(reqs[i:i + batch])
    wall = time.perf_counter() - t
    useful = sum(o for _, o in reqs)
    return {"wall_s": wall, "output_tokens": useful, "output_tps": useful / wall,
            "threads": torch.get_num_threads(), "batch": batch}


def saturated_bubble_ratio(trace, pp: int) -> float:
    """Bubble ratio over the saturated part of an all-at-once run: from the start until
    fewer than 2 x pp requests are left (after that the pipeline cannot be kept full:
    a request is in one stage at a time)."""
    import pandas as pd

    from core.metrics import bubble_ratio

    finish = trace.requests["finish"].sort_values().to_numpy()
    k = len(finish) - 2 * pp
    if k < 0:
        return float("nan")
    window = pd.DataFrame({"arrival": [0.0], "finish": [float(finish[k])], "status": ["finished"]})
    return bubble_ratio(trace.batches, window, pp).overall


def run_engine(path: Path, reqs: list[tuple[list[int], int]], pp: int, policy: str,
               threads: int | None, num_pages: int, split: str | None = None) -> dict:
    from core.metrics import summarize
    from runtime.llm import LLM, SamplingParams

    with LLM(path, pp=pp, policy=policy, num_pages=num_pages, page_size=16, num_threads=threads,
             layer_split=split) as llm:
        llm.generate([reqs[0][0][:16]] * 2, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        prompts = [p for p, _ in reqs]
        params = [SamplingParams(max_tokens=o, ignore_eos=True) for _, o in reqs]
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t
        assert [len(o.token_ids) for o in outs] == [o for _, o in reqs]
        trace = llm.trace()
        s = summarize(trace)
        b = trace.batches
        busy = (b["end"] - b["start"]).groupby(b["stage"]).sum()
        useful = sum(o for _, o in reqs)
        return {"wall_s": wall, "output_tokens": useful, "output_tps": useful / wall,
                "trace_output_tps": s["output_tps"], "bubble_ratio": s["bubble_ratio"],
                "bubble_ratio_saturated": saturated_bubble_ratio(trace, pp),
                "bubble_ratio_per_stage": [s[f"bubble_ratio_stage{i}"] for i in range(pp)],
                "stage_busy_s": [float(x) for x in busy.tolist()], "micro_batches": int(b["batch_id"].nunique()),
                "preemptions": s["preemptions"], "ttft_mean_s": s["ttft_mean"], "tpot_mean_s": s["tpot_mean"],
                "pp": pp, "layer_split": list(llm.config.layer_split), "policy": policy, "threads_per_stage": trace.meta["threads_per_stage"],
                "num_pages": llm.num_pages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--policy", default="token_throttling")
    ap.add_argument("--split", default=None, help="layers per stage, e.g. 5,3 (default: even)")
    ap.add_argument("--threads-per-stage", type=int, default=None, help="default: 1 on CPU")
    ap.add_argument("--hf-threads", type=int, default=None, help="default: torch's (all cores)")
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--num-pages", type=int, default=4096, help="KV pages of 16 tokens")
    ap.add_argument("--only", choices=("equal", "varied"), default=None)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--model-dir", type=Path, default=None, help="reuse/keep the random model here")
    args = ap.parse_args()

    import torch

    tmp = None
    if args.model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="pipetwin-bench-")
        args.model_dir = Path(tmp.name)
    if not (args.model_dir / "config.json").is_file():
        args.model_dir.mkdir(parents=True, exist_ok=True)
        make_model(args.model_dir)
    results: dict = {"model": {k: v for k, v in MODEL.items() if v is not None}, "workloads": {},
                     "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "torch": torch.__version__, "python": platform.python_version(),
                                 "load_avg_at_start": os.getloadavg()}}
    for name, reqs in workloads(args.quick).items():
        if args.only and name != args.only:
            continue
        ours = run_engine(args.model_dir, reqs, args.pp, args.policy, args.threads_per_stage, args.num_pages,
                          args.split)
        hf = run_hf(args.model_dir, reqs, args.hf_batch, args.hf_threads)
        results["workloads"][name] = {
            "requests": len(reqs), "prompt_tokens": sum(len(p) for p, _ in reqs),
            "output_tokens": sum(o for _, o in reqs), "engine": ours, "hf": hf,
            "speedup": ours["output_tps"] / hf["output_tps"]}
    results["machine"]["load_avg_at_end"] = os.getloadavg()

    print(f"\n{'workload':<8} {'reqs':>4} {'in tok':>7} {'out tok':>7} | {'engine tok/s':>12} {'HF tok/s':>9} "
          f"{'x HF':>5} | {'bubble':>6} {'sat.':>6} {'batches':>7}")
    for name, r in results["workloads"].items():
        e, h = r["engine"], r["hf"]
        print(f"{name:<8} {r['requests']:>4} {r['prompt_tokens']:>7} {r['output_tokens']:>7} | "
              f"{e['output_tps']:>12.1f} {h['output_tps']:>9.1f} {r['speedup']:>5.2f} | "
              f"{e['bubble_ratio']:>6.1%} {e['bubble_ratio_saturated']:>6.1%} {e['micro_batches']:>7}")
    print(f"engine: pp={args.pp} split {e['layer_split']} {args.policy}, {e['threads_per_stage']} thread(s) "
          f"per stage; HF: {h['threads']} threads, batch {args.hf_batch}; load avg "
          f"{results['machine']['load_avg_at_start'][0]:.1f} -> {results['machine']['load_avg_at_end'][0]:.1f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
