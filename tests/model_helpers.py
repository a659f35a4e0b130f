"""Small torch models the runtime tests share (tests/helpers.py stays torch-free)."""
from __future__ import annotations

import torch

from runtime.config import ModelConfig
from runtime.model import StageModel


def tiny_gqa_stage() -> StageModel:
    """A whole one-stage model (embedding to logits): 2 layers, GQA 4:2, head_dim 16,
    vocabulary 101, weights N(0, 0.2) drawn with seed 0 (large enough that attention
    differences show in the logits)."""
    cfg = ModelConfig(model_type="llama", hidden_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, intermediate_size=96, vocab_size=101)
    torch.manual_seed(0)
    model = StageModel(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model
