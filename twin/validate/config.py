"""`pipetwin validate FILE.yaml`: the config (keys, checks) and the names of its cells.

The whole tool: twin.validate.run runs it, compare computes the error rows, report writes
the table, plots and report.md.

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
  name, description, model, pp, profile (a table whose pp is `pp`), layer_split, threads,
  device (cpu, or cuda: one GPU per stage over NCCL; `profile` then a table of that model
  and pp, e.g. from `pipetwin profile --device cuda`), dtype (default the model config's), num_pages (null =
  the runtime's default), page_size, seed, attention_backend (auto | torch | triton |
  flashinfer), enforce_eager (true: no CUDA graphs), workload (a core workload spec without
  arrival.rate, rate_scale or time_scale: the rate is each load's), loads (distinct absolute
  request rates, req/s; "inf" allowed),
  policies (list of {name, label, params}, or of paths to {policy, policy_params} YAMLs such
  as a tune's best.yaml, labelled by their folder), out, goals (optional |error| limits,
  numbers >= 0, by key: throughput_err_pct, tpot_p50_err_pct, ttft_p50_err_pct,
  ttft_p99_err_pct in percent, bubble_diff_pts in points; the others keep DEFAULT_GOALS),
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

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.policies import make_policy
from core.validation import check_keys
from core.workloads import Workload
from profiles.schema import load_profile
from runtime.engine_args import check_engine_values


# goals: |error| limits in percent (bubble: percentage points); "ranking" is separate
DEFAULT_GOALS: dict[str, float] = {"throughput_err_pct": 3.0, "tpot_p50_err_pct": 5.0,
                                   "ttft_p50_err_pct": 10.0, "ttft_p99_err_pct": 20.0,
                                   "bubble_diff_pts": 2.0}


_KEYS = ("name", "description", "model", "pp", "profile", "layer_split", "threads", "num_pages",
         "page_size", "seed", "workload", "loads", "policies", "out", "goals", "calibrate", "repeats",
         "sim_repeats", "device", "dtype", "attention_backend", "enforce_eager")


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
    attention_backend: str = "auto"   # auto | torch | triton | flashinfer (runtime.engine_args)
    enforce_eager: bool = False       # True: no CUDA graphs (GPU)
    source: str | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is required (a directory or dummy:<preset | config.json | inline JSON>)")
        check_engine_values({k: getattr(self, k) for k in ("pp", "num_pages", "page_size", "threads", "seed",
                                                           "device", "dtype", "attention_backend",
                                                           "enforce_eager")}, name=str)
        # the table first: a wrong name or pp must fail before the runtime starts
        try:
            table = load_profile(self.profile)
        except (OSError, ValueError) as e:
            raise ValueError(f"profile: {e}") from None
        table_pp = int(table.meta["pp"])
        if table_pp != self.pp:
            raise ValueError(f"pp is {self.pp} but profile {self.profile!r} has pp={table_pp}: give a table of "
                             f"this model at pp={self.pp} (`pipetwin profiles`, or `pipetwin profile --pp {self.pp}`)")
        if not isinstance(self.loads, list) or not self.loads:
            raise ValueError("loads must be a non-empty list of request rates (req/s, or 'inf')")
        for i, r in enumerate(self.loads):
            if not (r == "inf" or (isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0)):
                raise ValueError(f"loads[{i}] must be a rate > 0 or 'inf', got {r!r}")
        _distinct(self.loads, "loads")
        if not isinstance(self.policies, list) or not self.policies:
            raise ValueError("policies must be a non-empty list of {name, label, params}")
        labels = []
        for i, p in enumerate(self.policies):
            if isinstance(p, str) and p.endswith((".yaml", ".yml")):   # a tune's best.yaml, as it is
                from experiments.tune_config import read_policy_setting   # why: YAML policy files only
                name, params = read_policy_setting(p, f"policies[{i}]")
                p = self.policies[i] = {"name": name, "params": params, "label": Path(p).parent.name or name}
            elif isinstance(p, str):
                p = self.policies[i] = {"name": p}
            if not isinstance(p, dict) or "name" not in p:
                raise ValueError(f"policies[{i}] must be a mapping with name (and optional label, params)")
            check_keys(p, ("name", "label", "params"), f"policies[{i}]")
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
        # the arrival rate is each load's: a rate or rescaling given here would be overridden
        set_here = [f"workload.{k}" for k in ("rate_scale", "time_scale") if k in self.workload]
        if isinstance(self.workload.get("arrival"), dict) and "rate" in self.workload["arrival"]:
            set_here.insert(0, "workload.arrival.rate")
        if set_here:
            raise ValueError(f"{', '.join(set_here)}: validate sets the arrival rate from `loads` "
                             "(one run per load); remove it")
        for r in self.loads:
            Workload.from_dict(self.workload_for(r))
        goals = self.goals if self.goals is not None else {}
        check_keys(goals, tuple(DEFAULT_GOALS), "goals")
        for key, limit in goals.items():
            if not (isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit >= 0
                    and math.isfinite(limit)):
                raise ValueError(f"goals.{key} must be a number >= 0 (an |error| limit in "
                                 f"{'points' if key.endswith('pts') else 'percent'}), got {limit!r}")
        self.goals = {**DEFAULT_GOALS, **goals}
        if not (isinstance(self.repeats, int) and not isinstance(self.repeats, bool) and self.repeats >= 1):
            raise ValueError(f"repeats must be an int >= 1 (real runs per policy and load), got {self.repeats!r}")
        if not (isinstance(self.sim_repeats, int) and not isinstance(self.sim_repeats, bool)
                and self.sim_repeats >= 1):
            raise ValueError(f"sim_repeats must be an int >= 1 (simulator runs per policy and load), "
                             f"got {self.sim_repeats!r}")
        if self.sim_repeats > 1 and self.calibrate is None:
            if table.jitter is None:
                raise ValueError(f"sim_repeats: {self.sim_repeats} runs draw measured stage-time jitter, and "
                                 f"profile {self.profile!r} has no jitter.csv; set calibrate (its in-situ table "
                                 "measures it) or sim_repeats: 1")
        if self.calibrate is not None:
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
            _distinct(c["loads"], "calibrate.loads")

    def workload_for(self, rate: Any, seed: int | None = None) -> dict[str, Any]:
        w = dict(self.workload)
        w["arrival"] = {**(w.get("arrival") or {"kind": "gamma"}), "rate": rate}
        w.pop("time_scale", None)
        w.pop("rate_scale", None)
        return {**w, "seed": self.seed if seed is None else seed}


def _distinct(loads: list, key: str) -> None:
    """Two loads with one label would share a results folder (cell_dir)."""
    labels = [rate_label(r) for r in loads]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{key} must be distinct rates, got {loads!r}")


def validation_from_dict(d: Any, where: str) -> ValidationConfig:
    """A validation config from its YAML mapping: every key known, the required ones given."""
    check_keys(d, _KEYS, f"validation config {where}")
    for key in ("model", "profile", "workload", "loads", "policies"):
        if key not in d:
            raise ValueError(f"{where}: {key!r} is required")
    return ValidationConfig(**d)


def load_validation(path: str | Path) -> ValidationConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such validation config")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    cfg = validation_from_dict(d, str(path))
    cfg.source = str(path)
    if cfg.out is None:
        cfg.out = str(Path("results") / path.stem)
    return cfg


def slug(x: Any) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(x))


def cell_dir(root: Path, label: str, rate: Any) -> Path:
    """Folder of one (policy label, load) cell under `root` (runs/ of out or of calibration/)."""
    return root / "runs" / f"{slug(label)}_r{rate_label(rate)}"


def rate_label(rate: Any) -> str:
    return "inf" if rate == "inf" or (isinstance(rate, float) and math.isinf(rate)) else f"{float(rate):g}"
