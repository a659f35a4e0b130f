"""benchmarks/gpu_check.py's CPU-runnable part (--device cpu --quick): greedy equality
with Hugging Face, the triton kernel (interpreted) against the torch reference, and
stage steps through the CUDA-graph runner's static-buffer path; its table and folder."""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tests.helpers import load_benchmark  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("triton", reason="the gpu extra (triton) is not installed")

ROOT = Path(__file__).resolve().parents[1]


def _load():
    return load_benchmark("gpu_check")


def test_quick_cpu_run(tmp_path, capsys):
    gc = _load()
    out = tmp_path / "gc"
    assert gc.main(["--device", "cpu", "--quick", "--sections", "equality,kernel,steps",
                    "--attention-backend", "triton", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "rows.csv").open()))
    by_case = {(r["section"], r["case"]): r for r in rows}
    eq = [r for r in rows if r["section"] == "equality"]
    # 2 families x (4 LocalPipeline splits + 3 policies); pp=2 on one GPU is CUDA-only
    assert len(eq) == 14
    assert all(r["value"] == "4/4 prompts equal" and r["status"] == "ok" for r in eq), eq
    kern = [r for r in rows if r["section"] == "kernel"]
    assert [r["case"] for r in kern] == ["decode 1 rows, varied contexts",
                                         "decode 8 rows, varied contexts",
                                         "prefill chunk 64 after 300"]
    for r in kern:
        assert r["status"] == "ok" and r["value"].startswith("triton: max abs diff")
        assert float(r["value"].rsplit(" ", 1)[1]) <= 1e-4
    steps = [r for r in rows if r["section"] == "steps"]
    assert len(steps) == 7 and all(r["status"] in ("info", "ok") for r in steps)
    samp = by_case[("steps", "sampling 8 rows, vocab 256: greedy / t 0.8 / + top_p 0.95")]["value"]
    assert samp.endswith(" ms") and all(float(x) > 0 for x in samp[:-3].split(" / "))
    host = by_case[("steps", "host work per decode step, 8 rows (benchmarks/host_step.py)")]["value"]
    assert int(host.split(" us")[0]) > 0 and "pickle for pp > 1" in host
    assert steps[3]["case"] == "same step repeated: p90 / p10 - 1, worst" and "% (a step of" in steps[3]["value"]
    assert all("ms (no roofline on cpu)" in r["value"] for r in steps[:3])
    # two warm-up + 3 timed decode steps at each of 1 and 8 rows took the static path
    assert by_case[("steps", "graph replays / eager steps")]["value"] == "10 / 5"
    assert not any(r["section"] == "device" for r in rows)      # no NVML here: absent
    table = (out / "table.md").read_text()
    assert table.startswith("| section | case | value | goal | status |")
    assert table.count("\n") == len(rows) + 2
    assert "| kernel | prefill chunk 64 after 300 | triton: max abs diff" in capsys.readouterr().out


def test_bad_flags_name_the_flag_and_what_is_allowed(tmp_path, capsys):
    gc = _load()
    for argv, named in ((["--sections", "steps,gpus"], "--sections: unknown gpus (allowed: equality"),
                        (["--sections", ","], "--sections: none given"),
                        (["--dtype", "float64"], "--dtype must be one of bfloat16, float16, float32"),
                        (["--device", "tpu"], "--device must be cuda or cpu"),
                        (["--attention-backend", "nope"], "--attention-backend must be one of auto, torch")):
        with pytest.raises(SystemExit) as e:
            gc.main(["--device", "cpu", *argv, "--out", str(tmp_path / "gc")])
        assert e.value.code == 2 and named in capsys.readouterr().err, argv
    assert not (tmp_path / "gc").exists()   # nothing ran


def test_cli_failure_says_why_and_table_is_written_per_row(tmp_path, monkeypatch):
    """A CLI step that fails shows the last line it printed (not only "exit status 1"),
    with its whole output in OUT/logs; the table is rewritten after every row, so a run
    stopped at its time limit keeps the rows it has."""
    gc = _load()
    out = tmp_path / "gc"
    seen = {}

    def validate(self):
        seen["table"] = (out / "table.md").read_text()
        self.guard("validate", "a failing CLI run", lambda: self.cli("sim", "--profile", str(tmp_path / "none")))
        seen["after one row"] = (out / "rows.csv").read_text()
    monkeypatch.setattr(gc.Check, "validate", validate)
    assert gc.main(["--device", "cpu", "--quick", "--sections", "kernel,validate",
                    "--attention-backend", "torch", "--out", str(out)]) == 0
    assert "| kernel | decode 1 rows, varied contexts |" in seen["table"]
    assert "validate,a failing CLI run," in seen["after one row"]
    assert not (out / "stacks.log").exists()   # nothing ran long: no stack dump left behind
    rows = list(csv.DictReader((out / "rows.csv").open()))
    bad = [r for r in rows if r["section"] == "validate"][0]
    assert bad["status"] == "error" and "exit status" not in bad["value"]
    assert bad["value"].startswith("RuntimeError: ") and len(bad["value"]) > len("RuntimeError: ") + 10
    assert (out / "logs" / "sim.log").read_text().startswith("$ pipetwin sim --profile")
    assert "(pipetwin sim exit 2" in (out / "errors.log").read_text() or \
        "(pipetwin sim exit 1" in (out / "errors.log").read_text()


def test_append_keeps_the_other_sections_of_an_earlier_run(tmp_path):
    """A check split over two calls (the device's per-call limit) ends in one table with
    --append; without it the second run's table has only its own sections."""
    gc = _load()
    out = tmp_path / "gc"
    common = ["--device", "cpu", "--quick", "--attention-backend", "torch", "--out", str(out)]
    assert gc.main(common + ["--sections", "kernel"]) == 0
    assert gc.main(common + ["--sections", "steps", "--append"]) == 0
    rows = list(csv.DictReader((out / "rows.csv").open()))
    sections = [r["section"] for r in rows]
    assert sections.count("kernel") == 3 and sections.count("steps") == 7
    assert "total (earlier run)" in sections and sections[-1] == "total"
    assert (out / "table.md").read_text().count("\n") == len(rows) + 2
    assert gc.main(common + ["--sections", "steps"]) == 0   # no --append: a fresh table
    assert {r["section"] for r in csv.DictReader((out / "rows.csv").open())} == {"steps", "total"}


def test_validate_goals_become_rows_from_errors_csv(tmp_path):
    """The one-shot GPU run states the twin goals' verdicts in its table, not only in the
    report: cells within each limit and the worst cell."""
    gc = _load()
    errors = tmp_path / "errors.csv"
    with errors.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["policy", "load", "throughput_err_pct", "ttft_p50_err_pct", "ttft_p99_err_pct",
                    "tpot_p50_err_pct"])
        w.writerow(["token_throttling", "3.5", "1.0", "-4.0", "12.0", "2.0"])
        w.writerow(["vllm", "inf", "-3.5", "9.0", "-25.0", "4.9"])
    check = gc.Check(gc.argparse.Namespace(device="cpu", dtype="float32", attention_backend="torch",
                                           out=str(tmp_path), quick=True))
    check.validate_goals(errors)
    rows = {r.case: r for r in check.rows}
    assert rows["throughput error"].value == "1/2 cells; worst -3.5% (vllm @ inf)"
    assert rows["throughput error"].goal == "within ±3%"   # no "|": a markdown table cell
    assert rows["ttft_p50 error"].value.startswith("2/2 cells") and rows["ttft_p50 error"].status == "ok"
    assert rows["ttft_p99 error"].value == "1/2 cells; worst -25.0% (vllm @ inf)"
    assert rows["tpot_p50 error"].status == "ok"
    assert rows["throughput error"].status == "info"   # a miss on CPU is information, on CUDA a MISS


def test_a_long_section_leaves_every_threads_stack(tmp_path, monkeypatch):
    """A one-shot GPU run that hangs must say where: while a section runs past STACK_DUMP_S,
    every thread's stack goes to OUT/stacks.log (here a section stuck in a wait)."""
    import time
    gc = _load()
    out = tmp_path / "gc"
    monkeypatch.setattr(gc, "STACK_DUMP_S", 0.2)

    def kernel(self):
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            stuck_waiting_for_the_gpu()
    def stuck_waiting_for_the_gpu():
        time.sleep(0.05)
    monkeypatch.setattr(gc.Check, "kernel", kernel)
    assert gc.main(["--device", "cpu", "--quick", "--sections", "kernel", "--attention-backend", "torch",
                    "--out", str(out)]) == 0
    dump = (out / "stacks.log").read_text()
    assert dump.count("stuck_waiting_for_the_gpu") >= 2   # repeated while the section ran
    assert "in kernel" in dump


def test_a_check_stopped_by_timeout_says_where_it_was(tmp_path):
    """`timeout` (the documented device command) stops the check with SIGTERM: the stacks of
    every thread reach OUT/stacks.log before the process dies, and the rows so far are kept."""
    import signal
    import subprocess
    import textwrap
    out = tmp_path / "gc"
    script = tmp_path / "hang.py"
    script.write_text(textwrap.dedent(f"""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("gpu_check", {str(ROOT / "benchmarks" / "gpu_check.py")!r})
        gc = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = gc
        spec.loader.exec_module(gc)
        def steps(self):
            self.add("steps", "a row before the hang", "1", "", "info")
            hung_in_a_collective()
        def hung_in_a_collective():
            print("hanging", flush=True)
            while True:
                time.sleep(0.05)
        gc.Check.steps = steps
        gc.main(["--device", "cpu", "--quick", "--sections", "steps", "--attention-backend", "torch",
                 "--out", {str(out)!r}])
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("hanging"):
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    assert "hung_in_a_collective" in (out / "stacks.log").read_text()
    assert "steps,a row before the hang,1,,info" in (out / "rows.csv").read_text()


def test_a_section_whose_modules_are_missing_is_skipped_at_once(tmp_path, monkeypatch):
    """On the GPU machine simpy is not installed unless carried: serve and validate say so in
    a row at once instead of failing after the profile's minutes; the other sections run."""
    gc = _load()
    monkeypatch.setitem(gc.NEEDS, "serve", ("simpy", "no_such_module_here"))
    ran = []
    monkeypatch.setattr(gc.Check, "serve", lambda self: ran.append("serve"))
    out = tmp_path / "gc"
    assert gc.main(["--device", "cpu", "--quick", "--sections", "kernel,serve", "--attention-backend", "torch",
                    "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "rows.csv").open()))
    serve = [r for r in rows if r["section"] == "serve"]
    assert ran == [] and len(serve) == 1
    assert serve[0]["case"] == "needs no_such_module_here" and serve[0]["status"] == "skipped"
    assert sum(r["section"] == "kernel" and r["status"] == "ok" for r in rows) == 3


def test_a_section_that_raises_outside_its_rows_leaves_a_row_and_the_next_sections_run(tmp_path, monkeypatch):
    """An exception outside any row's guard (a section's set-up, or a sticky CUDA error such
    as an illegal address, which every later CUDA call repeats) must not end the one-shot
    run: the section gets an error row with the traceback in errors.log, and the sections
    after it still run (serve and validate are fresh processes with a fresh CUDA context)."""
    gc = _load()

    def kernel(self):
        self.add("kernel", "a row before the failure", "1", "", "info")
        set_up_the_stage()

    def set_up_the_stage():
        raise RuntimeError("CUDA error: an illegal memory access was encountered\n"
                           "CUDA kernel errors might be asynchronously reported at some other API call")
    monkeypatch.setattr(gc.Check, "kernel", kernel)
    monkeypatch.setattr(gc.Check, "steps", lambda self: self.add("steps", "ran after it", "1", "", "info"))
    out = tmp_path / "gc"
    assert gc.main(["--device", "cpu", "--quick", "--sections", "kernel,steps", "--attention-backend", "torch",
                    "--out", str(out)]) == 0
    rows = [(r["section"], r["case"], r["value"], r["status"]) for r in csv.DictReader((out / "rows.csv").open())]
    assert rows[:3] == [("kernel", "a row before the failure", "1", "info"),
                        ("kernel", "section stopped early",
                         "RuntimeError: CUDA error: an illegal memory access was encountered CUDA ke", "error"),
                        ("steps", "ran after it", "1", "info")]
    # one line per row: the message's newline would have split the markdown row
    assert (out / "table.md").read_text().count("\n") == len(rows) + 2
    log = (out / "errors.log").read_text()
    assert log.startswith("kernel section stopped early\n") and "set_up_the_stage" in log


def test_validate_loads_are_fractions_of_its_own_workloads_simulated_capacity(tmp_path, monkeypatch):
    """The validate section's 0.5x and 0.9x loads come from the table's capacity for the
    validate workload itself, not from the serve section's default workload (~2x the work
    a request, ~15x in --quick), which left "0.9x" a mostly idle engine."""
    import shutil

    import yaml

    from sim import SimConfig, simulate
    gc = _load()
    out = tmp_path / "gc"
    shutil.copytree(ROOT / "profiles" / "tables" / "llama-32m_cpu-1thread_pp1", out / "profile")
    ran = []
    monkeypatch.setattr(gc.Check, "cli", lambda self, *argv, **kw: ran.append(argv))
    assert gc.main(["--device", "cpu", "--quick", "--sections", "validate", "--out", str(out)]) == 0
    spec = yaml.safe_load((out / "validate.yaml").read_text())
    assert ran and ran[0][0] == "validate"
    at_once = dict(spec["workload"], arrival={**spec["workload"]["arrival"], "rate": "inf"})
    cap = simulate(SimConfig(profile=str(out / "profile"), workload=at_once)).summary["throughput_rps"]
    assert spec["loads"] == [round(0.5 * cap, 3), round(0.9 * cap, 3), "inf"]
    # the default workload the serve section simulates is far heavier a request
    default = simulate(SimConfig(profile=str(out / "profile"))).summary["throughput_rps"]
    assert cap > 3 * default
    rows = list(csv.DictReader((out / "rows.csv").open()))
    assert [r["case"] for r in rows if r["section"] == "validate"][:2] == \
        ["simulated capacity of its workload", "pp=1, 3 policies, 0.5x/0.9x/inf"]
