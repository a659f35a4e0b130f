"""Hardware and model specs the analytical (roofline) generator works from.

Every number here is an assumption of the analytical tables, not a measurement:
a measured table (runtime/ profiler) always wins over a table generated from these.
"""
from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(slots=True, frozen=True)
class GpuSpec:
    name: str
    peak_flops: float         # dense bf16 tensor-core FLOP/s (datasheet, no sparsity)
    mem_bw: float             # HBM/GDDR bytes/s (datasheet)
    memory_bytes: int         # total device memory as nvidia-smi reports it
    link_bw: float            # effective point-to-point bytes/s to the next stage's GPU
    link_latency_s: float     # fixed cost of one send/recv (NCCL launch + handshake)

    def __post_init__(self) -> None:
        for f in ("peak_flops", "mem_bw", "memory_bytes", "link_bw"):
            if getattr(self, f) <= 0:
                raise ValueError(f"GpuSpec {self.name}: {f} must be positive")
        if self.link_latency_s < 0:
            raise ValueError(f"GpuSpec {self.name}: link_latency_s must be >= 0")


# Links: NVLink for the SXM parts (A100 NVLink3 600 GB/s bidirectional -> ~300 GB/s one
# way as NCCL p2p achieves; H100/H200 NVLink4 ~450 GB/s one way); L40S has no NVLink,
# so stages talk over PCIe 4.0 x16 (~25 GB/s achieved).
GPUS: dict[str, GpuSpec] = {
    "a100-80gb": GpuSpec("a100-80gb", 312e12, 2.039e12, 81920 * MIB, 300e9, 10e-6),
    "h100-80gb": GpuSpec("h100-80gb", 989e12, 3.35e12, 81559 * MIB, 450e9, 10e-6),
    "h200": GpuSpec("h200", 989e12, 4.8e12, 143771 * MIB, 450e9, 10e-6),
    "l40s": GpuSpec("l40s", 362e12, 0.864e12, 46068 * MIB, 25e9, 15e-6),
}

# Efficiency factors: the fraction of the datasheet peak that real kernels reach.
# Large bf16 GEMMs reach ~60-75% of peak in serving engines; streaming reads reach
# ~80-90% of HBM bandwidth. We take the low ends so analytical tables are not optimistic.
COMPUTE_EFFICIENCY = 0.6
MEMORY_EFFICIENCY = 0.8
# Without CUDA graphs a decoder layer launches ~10 kernels (norms, qkv, rope, cache
# write, attention, o-proj, norm, gate_up, act, down) at ~1.5 us each: ~15 us per layer
# is the floor even for a one-token micro-batch.
KERNEL_FLOOR_PER_LAYER_S = 15e-6
# Floor of one extra kernel (embedding gather, final norm, LM head, sampler).
KERNEL_FLOOR_S = 5e-6
# CPU time to form one micro-batch and broadcast its metadata to every stage (Python
# scheduler + input preparation in vLLM/SGLang-style engines is ~0.5-2 ms).
SCHED_OVERHEAD_S = 1e-3
# Flash-attention tiles queries by 128 rows; each tile streams the whole KV prefix once,
# so prefill KV reads are (chunk x context / 128) token-slots.
ATTN_QUERY_TILE = 128
# Memory kept out of the KV cache besides weights: CUDA context, NCCL buffers, allocator
# slack (1.5 GiB) plus the activation peak of the largest micro-batch we plan for.
RESERVE_BASE_BYTES = 1536 * MIB
MAX_BATCH_TOKENS = 8192


def _llama3(layers: int, hidden: int, heads: int, inter: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": 8,
        "intermediate_size": inter, "vocab_size": 128256,
        "tie_word_embeddings": False, "max_position_embeddings": 8192,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-05,
        "hidden_act": "silu", "torch_dtype": "bfloat16",
    }


def _qwen25(layers: int, hidden: int, heads: int, inter: int) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": 8,
        "intermediate_size": inter, "vocab_size": 152064,
        "tie_word_embeddings": False, "max_position_embeddings": 131072,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-05,
        "hidden_act": "silu", "torch_dtype": "bfloat16",
    }


# Short name -> (Hugging Face id, config.json values of the base models).
MODELS: dict[str, tuple[str, dict]] = {
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", _llama3(32, 4096, 32, 14336)),
    "llama-3-70b": ("meta-llama/Meta-Llama-3-70B", _llama3(80, 8192, 64, 28672)),
    "qwen2.5-14b": ("Qwen/Qwen2.5-14B", _qwen25(48, 5120, 40, 13824)),
    "qwen2.5-32b": ("Qwen/Qwen2.5-32B", _qwen25(64, 5120, 40, 27648)),
    "qwen2.5-72b": ("Qwen/Qwen2.5-72B", _qwen25(80, 8192, 64, 29568)),
}

DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}


def head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def layer_params(cfg: dict) -> int:
    """Weights of one decoder layer (q/k/v/o, gate/up/down, two norms); biases ignored."""
    h, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], head_dim(cfg)
    q = cfg["num_attention_heads"] * hd
    kv = cfg["num_key_value_heads"] * hd
    return h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h


def kv_bytes_per_token_per_layer(cfg: dict, dtype_bytes: int) -> int:
    return 2 * cfg["num_key_value_heads"] * head_dim(cfg) * dtype_bytes


def even_split(num_layers: int, pp: int) -> list[int]:
    """Even layer split; the remainder goes to the first stages (they are not the ones
    carrying the LM head, which keeps the last stage from being the heaviest twice)."""
    if not 1 <= pp <= num_layers:
        raise ValueError(f"pp={pp} must be in 1..{num_layers}")
    base, rem = divmod(num_layers, pp)
    return [base + (1 if s < rem else 0) for s in range(pp)]


def activation_reserve_bytes(cfg: dict, dtype_bytes: int) -> int:
    """Memory a stage keeps free for activations: the widest intermediate of the largest
    planned micro-batch (gate_up output, 2 x intermediate, plus a few hidden-sized
    buffers) and fp32 logits for up to 512 sampled rows, on top of a fixed base."""
    per_token = (2 * cfg["intermediate_size"] + 4 * cfg["hidden_size"]) * dtype_bytes
    logits = 512 * cfg["vocab_size"] * 4
    return RESERVE_BASE_BYTES + MAX_BATCH_TOKENS * per_token + logits
