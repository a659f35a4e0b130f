"""Layering: core/ is pure Python; the simulator never needs torch."""
import pkgutil
import subprocess
import sys
from pathlib import Path

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
