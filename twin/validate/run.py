"""`pipetwin validate`: the runs. Every runtime run in `run_plan` order (calibration runs
and repeats spread over passes), the in-situ table from the calibration runs, the
simulator on each cell, and the comparison (twin.validate.compare) written by
twin.validate.report; `--reuse-real` re-runs all but the hardware."""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from core.metrics import summarize
from core.trace import Trace
from profiles.in_situ import in_situ_profile
from profiles.latency_model import SlowestStage, fit
from profiles.schema import load_profile, save_profile
from runtime.model_specs import display_name
from sim import SimConfig, simulate
from sim.run import fitted_model, profile_jitter
from twin.bench import Bench
from twin.results import write_results
from twin.validate.compare import REL_METRICS, cell_row, rankings, same_requests
from twin.validate.config import ValidationConfig, cell_dir, rate_label
from twin.validate.report import format_table, make_plots, write_report
from twin.workload import workload_requests


@dataclass
class ValidationResult:
    errors: pd.DataFrame
    ranking: pd.DataFrame
    report: Path
    table_text: str
    out: Path


def run_plan(cfg: ValidationConfig) -> list[tuple[str, dict[str, Any], Any, int]]:
    """Every runtime run of the validation in order, as (kind, policy, rate, pass):
    calibration-only loads first ("cal", pass 0); then `repeats` passes over the cells (odd
    passes reversed), each cell's real run ("real") preceded, when its load calibrates, by
    a calibration run of the same pass. The machine's speed wanders by several % over
    minutes on a shared VM: calibrating in every pass spreads the table's rows over the
    same minutes as the real runs it is compared with."""
    if cfg.calibrate is None:
        cal_labels, val_labels, cal_only = set(), set(), []
    else:
        cal_labels = {rate_label(r) for r in cfg.calibrate["loads"]}
        val_labels = {rate_label(r) for r in cfg.loads}
        cal_only = [r for r in cfg.calibrate["loads"] if rate_label(r) not in val_labels]
    plan = [("cal", p, r, 0) for p in cfg.policies for r in cal_only]
    cells = [(p, r) for p in cfg.policies for r in cfg.loads]
    for k in range(cfg.repeats):
        for p, r in (cells if k % 2 == 0 else cells[::-1]):
            if rate_label(r) in cal_labels:
                plan.append(("cal", p, r, k))
            plan.append(("real", p, r, k))
    return plan


def calibration_dir(out: Path, label: str, rate: Any, k: int) -> Path:
    """Where pass k's calibration run of a cell is recorded."""
    d = cell_dir(out / "calibration", label, rate)
    return d if k == 0 else d.with_name(f"{d.name}_pass{k + 1}")


def calibration_run(cfg: ValidationConfig, bench: Any, pol: dict[str, Any], rate: Any, run_dir: Path,
                    log: Callable[[str], Any]) -> tuple[pd.DataFrame, str]:
    """One runtime run on calibration requests (workload seed calibrate.seed): its stage rows."""
    wl = cfg.workload_for(rate, cfg.calibrate["seed"])
    seed = wl.pop("seed")
    real = bench.run(workload_requests(wl, seed), pol["name"], pol["params"], seed=seed,
                     stage_time_model=pricing_model(cfg.profile))
    write_results(run_dir, real, summarize(real), {"policy": pol["name"], "workload": wl, "seed": seed})
    log(f"calibration: {pol['label']} @ {rate_label(rate)} req/s, seed {seed}: "
        f"{len(real.batches)} stage rows in {real.meta['wall_s']:.1f} s")
    return real.batches, str(run_dir)


def calibration_table(cfg: ValidationConfig, runs: list[tuple[pd.DataFrame, str]], folder: Path,
                      log: Callable[[str], Any]) -> str:
    """The calibration runs' stage rows -> an in-situ table (path) for the simulator."""
    table = in_situ_profile(load_profile(cfg.profile), [b for b, _ in runs], [src for _, src in runs])
    path = save_profile(table, folder / "profile")
    fitted_model.cache_clear()   # both cache by path, and this path may hold an older table
    profile_jitter.cache_clear()
    err = fit(str(path))[1]
    jitter = 0 if table.jitter is None else len(table.jitter)
    log(f"in-situ table {path}: {len(table.stages)} stage rows, jitter of {jitter} micro-batches; "
        f"fit {err}")
    return str(path)


def run_runtime_side(cfg: ValidationConfig, bench: Any, out: Path, num_pages: int,
                     log: Callable[[str], Any]
                     ) -> tuple[dict[tuple[str, str], tuple[list[Trace], float, float]], str]:
    """Every runtime run of the validation, in `run_plan` order (calibration runs spread
    over the passes, a cell's repeats spread over the whole run, so the machine's drift
    reaches table and real runs alike and is averaged rather than charged to whichever
    cell runs last). Returns the real runs per (label, rate label) with the load average
    before the first and after the last, and the simulator's table."""
    runs: dict[tuple[str, str], list[Trace]] = {}
    loads: dict[tuple[str, str], list[float]] = {}
    cal_runs: list[tuple[pd.DataFrame, str]] = []
    for kind, pol, rate, k in run_plan(cfg):
        if kind == "cal":
            cal_runs.append(calibration_run(cfg, bench, pol, rate, calibration_dir(out, pol["label"], rate, k),
                                            log))
            continue
        key = (pol["label"], rate_label(rate))
        load0 = _loadavg()
        t = _real_run(cfg, bench, pol, rate, k, out, num_pages)
        runs.setdefault(key, []).append(t)
        loads.setdefault(key, []).extend((load0, _loadavg()))
        log(f"{key[0]} @ {key[1]} req/s: real run {k + 1} of {cfg.repeats}, {t.meta['wall_s']:.1f} s")
    profile = calibration_table(cfg, cal_runs, out / "calibration", log) if cfg.calibrate is not None \
        else cfg.profile
    return {key: (ts, loads[key][0], loads[key][-1]) for key, ts in runs.items()}, profile


def recorded_real_runs(run_dir: Path, repeats: int, policy: str, sim: Trace) -> list[Trace]:
    """The real runs an earlier `validate` of this config left in `run_dir` (real, real_2,
    ...), checked to be the policy and requests the config asks for now."""
    reals = []
    for k in range(repeats):
        folder = run_dir / ("real" if k == 0 else f"real_{k + 1}")
        if not (folder / "meta.json").is_file():
            raise FileNotFoundError(f"--reuse-real: {folder} has no recorded real run (repeats: {repeats}); "
                                    "run `pipetwin validate` without --reuse-real first")
        t = Trace.load(folder)
        if t.meta.get("policy") != policy:
            raise ValueError(f"--reuse-real: {folder} ran policy {t.meta.get('policy')!r}, the config asks for "
                             f"{policy!r}")
        if not same_requests(sim, t):
            raise ValueError(f"--reuse-real: {folder} ran other requests than the config's workload now gives "
                             "(lengths or arrival times changed?)")
        reals.append(t)
    return reals


def _recorded_setup(cfg: ValidationConfig, out: Path, log: Callable[[str], Any]) -> tuple[str, int, int]:
    """(profile, num_pages, page_size) of the real runs recorded under `out`. A calibrated
    config gets its in-situ table rebuilt from the recorded calibration runs, so changes to
    how tables are made (profiles/in_situ.py) reach a --reuse-real run too."""
    pol, rate = cfg.policies[0], cfg.loads[0]
    first = cell_dir(out, pol["label"], rate) / "real" / "meta.json"
    if not first.is_file():
        raise FileNotFoundError(f"--reuse-real: {first} not found; run `pipetwin validate` without "
                                "--reuse-real first (or give the --out it wrote to)")
    meta = Trace.load(first.parent).meta
    profile = cfg.profile
    if cfg.calibrate is not None:
        runs = []
        for p, r, k in [(p, r, k) for kind, p, r, k in run_plan(cfg) if kind == "cal"]:
            folder = calibration_dir(out, p["label"], r, k)
            if not (folder / "meta.json").is_file():
                raise FileNotFoundError(f"--reuse-real: the config calibrates, but {folder} (a calibration "
                                        "run of the earlier run) is missing")
            runs.append((Trace.load(folder).batches, str(folder)))
        profile = calibration_table(cfg, runs, out / "calibration", log)
    return profile, int(meta["num_pages"]), int(meta["page_size"])


def run_validation(cfg: ValidationConfig, log: Callable[[str], Any] = lambda s: None,
                   reuse_real: bool = False) -> ValidationResult:
    """Run every (policy, load) cell through the simulator and the runtime and compare.
    reuse_real: run only the simulator, against the real runs (and in-situ table) an
    earlier run of this config recorded in `out`: for iterating on the latency model
    or the simulator without the hardware."""
    out = Path(cfg.out or Path("results") / cfg.name)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    traces: dict[tuple[str, str], tuple[Trace, Trace]] = {}
    with contextlib.ExitStack() as stack:
        bench = None
        if reuse_real:
            profile, num_pages, page_size = _recorded_setup(cfg, out, log)
            log(f"reusing the real runs in {out}/runs (simulator only); profile {profile}")
        else:
            first = cfg.policies[0]
            bench = stack.enter_context(Bench(
                cfg.model, cfg.pp, first["name"], first["params"], num_pages=cfg.num_pages,
                page_size=cfg.page_size, layer_split=cfg.layer_split, num_threads=cfg.threads, seed=cfg.seed,
                device=cfg.device, dtype=cfg.dtype, attention_backend=cfg.attention_backend,
                enforce_eager=cfg.enforce_eager))
            num_pages, page_size = bench.num_pages, bench.page_size
            log(f"runtime up: pp={cfg.pp}, {num_pages} KV pages of {page_size} tokens")
            recorded, profile = run_runtime_side(cfg, bench, out, num_pages, log)
        latency = fitted_model(profile)[0]
        if cfg.sim_repeats > 1 and cfg.calibrate is not None:
            if load_profile(profile).jitter is None:
                raise ValueError("sim_repeats: the calibration runs measured no stage-time jitter (no "
                                 "micro-batch whose every stage shape repeated often enough for a median; "
                                 "see profiles/in_situ.py); calibrate on more requests or set sim_repeats: 1")
        for pol in cfg.policies:
            for rate in cfg.loads:
                label, rl = pol["label"], rate_label(rate)
                wl = cfg.workload_for(rate)
                seed = wl.pop("seed")
                run_dir = cell_dir(out, label, rate)
                sims = simulate_cell(cfg, pol, wl, seed, profile, num_pages, page_size, run_dir)
                sim_trace = sims[0].trace
                if bench is None:
                    reals = recorded_real_runs(run_dir, cfg.repeats, pol["name"], sim_trace)
                    load0 = load1 = math.nan
                else:
                    reals, load0, load1 = recorded[(label, rl)]
                row = cell_row(label, rl, sims, reals, latency)
                row.update(loadavg_before=load0, loadavg_after=load1)
                rows.append(row)
                traces[(label, rl)] = (sim_trace, reals[0])
                log(f"{label} @ {rl} req/s: real {reals[0].meta['wall_s']:.1f} s, throughput err "
                    f"{row['throughput_err_pct']:+.1f}%, TTFT p50 {row['ttft_p50_err_pct']:+.1f}%, "
                    f"TPOT p50 {row['tpot_p50_err_pct']:+.1f}%, bubble {row['bubble_diff_pts']:+.1f} pts")
    errors = pd.DataFrame(rows)
    errors.to_csv(out / "errors.csv", index=False)
    ranks = rankings(errors)
    ranks.to_csv(out / "ranking.csv", index=False)
    plots = make_plots(out / "plots", traces, errors)
    text = format_table(errors)
    report = write_report(out, cfg, errors, ranks, plots, text, num_pages,
                          time.perf_counter() - t_start, display_name(cfg.model), profile, reuse_real)
    return ValidationResult(errors, ranks, report, text, out)


def pricing_model(profile: str) -> SlowestStage:
    """What time_balanced prices batches with on both sides: the config's base table (the
    in-situ one is built from these very runs, so it cannot price them)."""
    return SlowestStage(fitted_model(profile)[0])


def simulate_cell(cfg: ValidationConfig, pol: dict[str, Any], wl: dict[str, Any], seed: int, profile: str,
                  num_pages: int, page_size: int, run_dir: Path) -> list[Any]:
    """The simulator side of one cell: `sim_repeats` runs (stage jitter drawn with seeds
    0, 1, ... when more than one). The first run's results folder goes to run_dir/sim, every
    run's summary to run_dir/sim_repeats.csv."""
    results = []
    for k in range(cfg.sim_repeats):
        # driver_on_stage0: the runtime's scheduler shares stage 0's thread (runtime.driver)
        sim_cfg = SimConfig(profile=profile, policy=pol["name"], policy_params=dict(pol["params"]),
                            workload=wl, seed=seed, pp=cfg.pp, num_pages=num_pages, page_size=page_size,
                            driver_on_stage0=True, stage_jitter=cfg.sim_repeats > 1, jitter_seed=k,
                            stage_time_profile=cfg.profile)
        results.append(simulate(sim_cfg, requests=workload_requests(wl, seed)))
        if k == 0:
            write_results(run_dir / "sim", results[0].trace, results[0].summary, sim_cfg.to_dict())
    pd.DataFrame([{"jitter_seed": k, **{m: r.summary.get(m) for m in (*REL_METRICS.values(), "bubble_ratio")}}
                  for k, r in enumerate(results)]).to_csv(run_dir / "sim_repeats.csv", index=False)
    return results


def _loadavg() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan


def _real_run(cfg: ValidationConfig, bench: Any, pol: dict[str, Any], rate: Any, k: int, out: Path,
              num_pages: int) -> Trace:
    """Runtime run number k of a cell (the same requests every time), written to
    runs/<cell>/real (k = 0), real_2, ..."""
    wl = cfg.workload_for(rate)
    seed = wl.pop("seed")
    t = bench.run(workload_requests(wl, seed), pol["name"], pol["params"], seed=seed,
                  stage_time_model=pricing_model(cfg.profile))
    t_sum = summarize(t)
    t_sum["wall_s"] = t.meta["wall_s"]
    run_dir = cell_dir(out, pol["label"], rate)
    write_results(run_dir / ("real" if k == 0 else f"real_{k + 1}"), t, t_sum,
                  {"model": cfg.model, "pp": cfg.pp, "policy": pol["name"],
                   "policy_params": dict(pol["params"]), "workload": wl, "seed": seed,
                   "num_pages": num_pages, "page_size": bench.page_size,
                   "layer_split": cfg.layer_split, "threads": cfg.threads, "device": cfg.device,
                   "dtype": cfg.dtype, "attention_backend": cfg.attention_backend,
                   "enforce_eager": cfg.enforce_eager})
    return t
