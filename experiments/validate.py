"""`pipetwin validate FILE.yaml`: the simulator against the real runtime, same workloads.

For every policy and load level, the SAME requests (lengths and arrival times, one seed)
run through the simulator (the measured profile, num_pages = the runtime's page count,
the scheduler on stage 0's thread as in the runtime: SimConfig.driver_on_stage0)
and through the runtime (requests injected at their arrival instants, fixed output
lengths). Written under `out`:

  runs/<policy>_r<rate>/{sim,real}/   results folders (as `pipetwin sim` / `pipetwin bench`)
  errors.csv                          one row per (policy, load): signed % errors (sim - real)/real
  ranking.csv                         per load: policies ranked by throughput, sim vs real
  plots/                              timelines (sim above real), TTFT/TPOT CDFs, bubble bars
  report.md

Config keys (YAML):
  name, description, model, pp, profile, layer_split, threads, device (cpu, or cuda: one
  GPU per stage over NCCL; `profile` then a table of that model and pp, e.g. from
  `pipetwin profile --device cuda`), dtype (default the model config's), num_pages (null =
  the runtime's default), page_size, seed, workload (a core workload spec; its arrival rate
  is set per load), loads (absolute request rates, req/s; "inf" allowed),
  policies (list of {name, label, params}), out, goals (optional thresholds),
  calibrate (optional): {seed, loads} -- before validating, run the runtime on OTHER
  requests (workload seed `seed`, default seed + 1) at `loads` (default: all) with every
  policy, and time the simulator by an in-situ table fitted on those runs' stage rows
  (profiles.in_situ: stages measured while the pipeline runs) instead of `profile` alone;
  in every pass over the cells, each cell's calibration run goes just before its real
  run, so slow drift of the machine's speed reaches the table and the runs it is
  compared with alike (run_plan);
  repeats (default 1): real runs per policy and load, the same requests each time, in
  passes over all cells (so a cell's runs sample the whole run); errors are against their
  mean, and the report shows how far they spread;
  sim_repeats (default 1): simulator runs per policy and load. Above 1, each run draws
  the table's measured stage-time jitter (SimConfig.stage_jitter, jitter_seed 0, 1, ...),
  so the simulator, like the runtime, gives a spread of outcomes; errors are mean against
  mean, and runs/<cell>/sim_repeats.csv keeps every run's summary. Needs a table with
  jitter.csv: calibrate, or a profile that has one.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import yaml

from core.trace import Trace
from profiles.measure.options import cpu_name
from runtime.engine_args import check_engine_values
from runtime.model_specs import display_name

# metric key -> summary key; the error is the signed relative error (sim - real) / real
REL_METRICS: dict[str, str] = {
    "throughput": "output_tps",
    "ttft_p50": "ttft_p50",
    "ttft_p99": "ttft_p99",
    "tpot_p50": "tpot_p50",
    "tpot_p99": "tpot_p99",
    "e2e_p50": "e2e_p50",
}
# every column of the error table
ERROR_COLUMNS = (*[f"{m}_err_pct" for m in REL_METRICS], "bubble_diff_pts", "e2e_mape_pct")
# goals: |error| limits in percent (bubble: percentage points); "ranking" is separate
DEFAULT_GOALS: dict[str, float] = {"throughput_err_pct": 3.0, "tpot_p50_err_pct": 5.0,
                                   "ttft_p50_err_pct": 10.0, "ttft_p99_err_pct": 20.0,
                                   "bubble_diff_pts": 2.0}
_KEYS = ("name", "description", "model", "pp", "profile", "layer_split", "threads", "num_pages",
         "page_size", "seed", "workload", "loads", "policies", "out", "goals", "calibrate", "repeats",
         "sim_repeats", "device", "dtype")
_CALIBRATE_KEYS = ("seed", "loads")


@dataclass
class ValidationConfig:
    model: Any
    profile: str
    workload: dict[str, Any]
    loads: list[Any]
    policies: list[dict[str, Any]]
    name: str = "validation"
    description: str = ""
    pp: int = 1
    layer_split: Any = None
    threads: int | None = None
    num_pages: int | None = None
    page_size: int = 16
    seed: int = 0
    out: str | None = None
    goals: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GOALS))
    calibrate: dict[str, Any] | None = None
    repeats: int = 1
    sim_repeats: int = 1
    device: str = "cpu"            # the runtime's: cpu | cuda (one GPU per stage)
    dtype: str | None = None       # None: the model config's torch_dtype
    source: str | None = None

    def __post_init__(self) -> None:
        from core.policies import make_policy
        from core.workloads import Workload

        if not self.model:
            raise ValueError("model is required (a directory or dummy:<preset | config.json | inline JSON>)")
        check_engine_values({k: getattr(self, k) for k in ("pp", "num_pages", "page_size", "threads", "seed",
                                                           "device", "dtype")}, name=str)
        if not isinstance(self.loads, list) or not self.loads:
            raise ValueError("loads must be a non-empty list of request rates (req/s, or 'inf')")
        for i, r in enumerate(self.loads):
            if not (r == "inf" or (isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0)):
                raise ValueError(f"loads[{i}] must be a rate > 0 or 'inf', got {r!r}")
        if not isinstance(self.policies, list) or not self.policies:
            raise ValueError("policies must be a non-empty list of {name, label, params}")
        labels = []
        for i, p in enumerate(self.policies):
            if isinstance(p, str):
                p = self.policies[i] = {"name": p}
            if not isinstance(p, dict) or "name" not in p or set(p) - {"name", "label", "params"}:
                raise ValueError(f"policies[{i}] must be a mapping with name (and optional label, params)")
            p.setdefault("params", {})
            p.setdefault("label", p["name"])
            try:
                make_policy(p["name"], p["params"])
            except (ValueError, TypeError) as e:
                raise ValueError(f"policies[{i}]: {e}") from None
            labels.append(p["label"])
        if len(set(labels)) != len(labels):
            raise ValueError(f"policy labels must be unique, got {labels}")
        if not isinstance(self.workload, dict):
            raise ValueError("workload must be a mapping (a core workload spec)")
        for r in self.loads:
            Workload.from_dict(self.workload_for(r))
        self.goals = {**DEFAULT_GOALS, **(self.goals or {})}
        if not (isinstance(self.repeats, int) and not isinstance(self.repeats, bool) and self.repeats >= 1):
            raise ValueError(f"repeats must be an int >= 1 (real runs per policy and load), got {self.repeats!r}")
        if not (isinstance(self.sim_repeats, int) and not isinstance(self.sim_repeats, bool)
                and self.sim_repeats >= 1):
            raise ValueError(f"sim_repeats must be an int >= 1 (simulator runs per policy and load), "
                             f"got {self.sim_repeats!r}")
        if self.sim_repeats > 1 and self.calibrate is None:
            from profiles.schema import load_profile

            if load_profile(self.profile).jitter is None:
                raise ValueError(f"sim_repeats: {self.sim_repeats} runs draw measured stage-time jitter, and "
                                 f"profile {self.profile!r} has no jitter.csv; set calibrate (its in-situ table "
                                 "measures it) or sim_repeats: 1")
        if self.calibrate is not None:
            from core.validation import check_keys

            if not isinstance(self.calibrate, dict):
                raise ValueError("calibrate must be a mapping {seed, loads} (or left out)")
            check_keys(self.calibrate, _CALIBRATE_KEYS, "calibrate")
            c = self.calibrate = {"seed": self.seed + 1, "loads": list(self.loads), **self.calibrate}
            if not isinstance(c["seed"], int) or isinstance(c["seed"], bool) or c["seed"] == self.seed:
                raise ValueError(f"calibrate.seed must be an int other than seed ({self.seed}): "
                                 "calibrate on other requests than those validated")
            if not isinstance(c["loads"], list) or not c["loads"] or not all(
                    r == "inf" or (isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0)
                    for r in c["loads"]):
                raise ValueError(f"calibrate.loads must be a non-empty list of rates > 0 or 'inf', got {c['loads']!r}")

    def workload_for(self, rate: Any, seed: int | None = None) -> dict[str, Any]:
        w = dict(self.workload)
        w["arrival"] = {**(w.get("arrival") or {"kind": "gamma"}), "rate": rate}
        w.pop("time_scale", None)
        w.pop("rate_scale", None)
        return {**w, "seed": self.seed if seed is None else seed}


def load_validation(path: str | Path) -> ValidationConfig:
    from core.validation import check_keys

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such validation config")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    check_keys(d, _KEYS, f"validation config {path}")
    for key in ("model", "profile", "workload", "loads", "policies"):
        if key not in d:
            raise ValueError(f"{path}: {key!r} is required")
    cfg = ValidationConfig(**d)
    cfg.source = str(path)
    if cfg.out is None:
        cfg.out = str(Path("results") / path.stem)
    return cfg


@dataclass
class ValidationResult:
    errors: pd.DataFrame
    ranking: pd.DataFrame
    report: Path
    table_text: str
    out: Path


def _slug(x: Any) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(x))


def cell_dir(root: Path, label: str, rate: Any) -> Path:
    """Folder of one (policy label, load) cell under `root` (runs/ of out or of calibration/)."""
    return root / "runs" / f"{_slug(label)}_r{rate_label(rate)}"


def rate_label(rate: Any) -> str:
    return "inf" if rate == "inf" or (isinstance(rate, float) and math.isinf(rate)) else f"{float(rate):g}"


def same_requests(sim: Trace, real: Trace) -> bool:
    """Both sides saw the same requests: ids, prompt/output lengths, arrival times."""
    cols = ["request_id", "prompt_len", "output_len", "arrival"]
    a = sim.requests[cols].sort_values("request_id").reset_index(drop=True)
    b = real.requests[cols].sort_values("request_id").reset_index(drop=True)
    if len(a) != len(b):
        return False
    return bool((a[cols[:3]].to_numpy() == b[cols[:3]].to_numpy()).all()
                and np.allclose(a["arrival"].to_numpy(float), b["arrival"].to_numpy(float), atol=1e-9))


SPREAD_METRICS = ("output_tps", "ttft_p50", "tpot_p50")


def mean_summary(summaries: list[dict]) -> dict:
    """Numeric summary values averaged over repeated real runs (others from the first)."""
    out = dict(summaries[0])
    for k, v in out.items():
        vals = [s.get(k) for s in summaries]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in vals):
            out[k] = float(np.mean(vals))
    return out


def spread(summaries: list[dict], side: str) -> dict[str, float]:
    """How much repeated runs of one side disagree: (max - min) / mean in %, bubble in points."""
    row = {}
    for k in SPREAD_METRICS:
        vals = np.array([s[k] for s in summaries], dtype=float)
        row[f"{side}_spread_{k}_pct"] = 100.0 * float(np.ptp(vals) / np.mean(vals)) if np.mean(vals) else math.nan
    row[f"{side}_spread_bubble_pts"] = 100.0 * float(np.ptp([s["bubble_ratio"] for s in summaries]))
    return row


def compare(sim_summary: dict, real_summary: dict, sim: Trace, real: Trace) -> dict[str, float]:
    """The error row: signed % errors, bubble difference in points, request-level E2E MAPE."""
    from core.metrics import request_latencies

    row: dict[str, float] = {}
    for m, key in REL_METRICS.items():
        s, r = sim_summary.get(key), real_summary.get(key)
        ok = s is not None and r is not None and math.isfinite(s) and math.isfinite(r) and r != 0
        row[f"{m}_err_pct"] = 100.0 * (s - r) / r if ok else math.nan
    row["bubble_diff_pts"] = 100.0 * (sim_summary["bubble_ratio"] - real_summary["bubble_ratio"])
    ls = request_latencies(sim.requests).set_index("request_id")["e2e"]
    lr = request_latencies(real.requests).set_index("request_id")["e2e"]
    both = ls.index.intersection(lr.index)
    row["e2e_mape_pct"] = (100.0 * float(np.mean(np.abs(ls[both] - lr[both]) / lr[both]))
                           if len(both) else math.nan)
    return row


def stage_diagnostics(sim: Trace, real: Trace, latency: Any = None) -> dict[str, float]:
    """Where an error comes from: total stage busy time (the same requests, so the same
    tokens, on both sides: its error is the latency table's, batch mix aside), the median
    hop (next stage's start - this stage's end: transfer + waiting) and, given the fitted
    latency model, the median ratio of each stage interval to the model's prediction for
    its shape (`{side}_vs_table`: ~1 on the sim side; on the real side > 1 means the
    stages ran slower than the table measured them). Where a batches table lacks the
    attention features (the simulator's), they are approximated: a batch's prefill as one
    chunk from position 0, every decode at the mean context (mean prompt + half the mean
    output)."""
    row: dict[str, float] = {}
    req = real.requests
    ctx = float(req["prompt_len"].mean() + req["output_len"].mean() / 2)
    for side, t in (("sim", sim), ("real", real)):
        b = t.batches
        if latency is not None and len(b):
            if {"prefill_attention_work", "decode_context"} <= set(b.columns):  # runtime traces have them
                work, dctx = b["prefill_attention_work"], b["decode_context"]
            else:
                work, dctx = b["prefill_tokens"] ** 2, b["decode_tokens"] * ctx
            pred = latency.predict(b.assign(prefill_attention_work=work, decode_context=dctx))
            dur = (b["end"] - b["start"]).to_numpy(float)
            ok = pred > 0
            row[f"{side}_vs_table"] = float(np.median(dur[ok] / pred[ok])) if ok.any() else math.nan
        else:
            row[f"{side}_vs_table"] = math.nan
        row[f"{side}_busy_s"] = float((b["end"] - b["start"]).sum())
        row[f"{side}_batches"] = int(b["batch_id"].nunique())
        row[f"{side}_decodes_per_batch"] = float(b.loc[b["stage"] == 0, "decode_tokens"].mean())
        start = b.pivot_table(index="batch_id", columns="stage", values="start")
        end = b.pivot_table(index="batch_id", columns="stage", values="end")
        hops = [start[s + 1] - end[s] for s in range(int(b["stage"].max())) if s + 1 in start]
        row[f"{side}_hop_ms"] = float(pd.concat(hops).median() * 1e3) if hops else math.nan
    row["busy_err_pct"] = 100.0 * (row["sim_busy_s"] - row["real_busy_s"]) / row["real_busy_s"]
    return row


def _ranking(rows: pd.DataFrame) -> pd.DataFrame:
    """Per load: the policies in order of mean throughput on each side (`same`: identical
    orders), and the pairs the hardware itself separates -- the ranges of their repeated
    runs do not overlap -- with how many of those the simulator orders the same way.
    Policies whose real runs overlap are a tie the simulator cannot be held to."""
    out = []
    for rate, g in rows.groupby("load", sort=False):
        sim_order = list(g.sort_values("sim_output_tps", ascending=False)["policy"])
        real_order = list(g.sort_values("real_output_tps", ascending=False)["policy"])
        separated = agreed = 0
        reversed_pairs = []
        recs = list(g.itertuples())
        for i, a in enumerate(recs):
            for b in recs[i + 1:]:
                hi, lo = (a, b) if a.real_output_tps >= b.real_output_tps else (b, a)
                if hi.real_output_tps_min > lo.real_output_tps_max:
                    separated += 1
                    if hi.sim_output_tps > lo.sim_output_tps:
                        agreed += 1
                    else:   # how far apart, to tell a near-tie from a real miss
                        reversed_pairs.append(
                            f"{hi.policy} > {lo.policy} (real "
                            f"{100 * (hi.real_output_tps / lo.real_output_tps - 1):+.1f}%, sim "
                            f"{100 * (hi.sim_output_tps / lo.sim_output_tps - 1):+.1f}%)")
        out.append({"load": rate, "sim_order": " > ".join(sim_order), "real_order": " > ".join(real_order),
                    "same": sim_order == real_order, "separated_pairs": separated, "same_separated": agreed,
                    "reversed_separated": "; ".join(reversed_pairs)})
    return pd.DataFrame(out)


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
    from core.metrics import summarize
    from experiments.bench import workload_requests, write_results

    wl = cfg.workload_for(rate, cfg.calibrate["seed"])
    seed = wl.pop("seed")
    real = bench.run(workload_requests(wl, seed), pol["name"], pol["params"], seed=seed)
    write_results(run_dir, real, summarize(real), {"policy": pol["name"], "workload": wl, "seed": seed})
    log(f"calibration: {pol['label']} @ {rate_label(rate)} req/s, seed {seed}: "
        f"{len(real.batches)} stage rows in {real.meta['wall_s']:.1f} s")
    return real.batches, str(run_dir)


def calibration_table(cfg: ValidationConfig, runs: list[tuple[pd.DataFrame, str]], folder: Path,
                      log: Callable[[str], Any]) -> str:
    """The calibration runs' stage rows -> an in-situ table (path) for the simulator."""
    from profiles.in_situ import in_situ_profile
    from profiles.latency_model import fit
    from profiles.schema import load_profile, save_profile

    from sim.run import fitted_model, profile_jitter

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
    from core.metrics import summarize
    from experiments.bench import Bench
    from sim import fitted_model

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
                device=cfg.device, dtype=cfg.dtype))
            num_pages, page_size = bench.num_pages, bench.page_size
            log(f"runtime up: pp={cfg.pp}, {num_pages} KV pages of {page_size} tokens")
            recorded, profile = run_runtime_side(cfg, bench, out, num_pages, log)
        latency = fitted_model(profile)[0]
        if cfg.sim_repeats > 1 and cfg.calibrate is not None:
            from profiles.schema import load_profile

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
                sim_trace, sim_sum = sims[0].trace, mean_summary([r.summary for r in sims])
                if bench is None:
                    reals = recorded_real_runs(run_dir, cfg.repeats, pol["name"], sim_trace)
                    load0 = load1 = math.nan
                else:
                    reals, load0, load1 = recorded[(label, rl)]
                real_sums = []
                for t in reals:
                    t_sum = summarize(t)
                    t_sum["wall_s"] = t.meta["wall_s"]
                    real_sums.append(t_sum)
                real, real_sum = reals[0], mean_summary(real_sums)
                row = {"policy": label, "load": rl, "requests": len(real.requests), "repeats": cfg.repeats,
                       "sim_repeats": cfg.sim_repeats, **spread(real_sums, "real"), **spread(
                           [r.summary for r in sims], "sim"),
                       "same_requests": same_requests(sim_trace, real),
                       **compare(sim_sum, real_sum, sim_trace, real),
                       "sim_output_tps": sim_sum["output_tps"], "real_output_tps": real_sum["output_tps"],
                       "sim_bubble": sim_sum["bubble_ratio"], "real_bubble": real_sum["bubble_ratio"],
                       **{f"sim_{k}": sim_sum[k] for k in ("ttft_p50", "ttft_p99", "tpot_p50",
                                                                    "tpot_p99", "e2e_p50")},
                       **{f"real_{k}": real_sum[k] for k in ("ttft_p50", "ttft_p99", "tpot_p50",
                                                             "tpot_p99", "e2e_p50")},
                       "real_output_tps_min": min(t["output_tps"] for t in real_sums),
                       "real_output_tps_max": max(t["output_tps"] for t in real_sums),
                       "real_finished": real_sum["finished"], "sim_finished": sim_sum["finished"],
                       "real_wall_s": real.meta["wall_s"], **stage_diagnostics(sim_trace, real, latency),
                       "loadavg_before": load0, "loadavg_after": load1}
                rows.append(row)
                traces[(label, rl)] = (sim_trace, real)
                log(f"{label} @ {rl} req/s: real {real.meta['wall_s']:.1f} s, throughput err "
                    f"{row['throughput_err_pct']:+.1f}%, TTFT p50 {row['ttft_p50_err_pct']:+.1f}%, "
                    f"TPOT p50 {row['tpot_p50_err_pct']:+.1f}%, bubble {row['bubble_diff_pts']:+.1f} pts")
    errors = pd.DataFrame(rows)
    errors.to_csv(out / "errors.csv", index=False)
    ranking = _ranking(errors)
    ranking.to_csv(out / "ranking.csv", index=False)
    plots = make_plots(out / "plots", traces, errors)
    text = format_table(errors)
    report = write_report(out, cfg, errors, ranking, plots, text, num_pages,
                          time.perf_counter() - t_start, display_name(cfg.model), profile, reuse_real)
    return ValidationResult(errors, ranking, report, text, out)


def simulate_cell(cfg: ValidationConfig, pol: dict[str, Any], wl: dict[str, Any], seed: int, profile: str,
                  num_pages: int, page_size: int, run_dir: Path) -> list[Any]:
    """The simulator side of one cell: `sim_repeats` runs (stage jitter drawn with seeds
    0, 1, ... when more than one). The first run's results folder goes to run_dir/sim, every
    run's summary to run_dir/sim_repeats.csv."""
    from experiments.bench import workload_requests, write_results
    from sim import SimConfig, simulate

    results = []
    for k in range(cfg.sim_repeats):
        # driver_on_stage0: the runtime's scheduler shares stage 0's thread (runtime.driver)
        sim_cfg = SimConfig(profile=profile, policy=pol["name"], policy_params=dict(pol["params"]),
                            workload=wl, seed=seed, pp=cfg.pp, num_pages=num_pages, page_size=page_size,
                            driver_on_stage0=True, stage_jitter=cfg.sim_repeats > 1, jitter_seed=k)
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
    from core.metrics import summarize
    from experiments.bench import workload_requests, write_results

    wl = cfg.workload_for(rate)
    seed = wl.pop("seed")
    t = bench.run(workload_requests(wl, seed), pol["name"], pol["params"], seed=seed)
    t_sum = summarize(t)
    t_sum["wall_s"] = t.meta["wall_s"]
    run_dir = cell_dir(out, pol["label"], rate)
    write_results(run_dir / ("real" if k == 0 else f"real_{k + 1}"), t, t_sum,
                  {"model": cfg.model, "pp": cfg.pp, "policy": pol["name"],
                   "policy_params": dict(pol["params"]), "workload": wl, "seed": seed,
                   "num_pages": num_pages, "page_size": bench.page_size,
                   "layer_split": cfg.layer_split, "threads": cfg.threads, "device": cfg.device,
                   "dtype": cfg.dtype})
    return t


# ---------------------------------------------------------------- plots

def make_plots(folder: Path, traces: dict[tuple[str, str], tuple[Trace, Trace]],
               errors: pd.DataFrame) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from experiments.plots import plot_cdfs, plot_timeline, save

    paths: list[Path] = []
    for (label, rl), (sim, real) in traces.items():
        stem = f"{_slug(label)}_r{rl}".replace(".", "p")   # plots.save() takes the last "." for a suffix
        end = float(np.nanmax(real.requests["finish"].to_numpy(float)))
        dur = min(max(end * 0.15, 0.2), 3.0)
        start = max(0.0, end * 0.4)
        paths += save(plot_timeline({"sim": sim, "real": real}, start, dur,
                                    title=f"{label} @ {rl} req/s: simulated (top) vs real (bottom)"),
                      folder / f"timeline_{stem}")
        paths += save(plot_cdfs({"sim": sim, "real": real}, title=f"{label} @ {rl} req/s: latency CDFs"),
                      folder / f"cdf_{stem}")
    fig = Figure(figsize=(1.5 + 1.4 * len(errors), 4.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(errors))
    ax.bar(x - 0.2, errors["sim_bubble"] * 100, 0.4, label="sim")
    ax.bar(x + 0.2, errors["real_bubble"] * 100, 0.4, label="real")
    ax.set_xticks(x, [f"{p}\n@{r}" for p, r in zip(errors["policy"], errors["load"])], fontsize=8)
    ax.set_ylabel("bubble ratio (%)")
    ax.set_title("Pipeline bubble ratio: simulated vs real, per policy and load (req/s)")
    ax.legend()
    paths += save(fig, folder / "bubble_sim_vs_real")
    return paths


# ---------------------------------------------------------------- table and report

def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:+.1f}"


def format_table(errors: pd.DataFrame) -> str:
    """Markdown table of the errors (signed %, bubble in points, E2E MAPE in %)."""
    head = ["policy", "load (req/s)", "thru %", "TTFT p50 %", "TTFT p99 %", "TPOT p50 %", "TPOT p99 %",
            "E2E p50 %", "bubble pts", "E2E MAPE %", "same reqs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in errors.itertuples():
        cells = [r.policy, r.load, *(_pct(getattr(r, c)) for c in ERROR_COLUMNS[:-2]),
                 _pct(r.bubble_diff_pts), "-" if not math.isfinite(r.e2e_mape_pct) else f"{r.e2e_mape_pct:.1f}",
                 "yes" if r.same_requests else "NO"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# goal column -> the column of the real runs' own spread in that quantity
REAL_SPREAD_OF = {"throughput_err_pct": "real_spread_output_tps_pct", "ttft_p50_err_pct": "real_spread_ttft_p50_pct",
                  "tpot_p50_err_pct": "real_spread_tpot_p50_pct", "bubble_diff_pts": "real_spread_bubble_pts"}


def goal_lines(errors: pd.DataFrame, ranking: pd.DataFrame, goals: dict[str, float]) -> list[str]:
    out = []
    for col, limit in goals.items():
        if col not in errors:
            continue
        v = errors[col].abs()
        worst = errors.loc[v.idxmax()] if v.notna().any() else None
        missed = v > limit
        miss = int(missed.sum())
        unit = "pts" if col.endswith("pts") else "%"
        if worst is None:
            out.append(f"- {col}: no data")
            continue
        line = (f"- |{col}| <= {limit:g} {unit}: {'met' if miss == 0 else f'MISSED in {miss}/{len(v)} cells'}; "
                f"worst {worst[col]:+.1f} {unit} ({worst['policy']} @ {worst['load']} req/s)")
        spread_col = REAL_SPREAD_OF.get(col)
        if miss and spread_col in errors and "repeats" in errors and (errors["repeats"] > 1).all():
            # a miss no larger than the hardware's own run-to-run spread is not model error alone
            inside = int((v[missed] <= errors.loc[missed, spread_col]).sum())
            line += f"; {inside} of the {miss} misses within the real runs' own spread of that cell"
        out.append(line)
    same = bool(ranking["same"].all()) if len(ranking) else True
    out.append(f"- same throughput ranking as the hardware: {'met' if same else 'MISSED'} "
               f"({int(ranking['same'].sum())}/{len(ranking)} loads)")
    pairs, agreed = int(ranking["separated_pairs"].sum()), int(ranking["same_separated"].sum())
    out.append(f"- pairs of policies the hardware separates (the ranges of their real runs do not overlap): "
               f"the simulator orders {agreed} of {pairs} the same way"
               + ("" if pairs else " (every pair is within the hardware's own noise)"))
    return out


def spread_section(cfg: ValidationConfig, errors: pd.DataFrame) -> list[str]:
    """Report lines: how far each side's repeated runs spread (nothing without repeats)."""
    sides = [side for side, n in (("real", cfg.repeats), ("sim", cfg.sim_repeats)) if n > 1]
    if not sides:
        return []
    text = {"real": f"{cfg.repeats} times on the runtime (the same requests)",
            "sim": f"{cfg.sim_repeats} times in the simulator (the same requests, measured stage-time "
                   "jitter drawn with another seed each time)"}
    head = [f"{side} {m}" for side in sides for m in ("thru %", "TTFT p50 %", "TPOT p50 %", "bubble pts")]
    lines = ["## Spread over repeats", "",
             "Each cell ran " + " and ".join(text[s] for s in sides) + "; errors above are mean against "
             "mean. Spread = "
             "(max - min) / mean in %, bubble in points: differences of this size between simulator "
             "and runtime are within the runs' own noise.", "",
             "| policy | load | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for r in errors.itertuples():
        cells = [f"{getattr(r, f'{side}_spread_{m}'):.1f}" for side in sides
                 for m in ("output_tps_pct", "ttft_p50_pct", "tpot_p50_pct", "bubble_pts")]
        lines.append(f"| {r.policy} | {r.load} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(out: Path, cfg: ValidationConfig, errors: pd.DataFrame, ranking: pd.DataFrame,
                 plots: list[Path], table: str, num_pages: int, wall_s: float, model: str,
                 profile: str | None = None, reuse_real: bool = False) -> Path:
    try:
        cpu = cpu_name()
    except Exception:  # noqa: BLE001 - the report still gets written
        cpu = platform.processor() or "?"
    lines = [f"# Twin validation: {cfg.name}", ""]
    if cfg.description:
        lines += [cfg.description.strip(), ""]
    lines += [
        f"- config: `{cfg.source or '(in memory)'}`; model `{model}`, pp={cfg.pp}, profile `{cfg.profile}`",
        f"- machine: {platform.node()} ({cpu}, {os.cpu_count()} cores), {platform.system()} "
        f"{platform.release()}; date {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"wall {wall_s:.0f} s",
        *([f"- simulator timed by the in-situ table `{profile}`: stage rows of runtime runs on other "
           f"requests (workload seed {cfg.calibrate['seed']}, loads {cfg.calibrate['loads']} req/s, every "
           f"policy) fitted with the latency model; base table `{cfg.profile}` (see profiles/in_situ.py)"]
          if cfg.calibrate is not None and profile is not None else []),
        *([f"- simulator re-run (`--reuse-real`) against the real runs recorded earlier in `{out}/runs`; "
           "wall time and load averages are the simulator's re-run"] if reuse_real else []),
        f"- KV pages: {num_pages} (the runtime's count, given to the simulator too), page size {cfg.page_size}",
        f"- workload: {len(errors) and int(errors['requests'].iloc[0])} requests, seed {cfg.seed}; "
        f"`{yaml.safe_dump(cfg.workload, default_flow_style=True).strip()}`; loads {cfg.loads} req/s",
        "",
        "## Errors (simulator vs runtime)",
        "",
        "Signed percent errors (sim - real) / real; throughput = output tokens/s; bubble = sim - real "
        "in percentage points; E2E MAPE = mean over requests of |sim - real| / real of the E2E latency.",
        "",
        table,
        "",
        "## Goals",
        "",
        *goal_lines(errors, ranking, cfg.goals),
        "",
        "## Throughput ranking per load",
        "",
        "Separated pairs: policy pairs whose real runs' throughput ranges do not overlap (the others are "
        "ties on this hardware); same: how many of them the simulator orders the same way; reversed: "
        "the others, with how far apart each side has them.",
        "",
        "| load (req/s) | simulator | runtime | same | separated pairs: same / all | reversed |",
        "|---|---|---|---|---|---|",
        *[f"| {r.load} | {r.sim_order} | {r.real_order} | {'yes' if r.same else 'NO'} | "
          f"{r.same_separated} / {r.separated_pairs} | {r.reversed_separated or '-'} |"
          for r in ranking.itertuples()],
        "",
        "## Absolute values",
        "",
        "| policy | load | thru sim / real (tok/s) | TTFT p50 sim / real (ms) | TPOT p50 sim / real (ms) "
        "| bubble sim / real | real wall (s) |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r.policy} | {r.load} | {r.sim_output_tps:.0f} / {r.real_output_tps:.0f} | "
          f"{r.sim_ttft_p50 * 1e3:.0f} / {r.real_ttft_p50 * 1e3:.0f} | "
          f"{r.sim_tpot_p50 * 1e3:.1f} / {r.real_tpot_p50 * 1e3:.1f} | "
          f"{r.sim_bubble:.2f} / {r.real_bubble:.2f} | {r.real_wall_s:.1f} |" for r in errors.itertuples()],
        "",
        *spread_section(cfg, errors),
        "## Diagnostics",
        "",
        "Stage busy time summed over stages and batches (the same tokens on both sides, so its error is "
        "mostly the latency table's), median hop between stages (transfer + wait), batches and mean "
        "decodes per batch, and the 1-minute load average before / after the real run (other load on "
        "the machine shows here).",
        "",
        "Stage time / table: median over stage intervals of the duration over the latency model's "
        "prediction for that batch shape (attention features approximated); about 1 on the sim side "
        "(a few % above with stage jitter, which brings the fit to the measured median and draws a "
        "right-tailed ratio), so the real value against the sim's is how much slower or faster the "
        "runtime's stages ran than the table says.",
        "",
        "| policy | load | busy sim / real (s) | busy err % | stage time / table sim, real "
        "| hop sim / real (ms) | batches sim / real | decodes/batch sim / real | loadavg |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {r.policy} | {r.load} | {r.sim_busy_s:.1f} / {r.real_busy_s:.1f} | {r.busy_err_pct:+.1f} | "
          f"{r.sim_vs_table:.2f}, {r.real_vs_table:.2f} | "
          f"{r.sim_hop_ms:.2f} / {r.real_hop_ms:.2f} | {r.sim_batches} / {r.real_batches} | "
          f"{r.sim_decodes_per_batch:.1f} / {r.real_decodes_per_batch:.1f} | "
          f"{r.loadavg_before:.2f} / {r.loadavg_after:.2f} |" for r in errors.itertuples()],
        "",
        "## Plots",
        "",
        *[f"![{p.stem}](plots/{p.name})" for p in plots if p.suffix == ".png"],
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
