"""What each layer loads: core/ is pure Python, the simulator never needs torch, the CLI's
parsers load no heavy package, and the runtime's API imports from `runtime`."""
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def imported_after(statement: str) -> set[str]:
    code = f"{statement}\nimport sys\nprint(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_every_core_module_leaves_simpy_and_torch_out():
    names = [m.name for m in pkgutil.iter_modules([str(ROOT / "core")])]
    assert {"scheduler", "policies", "kv_cache", "request", "batch", "workloads", "trace", "metrics"} <= set(names)
    loaded = imported_after("\n".join(f"import core.{n}" for n in names))
    assert "simpy" not in loaded and "torch" not in loaded


def test_simulator_and_profiles_leave_torch_out():
    loaded = imported_after("import sim, profiles, sim.run")
    assert "torch" not in loaded and "simpy" in loaded


def test_runtime_exports_the_api_and_its_flags_leave_torch_out():
    loaded = imported_after("import runtime.engine_args, runtime.model_specs, profiles.measure.options")
    assert "torch" not in loaded
    code = ("from runtime import LLM, AsyncLLM, SamplingParams\n"
            "import runtime.llm, runtime.online, runtime.sampling\n"
            "assert (LLM, AsyncLLM, SamplingParams) == (runtime.llm.LLM, runtime.online.AsyncLLM,"
            " runtime.sampling.SamplingParams)\n"
            "assert runtime.llm.SamplingParams is SamplingParams")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_cli_parsers_leave_torch_matplotlib_and_fastapi_out():
    loaded = imported_after("from cli.main import build_parser\nbuild_parser()")
    assert not {"torch", "matplotlib", "fastapi", "transformers"} & loaded


HELP_SCRIPT = """
import contextlib, io, sys
from cli.main import COMMANDS, build_parser, main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0, e.code
assert all(name.replace(" ", "-") in out.getvalue() for name in COMMANDS), out.getvalue()
build_parser([])
sys.stdout.write(" ".join(sys.modules))
"""
HEAVY = {"sim", "pandas", "torch", "matplotlib", "simpy", "optuna"}


def test_top_level_help_loads_no_command_module():
    """`pipetwin --help` lists every command from cli.main's table without importing the
    commands' modules, so neither the simulator nor pandas, torch, matplotlib or optuna;
    a command's own parser loads its module (its flags come from there)."""
    out = subprocess.run([sys.executable, "-c", HELP_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    loaded = set(out.stdout.split())
    assert not HEAVY & {m.split(".")[0] for m in loaded}
    assert not {module for module, _ in COMMANDS.values()} & loaded
    loaded = imported_after("from cli.main import build_parser\nbuild_parser(['sim'])")
    assert {"cli.sim", "sim", "pandas"} <= loaded and "cli.sweep" not in loaded


GUARDED_SCRIPT = """
import json, sys

from runtime import LLM, SamplingParams

if __name__ == "__main__":   # the README's pattern: stage processes import this file again
    with LLM("dummy:" + sys.argv[1], pp=2, num_pages=32, page_size=4) as llm:
        outs = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=3, ignore_eos=True))
    print("RESULT", json.dumps([len(o.token_ids) for o in outs]))
"""


def test_the_readme_script_runs_with_spawned_stages(tmp_path):
    pytest.importorskip("torch")
    cfg = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1, "intermediate_size": 64, "vocab_size": 64,
           "max_position_embeddings": 128, "torch_dtype": "float32"}
    script = tmp_path / "run.py"
    script.write_text(GUARDED_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, str(script), json.dumps(cfg)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESULT [3, 3]" in out.stdout
