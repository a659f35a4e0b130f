"""All stages in one process, run one after another: the reference the multi-process
runtime is checked against, and a quick way to run or profile a split on one device."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from core.batch import MicroBatch
from runtime.attention import resolve_backend
from runtime.batch_meta import BatchMeta, input_ids
from runtime.config import ModelConfig
from runtime.kv_cache import KVCache
from runtime.model import StageModel
from runtime.weights import load_stage


class LocalPipeline:
    def __init__(self, path: str | Path | None, pp: int = 1,
                 split: str | Sequence[int] | None = None, num_pages: int = 256,
                 page_size: int = 16, load_format: str = "safetensors",
                 dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                 cfg: ModelConfig | None = None, seed: int = 0,
                 attention_backend: str = "auto") -> None:
        self.device = torch.device(device)
        self.page_size = page_size
        self.attention_backend = resolve_backend(attention_backend, self.device)
        self.stages: list[StageModel] = [
            load_stage(path, s, pp, split, load_format, dtype, device, cfg, seed) for s in range(pp)]
        self.caches: list[KVCache] = [m.make_kv_cache(num_pages, page_size) for m in self.stages]

    @property
    def cfg(self) -> ModelConfig:
        return self.stages[0].cfg

    @torch.inference_mode()
    def run(self, batch: MicroBatch) -> torch.Tensor:
        """Float32 logits [S, vocab] for the batch's sampling items, in item order."""
        meta = BatchMeta.from_batch(batch, self.page_size, self.device, self.attention_backend)
        x = torch.tensor(input_ids(batch), dtype=torch.long, device=self.device)
        for model, cache in zip(self.stages, self.caches):
            x = model(x, meta, cache)
        return x
