"""`EngineConfig`: everything a stage process needs to build its part of the pipeline,
validated once in the caller's process and pickled to every stage."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.attention import resolve_backend
from runtime.config import TORCH_DTYPES, ModelConfig, layer_split


@dataclass(slots=True, frozen=True)
class EngineConfig:
    """Everything a stage process needs to build its part (pickled to each of them)."""
    model_path: str | None            # HF directory (None: dummy weights of `model_cfg`)
    model_cfg: ModelConfig
    load_format: str = "safetensors"  # "safetensors" | "dummy"
    pp: int = 1
    # layers per stage (filled from pp when empty): ints, or x.5 floats where a boundary
    # falls between a layer's attention and its MLP, e.g. (4.5, 3.5); a string such as
    # "4.5,3.5" is parsed into that tuple
    layer_split: tuple[int | float, ...] = ()
    num_pages: int | None = None      # KV pages; None: sized from memory on every stage
    page_size: int = 16
    kv_cache_gib: float | None = None  # KV memory per stage; None: 1 GiB on CPU, see below on GPU
    gpu_memory_utilization: float = 0.9
    device: str = "cpu"
    dtype: str | None = None          # None: the config's torch_dtype
    seed: int = 0
    num_threads: int | None = None    # torch threads per stage process (None: 1 on CPU)
    dist_timeout_s: float = 7 * 24 * 3600.0  # idle stages block in recv between generate calls
    startup_timeout_s: float = 600.0
    # auto | torch | triton | flashinfer (runtime.attention.resolve_backend); stored resolved
    attention_backend: str = "auto"
    enforce_eager: bool = False       # True: no CUDA graphs for decode-only micro-batches
    # decided once, here in the caller's process (see shared_gpu)
    _shared_gpu: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def bad(name: str, want: str, value: Any) -> ValueError:
            return ValueError(f"{name} must be {want}, got {value!r}")

        if self.load_format not in ("safetensors", "dummy"):
            raise bad("load_format", "'safetensors' or 'dummy'", self.load_format)
        if self.load_format == "safetensors" and self.model_path is None:
            raise ValueError("load_format 'safetensors' needs a model directory")
        if not (isinstance(self.pp, int) and self.pp >= 1):
            raise bad("pp", "an int >= 1", self.pp)
        raw: Any = self.layer_split
        if isinstance(raw, str):   # "4.5,3.5" from the API or a command line; "" means even
            raw = raw if raw.strip() else None
        else:
            raw = list(raw) or None
        split = layer_split(self.model_cfg.num_layers, self.pp, raw)
        object.__setattr__(self, "layer_split", tuple(split))
        if self.num_pages is not None and not (isinstance(self.num_pages, int) and self.num_pages >= 1):
            raise bad("num_pages", "an int >= 1 (or None to size the KV cache from memory)", self.num_pages)
        if not (isinstance(self.page_size, int) and self.page_size >= 1):
            raise bad("page_size", "an int >= 1", self.page_size)
        if self.kv_cache_gib is not None and not (isinstance(self.kv_cache_gib, (int, float)) and self.kv_cache_gib > 0):
            raise bad("kv_cache_gib", "a number > 0", self.kv_cache_gib)
        if not (isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1):
            raise bad("gpu_memory_utilization", "a number in (0, 1]", self.gpu_memory_utilization)
        if self.dtype is not None and self.dtype not in TORCH_DTYPES:
            raise bad("dtype", f"one of {sorted(TORCH_DTYPES)} or None", self.dtype)
        if self.num_threads is not None and not (isinstance(self.num_threads, int) and self.num_threads >= 1):
            raise bad("num_threads", "an int >= 1 or None", self.num_threads)
        dev = torch.device(self.device)
        if dev.type not in ("cpu", "cuda"):
            raise bad("device", "'cpu' or 'cuda'", self.device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
        if not isinstance(self.enforce_eager, bool):
            raise bad("enforce_eager", "true or false", self.enforce_eager)
        # Not re-read in a stage process: a spawned stage sets WORLD_SIZE itself before it
        # reads this, and would then take cuda:<rank> and nccl on a one-GPU machine.
        object.__setattr__(self, "_shared_gpu", dev.type == "cuda" and self.pp > 1
                           and "WORLD_SIZE" not in os.environ and torch.cuda.device_count() < self.pp)
        object.__setattr__(self, "attention_backend",
                           resolve_backend(self.attention_backend, self.stage_device(0)))

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else TORCH_DTYPES[self.dtype]

    @property
    def shared_gpu(self) -> bool:
        """pp > 1 on fewer GPUs than stages (e.g. one): a functional mode, not a fast one.
        Every stage process uses cuda:0 and activations go through host memory (gloo);
        the real path is one GPU per stage with NCCL. Decided when the config is made (in
        the caller's process, or each torchrun rank's)."""
        return self._shared_gpu

    @property
    def backend(self) -> str:
        cuda = torch.device(self.device).type == "cuda"
        return "nccl" if cuda and not self.shared_gpu else "gloo"

    def stage_device(self, stage: int) -> str:
        dev = torch.device(self.device)
        if dev.type == "cpu":
            return "cpu"
        if self.pp == 1:
            return str(dev) if dev.index is not None else "cuda:0"
        if self.shared_gpu:
            return "cuda:0"
        return f"cuda:{int(os.environ.get('LOCAL_RANK', stage))}"  # one GPU per stage

    def threads_for(self, multi_process: bool) -> int | None:
        """torch threads: the explicit value, else 1 per stage process on CPU (measured:
        2 threads per process thrash when stages share a 2-core machine); in-process pp=1
        leaves the caller's setting alone."""
        if self.num_threads is not None:
            return self.num_threads
        return 1 if multi_process and torch.device(self.device).type == "cpu" else None
