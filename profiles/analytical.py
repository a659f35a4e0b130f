"""Roofline latency tables: FLOPs and bytes per stage from a model config and a GPU spec.

Each kernel group (linear layers, KV-cache write, prefill attention, decode attention,
embedding, final norm + LM head, sampler) costs max(FLOPs / (peak x eff_c), bytes /
(bw x eff_m)); the groups are summed, not overlapped, because they run back to back on
one stream. A fixed floor per layer stands for kernel launches. See profiles/README.md.

    python -m profiles.analytical --out profiles/tables
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

import pandas as pd

from profiles import specs
from profiles.schema import Profile, save_profile
from profiles.specs import GpuSpec

PPS = (1, 2, 4, 8)
MIN_KV_TOKENS = 8192   # a table whose KV cache holds less than one long prompt is useless


def stage_latency(cfg: dict, gpu: GpuSpec, layers: int, first: bool, last: bool,
                  prefill_tokens: float, decode_tokens: float,
                  prefill_attention_work: float, decode_context: float,
                  dtype_bytes: int = 2, compute_eff: float = specs.COMPUTE_EFFICIENCY,
                  memory_eff: float = specs.MEMORY_EFFICIENCY) -> float:
    flops_s, bytes_s = gpu.peak_flops * compute_eff, gpu.mem_bw * memory_eff

    def roof(flops: float, nbytes: float) -> float:
        return max(flops / flops_s, nbytes / bytes_s)

    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = specs.head_dim(cfg)
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    kvb = specs.kv_bytes_per_token_per_layer(cfg, dtype_bytes)
    p, d = prefill_tokens, decode_tokens
    tokens = p + d
    # Linear layers: 2 FLOPs per weight per token; read all weights once, plus every
    # linear's input and output and the norm/residual traffic per token.
    lin_params = specs.layer_params(cfg) - 2 * h
    act_elems = (h + q + 2 * kv) + (q + h) + (h + 2 * inter) + 3 * inter + (inter + h) + 6 * h
    t = layers * roof(2 * lin_params * tokens,
                      specs.layer_params(cfg) * dtype_bytes + tokens * act_elems * dtype_bytes)
    t += layers * tokens * 2 * kvb / bytes_s                  # read new k/v, write cache
    # Attention: QK^T and PV are 2*hd FLOPs each per (query, key) pair and head. Prefill
    # counts the full chunk x context rectangle (the table's feature), which overstates a
    # causal first chunk by up to 2x; decode is a KV read.
    attn_flops = 4 * cfg["num_attention_heads"] * hd
    if p > 0:
        t += layers * roof(attn_flops * prefill_attention_work,
                           prefill_attention_work / specs.ATTN_QUERY_TILE * kvb
                           + p * 2 * q * dtype_bytes)
    if d > 0:
        t += layers * roof(attn_flops * decode_context,
                           decode_context * kvb + d * 2 * q * dtype_bytes)
    t += layers * specs.KERNEL_FLOOR_PER_LAYER_S
    if first:   # embedding gather: only the looked-up rows are read
        t += tokens * h * dtype_bytes * 2 / bytes_s + specs.KERNEL_FLOOR_S
    if last:
        # Logits only at sampled positions: one per decode plus one per prefill request;
        # we assume one prefill request per micro-batch (a chunked-prefill batch usually
        # holds one or two), so rows = decodes + 1 when there is prefill.
        rows = d + (1 if p > 0 else 0)
        t += tokens * h * dtype_bytes * 2 / bytes_s           # final norm
        t += roof(2 * h * vocab * rows, h * vocab * dtype_bytes + rows * (h * dtype_bytes + vocab * 4))
        t += rows * vocab * 4 * 2 / bytes_s                   # fp32 logits: softmax + pick
        t += 3 * specs.KERNEL_FLOOR_S
    return t


def weight_bytes_per_stage(cfg: dict, split: list[int], dtype_bytes: int = 2) -> list[int]:
    emb = cfg["vocab_size"] * cfg["hidden_size"] * dtype_bytes
    out = [n * specs.layer_params(cfg) * dtype_bytes for n in split]
    out[0] += emb
    # The last stage holds final norm + LM head; a tied head is a second copy unless the
    # embedding lives on the same GPU (pp=1).
    tied_here = cfg.get("tie_word_embeddings", False) and len(split) == 1
    out[-1] += cfg["hidden_size"] * dtype_bytes + (0 if tied_here else emb)
    return out


def shape_grid() -> list[tuple[int, int, int, int]]:
    """(prefill_tokens, decode_tokens, prefill_attention_work, decode_context): fresh
    prompts, chunks with a prefix, decode batches at several contexts, and mixes."""
    g = [(p, 0, p * p, 0) for p in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)]
    g += [(p, 0, p * c, 0) for p, c in ((256, 4096), (512, 2048), (512, 8192), (1024, 4096),
                                        (2048, 8192), (2048, 16384), (4096, 32768))]
    g += [(0, d, 0, d * c) for d in (1, 4, 16, 32, 64, 128, 256, 512) for c in (128, 1024, 4096)]
    g += [(0, d, 0, d * 16384) for d in (8, 64)]
    g += [(p, d, p * p, d * c) for p in (128, 512, 2048) for d, c in ((16, 1024), (64, 2048), (256, 1024))]
    return g


def make_profile(model: str, gpu: str | GpuSpec, pp: int, layer_split: list[int] | None = None,
                 config: dict | None = None, dtype: str = "bfloat16",
                 compute_eff: float = specs.COMPUTE_EFFICIENCY,
                 memory_eff: float = specs.MEMORY_EFFICIENCY, date: str | None = None) -> Profile:
    """Analytical table for a shipped model short name (or any HF-style `config`)."""
    hf_name, cfg = (model, config) if config is not None else specs.MODELS[model]
    gpu = specs.GPUS[gpu] if isinstance(gpu, str) else gpu
    nbytes = specs.DTYPE_BYTES[dtype]
    split = list(layer_split) if layer_split else specs.even_split(cfg["num_hidden_layers"], pp)
    if len(split) != pp or sum(split) != cfg["num_hidden_layers"] or min(split) < 1:
        raise ValueError(f"layer_split {split} does not split {cfg['num_hidden_layers']} layers in {pp}")
    if any(int(n) != n for n in split):
        # the roofline has no attention/MLP breakdown of a layer (and KV bytes would be wrong)
        raise ValueError(f"layer_split {split}: analytical tables need whole layers per stage; "
                         "profile a half-layer split with `pipetwin profile --layer-split`")
    split = [int(n) for n in split]
    rows = []
    for s, n in enumerate(split):
        for p, d, paw, dc in shape_grid():
            lat = stage_latency(cfg, gpu, n, s == 0, s == pp - 1, p, d, paw, dc,
                                nbytes, compute_eff, memory_eff)
            rows.append((s, n, p, d, paw, dc, lat, lat, lat, 1))
    stages = pd.DataFrame(rows, columns=["stage", "num_layers", "prefill_tokens", "decode_tokens",
                                         "prefill_attention_work", "decode_context", "latency_median",
                                         "latency_p10", "latency_p90", "samples"])
    act = cfg["hidden_size"] * nbytes * 2
    sizes = [act * t for t in (1, 4, 16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)]
    transfer = pd.DataFrame({"bytes": sizes,
                             "latency_median": [gpu.link_latency_s + b / gpu.link_bw for b in sizes],
                             "samples": 1})
    kvb = specs.kv_bytes_per_token_per_layer(cfg, nbytes)
    meta = {
        "device": gpu.name, "model": {"name": hf_name, "config": dict(cfg)}, "dtype": dtype,
        "pp": pp, "layer_split": split, "torch_version": "n/a",
        "attention_backend": "roofline (flash-attention-like tiling)",
        "date": date or _dt.date.today().isoformat(), "source": "analytical",
        "sched_overhead_s": specs.SCHED_OVERHEAD_S,
        "kv_bytes_per_token_per_stage": [n * kvb for n in split],
        "gpu_memory_bytes": gpu.memory_bytes,
        "weight_bytes_per_stage": weight_bytes_per_stage(cfg, split, nbytes),
        "activation_reserve_bytes": specs.activation_reserve_bytes(cfg, nbytes),
        "gpu_spec": {"peak_flops": gpu.peak_flops, "mem_bw": gpu.mem_bw, "link_bw": gpu.link_bw,
                     "link_latency_s": gpu.link_latency_s},
        "assumptions": {"compute_efficiency": compute_eff, "memory_efficiency": memory_eff,
                        "kernel_floor_per_layer_s": specs.KERNEL_FLOOR_PER_LAYER_S,
                        "kernel_floor_s": specs.KERNEL_FLOOR_S,
                        "prefill_requests_per_batch": 1},
    }
    prof = Profile(meta, stages, transfer, name=f"{model}_{gpu.name}_pp{pp}")
    prof.meta["kv_pages_16"] = prof.kv_pages(16, 0.9)   # computed before it is stored
    return prof


def skip_reason(model: str, gpu: str, pp: int) -> str | None:
    """Why this combination cannot serve, or None when it fits."""
    _, cfg = specs.MODELS[model]
    spec = specs.GPUS[gpu]
    if pp > cfg["num_hidden_layers"]:
        return f"pp={pp} exceeds {cfg['num_hidden_layers']} layers"
    split = specs.even_split(cfg["num_hidden_layers"], pp)
    heavy = max(weight_bytes_per_stage(cfg, split))
    room = spec.memory_bytes * 0.9 - specs.activation_reserve_bytes(cfg, 2)
    if heavy > room:
        return (f"heaviest stage holds {heavy / 1e9:.1f} GB of weights, only {room / 1e9:.1f} GB "
                f"usable (90% of {spec.memory_bytes / 1e9:.1f} GB minus activation reserve)")
    kv_tokens = 16 * make_profile(model, gpu, pp, date="-").kv_pages()
    if kv_tokens < MIN_KV_TOKENS:
        return f"KV cache would hold only {kv_tokens} tokens (< {MIN_KV_TOKENS})"
    return None


def generate_all(out_dir: str | Path, models=None, gpus=None, pps=PPS) -> tuple[list[str], list[str]]:
    """Write every fitting (model, gpu, pp) table; return (written names, skip notes)."""
    out_dir = Path(out_dir)
    written, skipped = [], []
    for model in models or specs.MODELS:
        for gpu in gpus or specs.GPUS:
            for pp in pps:
                name = f"{model}_{gpu}_pp{pp}"
                why = skip_reason(model, gpu, pp)
                if why:
                    skipped.append(f"{name}: {why}")
                    continue
                save_profile(make_profile(model, gpu, pp), out_dir / name, float_format="%.6g")
                written.append(name)
    return written, skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Regenerate analytical latency tables.")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "tables"))
    ap.add_argument("--models", nargs="*", choices=sorted(specs.MODELS))
    ap.add_argument("--gpus", nargs="*", choices=sorted(specs.GPUS))
    ap.add_argument("--pp", nargs="*", type=int, default=list(PPS))
    args = ap.parse_args(argv)
    written, skipped = generate_all(args.out, args.models, args.gpus, args.pp)
    print(f"wrote {len(written)} tables to {args.out}")
    for note in skipped:
        print(f"skipped {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
