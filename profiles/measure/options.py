"""`pipetwin profile`'s options: flags, their checks, the model spec and the table name.
No torch at import: the CLI builds this parser for every command."""
from __future__ import annotations

import argparse
import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from profiles.measure.profile_grid import GRIDS
from profiles.schema import TABLES_DIR
from profiles.specs import layer_params
from runtime.engine_args import DEVICES, DTYPES, add_engine_args
from runtime.model_specs import DUMMY, PRESETS, dummy_config, is_dummy


class ProfilerError(ValueError):
    """A bad argument or an impossible run; the message names the flag."""


# ------------------------------------------------------------------ options

@dataclass(slots=True)
class ProfileOptions:
    model: str                           # DIR (config.json) or dummy:<preset|config.json|inline JSON>
    pp: int = 1
    layer_split: str | Sequence[float] | None = None   # e.g. "5,3" or "4.5,3.5"
    device: str = "cpu"
    dtype: str | None = None             # None: the config's torch_dtype
    page_size: int = 16
    time_budget: float = 300.0           # seconds for the whole run
    repeats: int = 5
    warmup: int = 1
    visits: int = 2                      # times each shape is timed, far apart; lowest median kept
    grid: str = "default"
    out: str | Path | None = None        # None: profiles/tables/<auto name>
    threads: int | None = None           # None: 1 on CPU (one thread per stage process)
    kv_cache_gib: float = 1.0            # CPU stand-in for the KV memory per stage
    min_shapes: int = 12                 # per stage, measured whatever the budget
    seed: int = 0
    force: bool = False                  # overwrite an existing table folder
    progress: bool = True
    transfer_tokens: tuple[int, ...] = (1, 16, 64, 256, 1024, 4096)
    attention_backend: str = "auto"      # as the engine's; resolved by validate()
    enforce_eager: bool = False          # as the engine's: no CUDA graphs for decode rows
    # filled by validate()
    name: str = ""
    hf_config: dict = field(default_factory=dict)
    split: list[int | float] = field(default_factory=list)   # ints, x.5 for half layers

    def validate(self) -> "ProfileOptions":
        self.name, self.hf_config = resolve_model(self.model)
        from runtime.config import ModelConfig, layer_split  # why: torch; the CLI builds this parser
        try:
            cfg = ModelConfig.from_hf(self.hf_config)
        except ValueError as e:
            raise ProfilerError(f"--model {self.model}: {e}") from None
        if not (isinstance(self.pp, int) and self.pp >= 1):
            raise ProfilerError(f"--pp must be an integer >= 1, got {self.pp!r}")
        if self.pp > cfg.num_layers:
            raise ProfilerError(f"--pp {self.pp}: the model has only {cfg.num_layers} layers")
        try:
            self.split = layer_split(cfg.num_layers, self.pp, self.layer_split)
        except ValueError as e:
            raise ProfilerError(f"--layer-split: {e}") from None
        if self.device not in DEVICES:
            raise ProfilerError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.device == "cuda":
            import torch  # why: only a cuda run needs it
            if not torch.cuda.is_available():
                raise ProfilerError("--device cuda: torch sees no CUDA device")
        if self.dtype is None:
            self.dtype = cfg.dtype if cfg.dtype in DTYPES else "float32"
        if self.dtype not in DTYPES:
            raise ProfilerError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for flag, value, low in (("--page-size", self.page_size, 1), ("--repeats", self.repeats, 1),
                                 ("--warmup", self.warmup, 0), ("--visits", self.visits, 1)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise ProfilerError(f"{flag} must be an integer >= {low}, got {value!r}")
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads >= 1):
            raise ProfilerError(f"--threads must be an integer >= 1, got {self.threads!r}")
        if not (isinstance(self.time_budget, (int, float)) and math.isfinite(self.time_budget)
                and self.time_budget > 0):
            raise ProfilerError(f"--time-budget must be a number of seconds > 0, got {self.time_budget!r}")
        if not (isinstance(self.kv_cache_gib, (int, float)) and self.kv_cache_gib > 0):
            raise ProfilerError(f"--kv-cache-gib must be > 0, got {self.kv_cache_gib!r}")
        if self.grid not in GRIDS:
            raise ProfilerError(f"--grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ProfilerError(f"--enforce-eager must be true or false, got {self.enforce_eager!r}")
        from runtime.attention import resolve_backend  # why: torch
        try:
            self.attention_backend = resolve_backend(self.attention_backend, self.device)
        except ValueError as e:
            raise ProfilerError(f"--attention-backend: {e}") from None
        if self.threads is None and self.device == "cpu":
            self.threads = 1
        if self.out is None:
            self.out = TABLES_DIR / default_table_name(self.name, self.device, self.threads, self.pp)
        out = Path(self.out)
        if out.exists() and not self.force and (not out.is_dir() or any(out.iterdir())):
            raise ProfilerError(f"--out {out}: exists and is not empty (pass --force to overwrite)")
        return self


def resolve_model(spec: str) -> tuple[str, dict]:
    """(model name, HF config dict) from `--model`: a directory holding config.json, or
    dummy:<preset name | path to a config.json | inline JSON object> (runtime.model_specs)."""
    if not isinstance(spec, str) or not spec:
        raise ProfilerError("--model: give a model directory or dummy:<config.json | inline JSON>")
    if is_dummy(spec):
        body = spec[len(DUMMY):].strip()
        try:
            cfg, _where = dummy_config(spec)
        except (ValueError, FileNotFoundError) as e:
            raise ProfilerError(f"--model {spec}: {e}") from None
        if body in PRESETS:
            return body, cfg
        cfg = {"model_type": "llama", **cfg}
        return config_name(cfg), cfg
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ProfilerError(f"--model {spec}: no config.json there (or use dummy:<config>)")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ProfilerError(f"--model {path / 'config.json'}: not valid JSON ({e})") from None
    return path.resolve().name, cfg


def config_name(cfg: dict) -> str:
    """A table name from a dummy config's size, e.g. llama-32m (parameters in millions)."""
    try:
        params = (cfg["num_hidden_layers"] * layer_params(cfg)
                  + cfg["vocab_size"] * cfg["hidden_size"] * (1 if cfg.get("tie_word_embeddings") else 2))
        return f"{cfg.get('model_type', 'llama')}-{max(1, round(params / 1e6))}m"
    except (KeyError, TypeError, ZeroDivisionError):
        return f"{cfg.get('model_type', 'model')}-dummy"


def _slug(text: str) -> str:
    out = "".join(c.lower() if c.isalnum() or c in ".-" else "-" for c in text)
    return "-".join(filter(None, out.split("-")))


def default_table_name(model: str, device: str, threads: int | None, pp: int) -> str:
    if device == "cpu":
        dev = f"cpu-{threads or 1}thread"
    else:
        import torch  # why: only a cuda table needs the device name
        dev = _slug(torch.cuda.get_device_name(0).removeprefix("NVIDIA "))
    return f"{_slug(model)}_{dev}_pp{pp}"


def cpu_name() -> str:
    name = platform.processor()
    if not name or name in ("x86_64", "aarch64", "arm64"):
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
    return name or platform.machine() or "unknown cpu"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`pipetwin profile`'s flags: the runtime's (runtime.engine_args) and the measurement's."""
    add_engine_args(p, num_pages=False)   # --model: only its config.json is read; weights are dummy
    p.add_argument("--time-budget", type=float, default=300.0,
                   help="seconds for the whole run; shapes stop when it is spent (default 300)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per shape (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per shape before them (default 1)")
    p.add_argument("--visits", type=int, default=2,
                   help="times each shape is timed (a minute or so apart); the lowest median is kept (default 2)")
    p.add_argument("--grid", default="default", help=f"shape grid: {' | '.join(GRIDS)} (default default)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0,
                   help="CPU: KV memory per stage the table's KV capacity stands for (default 1, the runtime's)")
    p.add_argument("--out", help="table folder (default profiles/tables/<model>_<device>_pp<N>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing table folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
