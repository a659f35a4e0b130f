"""The real pipeline: `from runtime import LLM, AsyncLLM, SamplingParams`.

The three are loaded on first use: the CLI imports torch-free parts of this package
(runtime.engine_args, runtime.model_specs) for every command, and importing the engine
here would load torch for `pipetwin sim` too.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.llm import LLM
    from runtime.online import AsyncLLM
    from runtime.sampling import SamplingParams

__all__ = ["LLM", "AsyncLLM", "SamplingParams"]
_HOMES = {"LLM": "runtime.llm", "AsyncLLM": "runtime.online", "SamplingParams": "runtime.sampling"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    import importlib  # why: loads torch only when LLM, AsyncLLM or SamplingParams is used

    return getattr(importlib.import_module(_HOMES[name]), name)
