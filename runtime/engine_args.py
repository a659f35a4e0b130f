"""The runtime's settings as flags and config keys, declared once for `pipetwin bench`,
`serve`, `profile` and validate configs. No torch here: every command's parser is built
before any command runs.

    add_engine_args(parser)        --model --pp --layer-split [--num-pages] --page-size
                                   --threads --device --dtype [--seed]
                                   --attention-backend --enforce-eager
    check_engine_values(values)    ValueError naming the flag (or config key)
    engine_kwargs(values)          the keyword arguments of runtime.LLM / runtime.AsyncLLM
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Mapping

from runtime.model_specs import PRESETS

DEVICES = ("cpu", "cuda")                     # cuda: one GPU per stage (NCCL)
DTYPES = ("float32", "bfloat16", "float16")  # None (left out): the model config's torch_dtype
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flashinfer")   # runtime.attention.BACKENDS
MODEL_HELP = f"model directory or dummy:<preset | config.json | inline JSON> (presets: {', '.join(PRESETS)})"
# config key -> (lowest allowed value) of the integer settings
_INT_LOWS = {"pp": 1, "num_pages": 1, "page_size": 1, "threads": 1, "seed": 0}


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_engine_args(p: argparse.ArgumentParser, *, defaults: bool = True, num_pages: bool = True,
                    seed: bool = True) -> None:
    """The runtime's flags. defaults=False (a YAML config fills what the flags leave out):
    every flag defaults to None and --model is optional."""
    def default(value: Any) -> Any:
        return value if defaults else None

    p.add_argument("--model", required=defaults, help=MODEL_HELP)
    p.add_argument("--pp", type=int, default=default(1), help="pipeline stages (one process each; default 1)")
    p.add_argument("--layer-split", help="layers per stage, e.g. 5,3 or 4.5,3.5 (a .5 puts the boundary between "
                                         "a layer's attention and its MLP; default: even, remainder first)")
    if num_pages:
        p.add_argument("--num-pages", type=int, help="KV pages (default: the runtime's, 1 GiB per stage on CPU)")
    p.add_argument("--page-size", type=int, default=default(16), help="tokens per KV page (default 16)")
    p.add_argument("--threads", type=int, help="torch threads per stage process (default 1 on CPU)")
    p.add_argument("--device", default=default("cpu"), help="cpu | cuda (one GPU per stage; default cpu)")
    p.add_argument("--dtype", help=f"{' | '.join(DTYPES)} (default: the model config's torch_dtype)")
    if seed:
        p.add_argument("--seed", type=int, default=default(0), help="weights and sampling seed (default 0)")
    p.add_argument("--attention-backend", default=default("auto"),
                   help=f"{' | '.join(ATTENTION_BACKENDS)} (default auto: triton on CUDA, torch on CPU)")
    p.add_argument("--enforce-eager", action="store_true", default=default(False),
                   help="no CUDA graphs for decode-only micro-batches (GPU)")


def check_engine_values(values: Mapping[str, Any], name: Callable[[str], str] = flag_name) -> None:
    """ValueError naming the flag (`name` turns a key into what the user wrote)."""
    for key, low in _INT_LOWS.items():
        v = values.get(key)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
            raise ValueError(f"{name(key)} must be an integer >= {low}, got {v!r}")
    device = values.get("device")
    if device is not None and device not in DEVICES:
        raise ValueError(f"{name('device')} must be one of {', '.join(DEVICES)}, got {device!r}")
    dtype = values.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"{name('dtype')} must be one of {', '.join(DTYPES)} (or left out), got {dtype!r}")
    backend = values.get("attention_backend")
    if backend is not None and backend not in ATTENTION_BACKENDS:
        raise ValueError(f"{name('attention_backend')} must be one of {', '.join(ATTENTION_BACKENDS)}, "
                         f"got {backend!r}")
    eager = values.get("enforce_eager")
    if eager is not None and not isinstance(eager, bool):
        raise ValueError(f"{name('enforce_eager')} must be true or false, got {eager!r}")


def engine_kwargs(values: Mapping[str, Any] | argparse.Namespace) -> dict[str, Any]:
    """runtime.LLM / AsyncLLM keyword arguments (model first) from flags or a config dict."""
    v = vars(values) if isinstance(values, argparse.Namespace) else values
    out = {"model": v["model"], "pp": v.get("pp") or 1, "layer_split": v.get("layer_split"),
           "num_pages": v.get("num_pages"), "page_size": v.get("page_size") or 16,
           "num_threads": v.get("threads"), "device": v.get("device") or "cpu", "dtype": v.get("dtype"),
           "attention_backend": v.get("attention_backend") or "auto",
           "enforce_eager": bool(v.get("enforce_eager"))}
    if v.get("seed") is not None:
        out["seed"] = v["seed"]
    return out
