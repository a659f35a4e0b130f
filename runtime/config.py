"""Model config read from a Hugging Face config.json, and the layer split across stages.

Only the Llama and Qwen2 families are supported: both are pre-norm decoders with RMSNorm,
RoPE, grouped-query attention and a SwiGLU MLP; Qwen2 adds a bias to q/k/v. Anything
we would silently compute wrong (another activation, sliding windows, an unknown RoPE
scaling) is refused with an error that names the field.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from runtime.engine_args import DTYPES

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


@dataclass(slots=True, frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None     # None, or {"rope_type": "linear"|"llama3", ...}
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    dtype: str = "float32"
    qkv_bias: bool = False               # Qwen2: always; Llama: attention_bias
    o_bias: bool = False                 # Llama attention_bias also biases o_proj
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(f"rms_norm_eps and rope_theta must be > 0, got "
                             f"{self.rms_norm_eps} and {self.rope_theta}")
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"torch_dtype {self.dtype!r} is not supported "
                             f"(supported: {', '.join(TORCH_DTYPES)})")
        _check_rope_scaling(self.rope_scaling)

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a config.json dict (transformers 4.x and 5.x spellings)."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
        if d.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported")

        def need(key: str) -> Any:
            if d.get(key) is None:
                raise ValueError(f"config.json: missing required field {key!r}")
            return d[key]

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        head_dim = d.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ValueError(f"config.json: hidden_size ({hidden}) is not divisible by "
                                 f"num_attention_heads ({heads}) and head_dim is not given")
            head_dim = hidden // heads
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
        rope = dict(d.get("rope_parameters") or {})
        theta = d.get("rope_theta", rope.pop("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rope or None)
        if scaling is not None:
            scaling = dict(scaling)
            scaling.pop("rope_theta", None)
            # older configs spell the kind "type"; "default" means no scaling
            kind = scaling.pop("rope_type", scaling.pop("type", "default"))
            scaling = None if kind == "default" else {"rope_type": kind, **scaling}
        attention_bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=need("intermediate_size"),
            vocab_size=need("vocab_size"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32").removeprefix("torch."),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        file = Path(path) / "config.json"
        d = read_config_json(file)
        try:
            return cls.from_hf(d)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None


def _check_rope_scaling(s: dict | None) -> None:
    if s is None:
        return
    kind = s.get("rope_type")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type {kind!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    keys = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                       "original_max_position_embeddings")}.get(kind, ())
    for key in keys:
        if s.get(key) is None:
            raise ValueError(f"rope_scaling ({kind}) is missing field {key!r}")


Number = int | float   # a layer count: an int when whole, a float when it ends in .5

def _as_number(value: Any) -> float | None:
    """`value` as a finite float, or None (bools and NaN/inf are not layer counts)."""
    if isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def parse_split(split: str | Sequence[Any], want: str = "") -> list[Number]:
    """Entries of a split, each a positive multiple of 0.5: ints when whole, floats for
    halves (so [4, 4] stays [4, 4]). Count and sum are checked by `layer_split`."""
    text = split if isinstance(split, str) else ",".join(str(x) for x in split)
    need = f" (need {want})" if want else " (need positive multiples of 0.5)"
    out: list[Number] = []
    for tok in text.split(","):
        x = _as_number(tok.strip())
        if x is None:
            raise ValueError(f"layer split {text!r}: entry {tok.strip()!r} is not a number{need}")
        if x <= 0:
            raise ValueError(f"layer split {text!r}: entry {tok.strip()!r} is not positive; every "
                             f"stage holds at least half a layer{need}")
        if not (2 * x).is_integer():
            raise ValueError(f"layer split {text!r}: entry {tok.strip()!r} is not a multiple of 0.5; "
                             f"a stage boundary falls between layers or between a layer's "
                             f"attention and its MLP{need}")
        out.append(int(x) if x.is_integer() else x)
    return out


def layer_split(num_layers: int, pp: int, split: str | Sequence[Any] | None = None) -> list[Number]:
    """Layers per stage. Even by default; the remainder goes to the earlier stages so the
    last stage, which also runs the final norm, LM head and sampling, is the lighter one.
    An explicit split may use halves: 4.5,3.5 gives stage 0 layers 0-3 and the attention
    of layer 4, stage 1 the MLP of layer 4 and layers 5-7 (see `stage_blocks`)."""
    if pp < 1:
        raise ValueError(f"pp must be >= 1, got {pp}")
    if split is None:
        if num_layers < pp:
            raise ValueError(f"cannot split {num_layers} layers over pp={pp} stages")
        base, extra = divmod(num_layers, pp)
        return [base + (1 if s < extra else 0) for s in range(pp)]
    want = (f"pp={pp} entries, each a positive multiple of 0.5, summing to "
            f"num_layers={num_layers}")
    text = split if isinstance(split, str) else ",".join(str(x) for x in split)
    parts = parse_split(text, want)
    if len(parts) != pp:
        raise ValueError(f"layer split {text!r} has {len(parts)} "
                         f"entr{'y' if len(parts) == 1 else 'ies'} (need {want})")
    total = sum(parts)
    if total != num_layers:
        total = int(total) if float(total).is_integer() else total
        raise ValueError(f"layer split {text!r} sums to {total} (need {want})")
    return parts


def stage_blocks(split: Sequence[Number], stage: int) -> range:
    """Half-layer blocks held by `stage`: block 2i is layer i's attention half (input norm,
    self-attention, its KV), block 2i + 1 its MLP half (post-attention norm, MLP)."""
    if not 0 <= stage < len(split):
        raise ValueError(f"stage {stage} out of range for pp={len(split)}")
    start = round(2 * sum(split[:stage]))
    return range(start, start + round(2 * split[stage]))


def stage_layers(split: Sequence[Number], stage: int) -> range:
    """Global indices of the layers `stage` holds whole or in part."""
    blocks = stage_blocks(split, stage)
    return range(blocks.start // 2, (blocks.stop + 1) // 2)


def kv_layers(split: Sequence[Number], stage: int) -> int:
    """Layers whose attention (and so KV cache) `stage` holds; an MLP half has no KV."""
    blocks = stage_blocks(split, stage)
    return len(range(blocks.start + blocks.start % 2, blocks.stop, 2))


def read_config_json(file: Path, hint: str = "") -> dict:
    """A config.json as a dict; a missing or broken file names itself."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: config.json not found{hint}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
