"""Load one stage's weights from a Hugging Face directory, or make seeded dummy ones.

A stage reads only the tensors it owns (safetensors opens lazily, so a stage of a big
sharded checkpoint never touches the other stages' bytes); a stage holding half a layer
has only that half's modules, so it reads only input_layernorm + self_attn.* (attention
half) or post_attention_layernorm + mlp.* (MLP half). Dummy weights are seeded per
Hugging Face tensor name, so a model split 1, 2 or 3 ways, on whole or half layers,
computes the same thing.
"""
from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from runtime.config import ModelConfig
from runtime.model import StageModel

# Our fused parameters and the Hugging Face tensors stacked in them (along dim 0).
_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def hf_sources(model: StageModel) -> dict[str, list[tuple[str, int, int]]]:
    """Our parameter name -> [(HF tensor name, row offset, rows)] filling it."""
    cfg = model.cfg
    shard_rows = {"self_attn.qkv_proj": (cfg.q_size, cfg.kv_size, cfg.kv_size),
                  "mlp.gate_up_proj": (cfg.intermediate_size, cfg.intermediate_size)}
    out: dict[str, list[tuple[str, int, int]]] = {}
    for name, param in model.named_parameters():  # a tied pp=1 lm_head is listed once
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            out[name] = [("model.embed_tokens.weight", 0, param.shape[0])]
            continue
        if not name.startswith("layers."):
            hf = name if name == "lm_head.weight" else f"model.{name}"
            out[name] = [(hf, 0, param.shape[0])]
            continue
        _, local, rest = name.split(".", 2)   # a half layer has only its half's params
        prefix = f"model.layers.{model.layer_ids[int(local)]}."
        module, kind = rest.rsplit(".", 1)
        if module in _FUSED:
            offset, sources = 0, []
            for part, rows in zip(_FUSED[module], shard_rows[module]):
                sources.append((f"{prefix}{part}.{kind}", offset, rows))
                offset += rows
            out[name] = sources
        else:
            out[name] = [(prefix + rest, 0, param.shape[0])]
    return out


def _tensor_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        for file in set(weight_map.values()):
            if not (path / file).is_file():
                raise FileNotFoundError(f"{path / file}: listed in {index.name} but missing")
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files found")
    out: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                out[name] = file
    return out


def load_weights(model: StageModel, path: str | Path) -> None:
    """Fill every parameter of `model` from the safetensors under `path`."""
    path = Path(path)
    files = _tensor_files(path)
    needed: dict[Path, list[tuple[torch.Tensor, str, int, int]]] = {}
    for name, sources in hf_sources(model).items():
        param = model.get_parameter(name)
        for hf, offset, rows in sources:
            if hf not in files:
                raise KeyError(f"{path}: tensor {hf!r} not found in the safetensors files")
            needed.setdefault(files[hf], []).append((param, hf, offset, rows))
    with torch.no_grad():
        for file, entries in needed.items():
            with safe_open(str(file), framework="pt") as f:
                for param, hf, offset, rows in entries:
                    expected = (rows, *param.shape[1:])
                    found = tuple(f.get_slice(hf).get_shape())
                    if found != expected:
                        raise ValueError(f"{file}: tensor {hf!r} has shape {list(found)}, "
                                         f"expected {list(expected)}")
                    param[offset:offset + rows].copy_(f.get_tensor(hf))


def dummy_weights(model: StageModel, seed: int = 0, std: float = 0.02) -> None:
    """Seeded random weights; norms are ones. Same HF name and seed => same values.

    Each tensor has its own generator (seeded by its HF name), so tensors are drawn in
    parallel threads (torch releases the GIL) with the very same values: drawing is
    serial per generator at ~125 M values/s, ~22 s for an 8-layer Llama-3-8B-shaped stage
    with embedding and LM head, which benchmarks/gpu_check.py's CLI steps each paid."""
    jobs = []
    with torch.no_grad():
        for name, sources in hf_sources(model).items():
            param = model.get_parameter(name)
            for hf, offset, rows in sources:
                if hf.endswith("norm.weight"):
                    param[offset:offset + rows].fill_(1.0)
                else:
                    jobs.append((param[offset:offset + rows], zlib.crc32(hf.encode()) ^ seed))

    def draw(job: tuple[torch.Tensor, int]) -> None:
        dest, tensor_seed = job
        g = torch.Generator().manual_seed(tensor_seed)
        with torch.no_grad():
            dest.copy_(torch.randn(dest.shape, generator=g) * std)
    workers = min(8, os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        for job in jobs:
            draw(job)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(draw, jobs))   # list(): re-raise a worker's error here


def load_stage(path: str | Path | None, stage: int = 0, pp: int = 1,
               split: str | Sequence[float] | None = None, load_format: str = "safetensors",
               dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
               cfg: ModelConfig | None = None, seed: int = 0) -> StageModel:
    """Build stage `stage` of `pp` and fill it. `load_format` is "safetensors" (read from
    `path`) or "dummy" (seeded random; `cfg` may replace `path`'s config.json)."""
    if load_format not in ("safetensors", "dummy"):
        raise ValueError(f"load_format must be 'safetensors' or 'dummy', got {load_format!r}")
    if cfg is None:
        if path is None:
            raise ValueError("need a model directory or a ModelConfig")
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: model directory not found")
        cfg = ModelConfig.from_dir(path)
    # build without initialising (meta), then allocate: the loader writes every value
    model = StageModel(cfg, stage, pp, split, dtype, device="meta")
    model.to_empty(device=device)
    if model.lm_head is not None and cfg.tie_word_embeddings and model.is_first:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty may untie
    if load_format == "dummy":
        dummy_weights(model, seed)
    else:
        if path is None:
            raise ValueError("load_format 'safetensors' needs a model directory")
        load_weights(model, path)
    return model.eval()
