"""Model specs: what `--model`, a config's `model:` and `LLM(model)` accept besides a
Hugging Face directory, in one place. No torch here: the CLI reads the presets for its
help text.

    dummy:<preset>        a built-in config (PRESETS), seeded random weights
    dummy:<config.json>   a config file, or a directory holding one
    dummy:{...}           an inline JSON object
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DUMMY = "dummy:"

# The runtime benchmarks' model (benchmarks/runtime_cpu.py): a 32M random Llama.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-32m": dict(model_type="llama", hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=1408, vocab_size=8192,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, torch_dtype="float32", hidden_act="silu"),
}


def is_dummy(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith(DUMMY)


def dummy_config(spec: str) -> tuple[dict, str]:
    """(HF config dict, where it came from) of a "dummy:..." spec. Raises ValueError
    (FileNotFoundError for a missing file) whose message names the spec or file."""
    body = spec[len(DUMMY):].strip() if is_dummy(spec) else spec.strip()
    if body in PRESETS:
        return dict(PRESETS[body]), f"preset {body}"
    if body.startswith("{"):
        try:
            d = json.loads(body)
        except json.JSONDecodeError as e:
            raise ValueError(f"inline config is not valid JSON ({e})") from None
        where = "inline config"
    else:
        file = Path(body)
        if file.is_dir():
            file = file / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: config.json not found, and no preset of that name "
                                    f"(presets: {', '.join(PRESETS)})")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        where = str(file)
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a model config must be a JSON object")
    return d, where


def resolve_preset(model: Any) -> Any:
    """A "dummy:<preset>" becomes the preset's config dict (what `runtime.LLM` and a
    results folder's config record); anything else stays as given."""
    if is_dummy(model):
        body = model[len(DUMMY):].strip()
        if body in PRESETS:
            return dict(PRESETS[body])
    return model


def display_name(model: Any) -> str:
    """A short name for reports: presets and paths as given, configs by their shape."""
    if isinstance(model, str) and model.startswith(DUMMY + "{"):
        try:
            model = json.loads(model[len(DUMMY):])
        except json.JSONDecodeError:
            return model[:60]
    if isinstance(model, dict):
        return f"dummy:{model.get('model_type', 'llama')}-h{model.get('hidden_size')}-l{model.get('num_hidden_layers')}"
    return str(model)
