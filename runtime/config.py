"""Model config read from a Hugging Face config.json, and the layer split across stages.

Only the Llama and Qwen2 families are supported: both are pre-norm decoders with RMSNorm,
RoPE, grouped-query attention and a SwiGLU MLP; Qwen2 adds a bias to q/k/v. Anything
we would silently compute wrong (another activation, sliding windows, an unknown RoPE
scaling) is refused with an error that names the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
        if self.dtype not in _DTYPES:
            raise ValueError(f"torch_dtype {self.dtype!r} is not supported "
                             f"(supported: {', '.join(_DTYPES)})")
        _check_rope_scaling(self.rope_scaling)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

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


def layer_split(num_layers: int, pp: int, split: str | Sequence[int] | None = None) -> list[int]:
    """Layers per stage. Even by default; the remainder goes to the earlier stages so the
    last stage, which also runs the final norm, LM head and sampling, is the lighter one."""
    if pp < 1:
        raise ValueError(f"pp must be >= 1, got {pp}")
    if split is None:
        if num_layers < pp:
            raise ValueError(f"cannot split {num_layers} layers over pp={pp} stages")
        base, extra = divmod(num_layers, pp)
        return [base + (1 if s < extra else 0) for s in range(pp)]
    text = split if isinstance(split, str) else ",".join(str(x) for x in split)
    want = f"pp={pp} positive entries summing to num_layers={num_layers}"
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"layer split {text!r} is not a comma-separated list of integers "
                         f"(need {want})") from None
    if len(parts) != pp or any(p < 1 for p in parts) or sum(parts) != num_layers:
        raise ValueError(f"layer split {text!r} must have {want} "
                         f"(got {len(parts)} entries summing to {sum(parts)})")
    return parts


def stage_layers(split: Sequence[int], stage: int) -> range:
    """Global layer indices held by `stage`."""
    if not 0 <= stage < len(split):
        raise ValueError(f"stage {stage} out of range for pp={len(split)}")
    start = sum(split[:stage])
    return range(start, start + split[stage])


def read_config_json(file: Path, hint: str = "") -> dict:
    """A config.json as a dict; a missing or broken file names itself."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: config.json not found{hint}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
