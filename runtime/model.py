"""One pipeline stage of a Llama/Qwen2 decoder.

Stage 0 embeds token ids; every stage runs its decoder layers; the last stage applies
the final norm and the LM head, only at the positions that sample. Between stages the
activations are (hidden, residual): the residual add is folded into the next RMSNorm
(as vLLM does), so a stage boundary is just a layer boundary with two tensors. A boundary
may also fall inside a layer, between its attention and its MLP (a split like 4.5,3.5):
the attention half ends with the same (hidden, residual) pair, so nothing else changes.
q/k/v and gate/up are fused into one matmul each; the loader fills the shards.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.attention import paged_attention
from runtime.batch_meta import BatchMeta
from runtime.config import ModelConfig, layer_split, stage_blocks, stage_layers
from runtime.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, **kw) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in float32 whatever the model dtype, like the reference
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in float32, with linear or llama3 scaling."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    factor = float(s["factor"])
    if s["rope_type"] == "linear":
        return inv / factor
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, **kw) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size,
                                  bias=cfg.qkv_bias, **kw)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias, **kw)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor], meta: BatchMeta) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(t, self.heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(t, self.kv_heads, self.head_dim), cos, sin)
        v = v.reshape(t, self.kv_heads, self.head_dim)
        o = paged_attention(q, k, v, kv[0], kv[1], meta)
        return self.o_proj(o.view(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, **kw) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.inter, bias=cfg.mlp_bias, **kw)
        self.down_proj = nn.Linear(self.inter, cfg.hidden_size, bias=cfg.mlp_bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class AttentionHalf(nn.Module):
    """The first half of a layer, the last thing on a stage whose boundary falls inside
    the layer (and the first half of DecoderLayer). Same attribute names as a whole
    layer, so weights load by the same names."""

    def __init__(self, cfg: ModelConfig, **kw) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, **kw)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                meta: BatchMeta) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden if residual is None else hidden + residual
        return self.self_attn(self.input_layernorm(residual), cos, sin, kv, meta), residual


class DecoderLayer(AttentionHalf):
    """A whole layer: the attention half, then the MLP half (as MLPHalf)."""

    def __init__(self, cfg: ModelConfig, **kw) -> None:
        super().__init__(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, **kw)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                meta: BatchMeta) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = super().forward(hidden, residual, cos, sin, kv, meta)
        residual = hidden + residual
        return self.mlp(self.post_attention_layernorm(residual)), residual


class MLPHalf(nn.Module):
    """The second half of a layer, the first thing on the next stage. Never on stage 0
    (block 0 is layer 0's attention), so `residual` is always given; holds no KV."""

    def __init__(self, cfg: ModelConfig, **kw) -> None:
        super().__init__()
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, **kw)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, kv: None, meta: BatchMeta) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden + residual
        return self.mlp(self.post_attention_layernorm(residual)), residual


def _layer_module(cfg: ModelConfig, has_attn: bool, has_mlp: bool, **kw) -> nn.Module:
    if has_attn and has_mlp:
        return DecoderLayer(cfg, **kw)
    return AttentionHalf(cfg, **kw) if has_attn else MLPHalf(cfg, **kw)


class StageModel(nn.Module):
    """Stage `stage` of `pp`. forward(inputs, meta, kv_cache):
    - inputs: stage 0 a LongTensor [T] of token ids; other stages (hidden, residual),
      each [T, hidden_size] in the model dtype.
    - returns: non-last stages (hidden, residual) for the next stage; the last stage
      float32 logits [S, vocab], one row per sampling item, in item order."""

    def __init__(self, cfg: ModelConfig, stage: int = 0, pp: int = 1,
                 split: str | Sequence[float] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        self.stage, self.pp = stage, pp
        self.split = layer_split(cfg.num_layers, pp, split)
        self.layer_ids = stage_layers(self.split, stage)   # layers held whole or in part
        blocks = stage_blocks(self.split, stage)
        self.is_first, self.is_last = stage == 0, stage == pp - 1
        self.dtype = dtype or cfg.torch_dtype
        kw = {"dtype": self.dtype, "device": device}
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **kw) if self.is_first else None
        self.layers = nn.ModuleList(_layer_module(cfg, 2 * i in blocks, 2 * i + 1 in blocks, **kw)
                                    for i in self.layer_ids)
        # KV slot of each layer module: one per layer whose attention this stage holds
        slots: list[int | None] = []
        self.num_kv_layers = 0
        for i in self.layer_ids:
            if 2 * i in blocks:
                slots.append(self.num_kv_layers)
                self.num_kv_layers += 1
            else:
                slots.append(None)   # an MLP half
        self.kv_slots: tuple[int | None, ...] = tuple(slots)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw) if self.is_last else None
        self.lm_head = None
        if self.is_last:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, **kw)
            if cfg.tie_word_embeddings and self.is_first:
                self.lm_head.weight = self.embed_tokens.weight
            # a tied last stage != stage 0 keeps its own copy, loaded from embed_tokens
        self._inv_freq: torch.Tensor | None = None

    def make_kv_cache(self, num_pages: int, page_size: int) -> KVCache:
        dev = next(self.parameters()).device
        return KVCache(num_pages, page_size, self.num_kv_layers, self.cfg.num_kv_heads,
                       self.cfg.head_dim, self.dtype, dev)

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], meta: BatchMeta,
                kv_cache: KVCache) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.is_first:
            hidden, residual = self.embed_tokens(inputs), None
        else:
            hidden, residual = inputs
        if self._inv_freq is None or self._inv_freq.device != hidden.device:
            self._inv_freq = rope_inv_freq(self.cfg).to(hidden.device)
        cos, sin = rope_cos_sin(self._inv_freq, meta.positions, hidden.dtype)
        for layer, slot in zip(self.layers, self.kv_slots):
            kv = None if slot is None else kv_cache.layer(slot)
            hidden, residual = layer(hidden, residual, cos, sin, kv, meta)
        if not self.is_last:
            return hidden, residual
        idx = meta.sample_idx
        last = hidden.index_select(0, idx) + residual.index_select(0, idx)
        return self.lm_head(self.norm(last)).float()
