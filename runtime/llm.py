"""The user-facing API, shaped like vLLM's offline `LLM`.

    from runtime import LLM, SamplingParams
    with LLM("path/to/hf_model", pp=2, policy="token_throttling") as llm:
        outs = llm.generate([[1, 2, 3], "text works with a tokenizer"], SamplingParams(max_tokens=32))
        summary = core.metrics.summarize(llm.trace())

`model` is a Hugging Face directory (config.json + safetensors, Llama or Qwen2 family),
or "dummy:<preset, config.json path, model directory, or inline JSON>" (runtime.model_specs)
/ a config dict for seeded random weights (as is load_format="dummy" with a directory).
Under torchrun (WORLD_SIZE = pp) only rank 0 returns from `LLM(...)`; the other ranks
serve their stage and exit when rank 0 shuts down.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from core.kv_cache import PageAllocator
from core.policies import make_policy
from core.scheduler import Scheduler, SchedulerConfig
from core.trace import Trace
from runtime.config import ModelConfig
from runtime.driver import GenerateJob, GenerateResult
from runtime.engine import Engine
from runtime.engine_config import EngineConfig
from runtime.model_specs import dummy_config, is_dummy
from runtime.sampling import SamplingParams, is_int

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


@dataclass(slots=True, frozen=True)
class RequestMetrics:
    """Seconds on the generate call's clock (0 = its start)."""
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None
    preemptions: int

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None                # None when the model has no tokenizer
    finish_reason: str | None       # "length" | "stop" | "too_long"
    metrics: RequestMetrics


class LLM:
    def __init__(self, model: str | Path | dict, pp: int = 1, policy: str = "token_throttling",
                 policy_params: dict[str, Any] | None = None,
                 layer_split: str | Sequence[float] | None = None, num_pages: int | None = None,
                 page_size: int = 16, device: str = "cpu", dtype: str | torch.dtype | None = None,
                 seed: int = 0, load_format: str = "auto", *, kv_cache_gib: float | None = None,
                 gpu_memory_utilization: float = 0.9, num_threads: int | None = None,
                 stage_time_model: Any = None, attention_backend: str = "auto",
                 enforce_eager: bool = False) -> None:
        """num_pages: KV pages shared by every stage (None: each stage sizes its cache from
        kv_cache_gib, else 1 GiB on CPU or gpu_memory_utilization on GPU; the minimum wins).
        num_threads: torch threads per stage process (default 1 on CPU when pp > 1).
        stage_time_model: what a policy that plans in seconds (time_balanced) prices batches
        with, e.g. `profiles.latency_model.SlowestStage.of_profile(table)` for the table
        (measured or in situ) of this model on this machine.
        attention_backend: auto (triton on CUDA when it imports, else torch) | torch |
        triton | flashinfer. enforce_eager: no CUDA graphs for decode steps."""
        self.engine: Engine | None = None
        self.set_policy(policy, policy_params, stage_time_model)  # fail here, not in a stage process
        opts, self._eos, self.tokenizer = build_engine_config(
            model, pp=pp, layer_split=layer_split, num_pages=num_pages, page_size=page_size, device=device,
            dtype=dtype, seed=seed, load_format=load_format, kv_cache_gib=kv_cache_gib,
            gpu_memory_utilization=gpu_memory_utilization, num_threads=num_threads,
            attention_backend=attention_backend, enforce_eager=enforce_eager)
        self.config = opts
        self._last: GenerateResult | None = None
        self._trace: Trace | None = None
        self.engine = Engine(opts)

    # ---- properties ----
    @property
    def num_pages(self) -> int:
        """KV pages the scheduler manages (the minimum over stages)."""
        return self.engine.num_pages

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model_cfg

    def set_policy(self, policy: str, policy_params: dict[str, Any] | None = None,
                   stage_time_model: Any = None) -> None:
        """Scheduling policy for the next generate calls; the stage processes stay up."""
        # Bound once on a throwaway scheduler: a bad parameter or a missing stage-time model
        # fails here, not in a stage process.
        Scheduler(SchedulerConfig(1, 1), make_policy(policy, policy_params), stage_time_model=stage_time_model)
        self.policy, self.policy_params = policy, dict(policy_params or {})
        self.stage_time_model = stage_time_model

    # ---- generate ----
    def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 arrival_times: Sequence[float] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion. prompts: a list of strings or token-id lists
        (or one of either). arrival_times: seconds after the call starts at which each
        request is handed to the scheduler (default: all at once)."""
        engine = self._engine()
        token_prompts = self._tokenize(prompts)
        n = len(token_prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * n if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != n:
            raise ValueError(f"sampling_params has {len(params)} entries for {n} prompts")
        for i, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling_params[{i}] must be a runtime.SamplingParams, got {type(p).__name__}")
        if arrival_times is not None:
            arrival_times = [float(t) for t in arrival_times]
            if len(arrival_times) != n:
                raise ValueError(f"arrival_times has {len(arrival_times)} entries for {n} prompts")
            for i, t in enumerate(arrival_times):
                if not (math.isfinite(t) and t >= 0):
                    raise ValueError(f"arrival_times[{i}] must be a finite number of seconds >= 0, got {t!r}")
        kv = PageAllocator(max(1, self.num_pages), self.config.page_size)
        for i, (p, sp) in enumerate(zip(token_prompts, params)):
            need = kv.pages_for(len(p) + sp.max_tokens - 1)
            if need > self.num_pages:
                raise ValueError(
                    f"prompt {i}: {len(p)} prompt tokens + max_tokens {sp.max_tokens} need {need} KV pages "
                    f"of {self.config.page_size} tokens, but the KV cache has {self.num_pages}; "
                    "raise num_pages (or KV memory) or lower max_tokens")
        if n == 0:
            return []
        job = GenerateJob(
            prompts=token_prompts, max_tokens=[p.max_tokens for p in params],
            stop_token_ids=[frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self._eos)
                            for p in params],
            params=params, arrivals=arrival_times,
            policy=self.policy, policy_params=self.policy_params, stage_time_model=self.stage_time_model)
        self._last, self._trace = None, None
        result = engine.generate(job)
        self._last = result
        return [self._output(r) for r in result.requests]

    def trace(self) -> Trace | None:
        """The core Trace of the last generate call (the tables the simulator writes)."""
        if self._trace is None and self._last is not None:
            self._trace = self._last.trace()
        return self._trace

    def _output(self, r: Any) -> RequestOutput:
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(r.output_ids, skip_special_tokens=True)
        return RequestOutput(
            request_id=r.id, prompt_token_ids=list(r.prompt_ids), token_ids=list(r.output_ids), text=text,
            finish_reason=r.finish_reason,
            metrics=RequestMetrics(r.arrival, r.first_scheduled, r.token_times[0] if r.token_times else None,
                                   r.finish_time, r.preemptions))

    def _tokenize(self, prompts: Any) -> list[list[int]]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, Sequence) and prompts and is_int(prompts[0])):
            prompts = [prompts]
        if not isinstance(prompts, Sequence):
            raise ValueError(f"prompts must be a list of strings or token-id lists, got {type(prompts).__name__}")
        vocab = self.config.model_cfg.vocab_size
        out: list[list[int]] = []
        for i, p in enumerate(prompts):
            if isinstance(p, dict):
                if "prompt_token_ids" in p:
                    p = p["prompt_token_ids"]
                elif "prompt" in p:
                    p = p["prompt"]
                else:
                    raise ValueError(f"prompt {i}: a dict prompt needs 'prompt' or 'prompt_token_ids'")
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError(f"prompt {i} is text, but the model has no tokenizer files "
                                     f"({', '.join(_TOKENIZER_FILES)}); pass token-id lists")
                p = self.tokenizer.encode(p)
            if isinstance(p, torch.Tensor):
                p = p.tolist()
            try:
                check_prompt_ids(p, vocab)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
            out.append([int(t) for t in p])
        return out

    def _engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("LLM is shut down")
        return self.engine

    # ---- lifetime ----
    def shutdown(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


def build_engine_config(model: Any, pp: int = 1, layer_split: str | Sequence[float] | None = None,
                        num_pages: int | None = None, page_size: int = 16, device: str = "cpu",
                        dtype: str | torch.dtype | None = None, seed: int = 0, load_format: str = "auto",
                        kv_cache_gib: float | None = None, gpu_memory_utilization: float = 0.9,
                        num_threads: int | None = None, attention_backend: str = "auto",
                        enforce_eager: bool = False) -> tuple[EngineConfig, frozenset[int], Any]:
    """(validated engine config, eos token ids, HF tokenizer or None) for LLM and AsyncLLM."""
    path, cfg, fmt, eos = _resolve_model(model, load_format)
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype == "auto":
        dtype = None
    opts = EngineConfig(
        model_path=None if path is None else str(path), model_cfg=cfg, load_format=fmt, pp=pp,
        # a string ("5,3", "4.5,3.5") is parsed by EngineConfig, whose errors name pp and num_layers
        layer_split=layer_split if isinstance(layer_split, str) else tuple(layer_split or ()),
        num_pages=num_pages, page_size=page_size,
        kv_cache_gib=kv_cache_gib, gpu_memory_utilization=gpu_memory_utilization,
        device=str(device), dtype=dtype, seed=seed, num_threads=num_threads,
        attention_backend=attention_backend, enforce_eager=enforce_eager)
    return opts, eos, _load_tokenizer(path)


def check_prompt_ids(ids: Any, vocab: int) -> None:
    """ValueError unless `ids` is a non-empty list of token ids inside the vocabulary."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not all(is_int(t) for t in ids):
        raise ValueError("a prompt must be a string or a list of int token ids")
    if not ids:
        raise ValueError("the prompt is empty")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} outside the vocabulary [0, {vocab})")


def _resolve_model(model: Any, load_format: str) -> tuple[Path | None, ModelConfig, str, frozenset[int]]:
    """(directory or None, config, "safetensors" | "dummy", eos token ids)."""
    if load_format not in ("auto", "dummy", "safetensors"):
        raise ValueError(f"load_format must be 'auto', 'dummy' or 'safetensors', got {load_format!r}")
    if isinstance(model, dict):
        return None, _cfg_from_dict(model, "config dict"), _dummy_only(load_format), _eos_of(model)
    if not isinstance(model, (str, Path)):
        raise ValueError(f"model must be a directory, 'dummy:<preset | config.json path>' or a config dict, "
                         f"got {type(model).__name__}")
    text = str(model)
    if is_dummy(text):
        try:
            d, where = dummy_config(text)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} (model 'dummy:<path>')") from None
        except ValueError as e:
            raise ValueError(f"model {text[:60]!r}: {e}") from None
        return None, _cfg_from_dict(d, where), _dummy_only(load_format), _eos_of(d)
    path = Path(text)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model directory not found")
    cfg = ModelConfig.from_dir(path)
    d = json.loads((path / "config.json").read_text())
    eos = _eos_of(d)
    gen = path / "generation_config.json"
    if gen.is_file():
        try:
            eos |= _eos_of(json.loads(gen.read_text()))
        except json.JSONDecodeError:
            pass
    fmt = "dummy" if load_format == "dummy" else "safetensors"
    if fmt == "safetensors" and not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path}: no *.safetensors files found (use load_format='dummy' "
                                "for random weights of this config)")
    return path, cfg, fmt, eos


def _dummy_only(load_format: str) -> str:
    if load_format == "safetensors":
        raise ValueError("load_format 'safetensors' needs a model directory, not a dummy config")
    return "dummy"


def _cfg_from_dict(d: Any, where: str) -> ModelConfig:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a model config must be a JSON object")
    try:
        return ModelConfig.from_hf(d)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _eos_of(d: dict) -> frozenset[int]:
    eos = d.get("eos_token_id")
    if eos is None:
        return frozenset()
    return frozenset(int(e) for e in (eos if isinstance(eos, list) else [eos]))


def _load_tokenizer(path: Path | None) -> Any:
    if path is None or not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer  # only when the directory has one

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - say which directory
        raise ValueError(f"{path}: tokenizer files present but AutoTokenizer cannot load them ({e})") from e
