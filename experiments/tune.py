"""`pipetwin tune FILE.yaml`: search a policy's parameters in the simulator with Optuna.

The study (TPE, seeded) lives in OUT/study.db (SQLite): an interrupted tune resumes where
it stopped, and the simulations it had finished come from the runner's cache (OUT/cache,
the sweep's). Trials are drawn `batch` at a time and run in parallel on the executor;
each batch's sampler is seeded from (seed, trials so far), so the same file and seed give
the same trials however many workers run them, and after a resume too.

Writes OUT/trials.csv (+ .parquet), OUT/best.yaml ({policy, policy_params}: a `pipetwin sim`
or `bench` config, `serve --policy-file`, a `validate` config's policies entry, as it is),
OUT/tune_report.md and OUT/plots/ (optimization history, parameter importance, objective
over the two most important parameters).
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

from experiments.errors import ConfigError
from experiments.expand import probe_config
from experiments.capacity_runs import search_capacity
from experiments.tables import write_table
from experiments.task_runner import Runner, Task, canonical, code_version
from experiments.tune_config import TuneSpec, load_tune

RATE_KEY = "workload.arrival.rate"


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("pipetwin tune needs Optuna: pip install 'pipetwin[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass
class TuneResult:
    out: Path
    trials: pd.DataFrame
    best_params: dict[str, Any]
    best_value: float
    best_trial: int
    computed: int
    cached: int
    wall_s: float
    files: list[Path] = field(default_factory=list)


def spec_fingerprint(spec: TuneSpec) -> str:
    """What makes a study's trials what they are (everything but the trial count)."""
    raw = {k: v for k, v in spec.raw.items() if k not in ("trials", "description")}
    return hashlib.sha256(canonical({"raw": raw, "targets": [t.config for t in spec.targets]}).encode()).hexdigest()[:16]


class Evaluator:
    """The objective of one parameter setting: per target, each term (capacity under the
    SLOs, goodput or throughput at a rate), weighted, then the mean or worst over targets."""

    def __init__(self, spec: TuneSpec, runner: Runner, on_run: Callable[[], None] = lambda: None) -> None:
        self.spec = spec
        self.runner = runner
        self.on_run = on_run

    def violations(self, params: dict[str, Any]) -> list[str]:
        return [c.text for c in self.spec.constraints if not c.holds(params)]

    def __call__(self, params: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """(objective, flat attributes: per target and term the value, the capacity's bound, ...)."""
        spec = self.spec
        attrs: dict[str, Any] = {}
        per_target = []
        for target in spec.targets:
            run = spec.run_for(target, params)
            total = 0.0
            for term, weight in spec.objective.terms().items():
                if term == "capacity":
                    rec, _ = search_capacity(target.name, run, spec.capacity, self.runner, self.on_run)
                    value = rec["capacity"]
                    attrs[f"{target.name}.capacity_bound"] = rec["bound"]
                    if spec.capacity.max_throughput:
                        attrs[f"{target.name}.max_throughput_rps"] = rec["max_throughput_rps"]
                else:
                    row = self.runner.run_one(Task(probe_config(run, RATE_KEY, spec.objective.rate),
                                                   name=f"{target.name} at {spec.objective.rate:g} req/s"))
                    self.on_run()
                    value = row["goodput_rps" if term == "goodput" else "throughput_rps"]
                attrs[f"{target.name}.{term}"] = value
                total += weight * value
            attrs[f"{target.name}.objective"] = total
            per_target.append(total)
        return aggregate(spec.objective.aggregate, per_target), attrs


def aggregate(kind: str, per_target: list[float]) -> float:
    """mean | worst | geomean of the targets' objectives. geomean weighs a relative gain the
    same on every target: with capacities of 1.9 to 12 req/s across platforms, the mean
    would be decided by the fastest one. A target at 0 makes it 0."""
    if kind == "worst":
        return min(per_target)
    if kind == "geomean":
        return 0.0 if min(per_target) <= 0 else math.exp(sum(map(math.log, per_target)) / len(per_target))
    return sum(per_target) / len(per_target)


def _sampler(optuna: Any, spec: TuneSpec, drawn: int) -> Any:
    """TPE seeded by (seed, trials drawn so far): a batch's draws depend only on the file,
    the seed and the results before it."""
    seed = int.from_bytes(hashlib.sha256(f"{spec.seed}:{drawn}".encode()).digest()[:4], "little")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # multivariate and constant_liar are "experimental"
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=spec.startup_trials, multivariate=True, constant_liar=True,
            constraints_func=(lambda t: [float(t.user_attrs.get("violations", 0))]) if spec.constraints else None)


def run_tune(config: str | Path | TuneSpec, out: str | Path | None = None, *, executor: Any = None,
             workers: int | None = None, trials: int | None = None, use_cache: bool = True,
             progress: bool = True, plots: bool = True, log: Callable[[str], None] = print) -> TuneResult:
    """Run (or resume) the study of a tune config; see the module docstring for the outputs.
    `trials` overrides the file's count (a resumed study runs up to that many in all)."""
    optuna = require_optuna()
    t0 = time.perf_counter()
    spec = config if isinstance(config, TuneSpec) else load_tune(config)
    n_trials = spec.trials if trials is None else trials
    if n_trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {n_trials}")
    out = Path(out) if out is not None else Path("results") / spec.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.yaml").write_text(yaml.safe_dump(spec.raw | {"name": spec.name}, sort_keys=False))
    fingerprint = spec_fingerprint(spec)
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    study = optuna.create_study(study_name=spec.name, storage=storage, direction="maximize",
                                load_if_exists=True, sampler=_sampler(optuna, spec, 0))
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("code_version", code_version())
        for params in spec.first_trials:   # a new study only: a resumed one has them already
            study.enqueue_trial(params)
    elif stored != fingerprint:
        raise ConfigError(f"{out / 'study.db'}: holds a study of a different config (policy, params, "
                          "targets, objective or seed changed); give another --out or delete the folder")

    runner = Runner(out, workers, use_cache, progress, executor)
    from tqdm import tqdm
    bar = tqdm(total=n_trials, desc="trials", unit="trial", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        runner.start(dict.fromkeys(t.config["profile"] for t in spec.targets))
        evaluate = Evaluator(spec, runner)
        _optimize(optuna, study, spec, evaluate, n_trials, runner, bar)
    except BaseException:
        runner.close(kill=True)
        raise
    finally:
        bar.close()
    runner.close()

    table = trials_table(study, spec)
    files = write_table(table, out / "trials")
    feasible = table[(table["state"] == "COMPLETE") & table["feasible"]]
    if not len(feasible):
        raise RuntimeError(f"{spec.name}: no feasible trial finished (see {out / 'trials.csv'})")
    best = feasible.sort_values(["objective", "trial"], ascending=[False, True], kind="stable").iloc[0]
    # From the trial itself, not the table: a table column of categorical choices such as
    # [null, 256, 512] is float64 (NaN, 256.0), which the policy's own validation rejects.
    chosen = study.trials[int(best["trial"])].params
    best_params = {p.name: (int(v) if p.type == "int" else float(v) if p.type == "float" else v)
                   for p in spec.params for v in [_plain(chosen[p.name])]}
    files.append(write_best(out / "best.yaml", spec, best_params, float(best["objective"]), int(best["trial"])))
    importance = param_importance(optuna, study, spec)
    if plots:
        from experiments.tune_plots import make_tune_plots  # why: matplotlib, only when plots are asked for
        files += make_tune_plots(out / "plots", table, spec, importance)
    res = TuneResult(out, table, best_params, float(best["objective"]), int(best["trial"]),
                     runner.computed, runner.cached, time.perf_counter() - t0, files)
    files.append(write_tune_report(out, spec, res, importance))
    (out / "tune_meta.json").write_text(json.dumps(
        {"code_version": code_version(), "trials": int(len(table)), "computed": runner.computed,
         "cached": runner.cached, "workers": runner.workers, "wall_s": round(res.wall_s, 2)}, indent=2) + "\n")
    res.wall_s = time.perf_counter() - t0
    return res


def _optimize(optuna: Any, study: Any, spec: TuneSpec, evaluate: Evaluator, n_trials: int,
              runner: Runner, bar: Any) -> None:
    from optuna.trial import TrialState

    def finish(params: dict[str, Any]) -> tuple[float, dict[str, Any], list[str]]:
        bad = evaluate.violations(params)
        if bad:   # not simulated; the sampler learns the region is infeasible
            return 0.0, {}, bad
        value, attrs = evaluate(params)
        return value, attrs, []

    def run_batch(trials: list[Any], params: list[dict[str, Any]]) -> None:
        threads = max(1, min(len(trials) * len(spec.targets), max(runner.workers * 4, len(trials))))
        with ThreadPoolExecutor(max_workers=threads) as tp:
            results = list(tp.map(finish, params))
        for trial, (value, attrs, bad) in zip(trials, results):   # told in draw order
            for k, v in attrs.items():
                trial.set_user_attr(k, _plain(v))
            trial.set_user_attr("violations", len(bad))
            if bad:
                trial.set_user_attr("infeasible", "; ".join(bad))
            study.tell(trial, value)
            bar.update()

    # A batch drawn before an interruption is drawn again with the same parameters (the
    # interrupted trials are kept, as FAIL); its finished simulations come from the cache.
    # Still-queued trials (first_trials, or re-queued ones not yet drawn) are asked as they are.
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    bar.update(min(done, n_trials))
    while done < n_trials:
        study.sampler = _sampler(optuna, spec, done)
        trials = [study.ask() for _ in range(min(spec.batch, n_trials - done))]
        run_batch(trials, [{p.name: p.suggest(t) for p in spec.params} for t in trials])
        done += len(trials)


def _plain(v: Any) -> Any:
    """numpy scalars as Python ones (storage and YAML take those)."""
    return v.item() if hasattr(v, "item") and callable(v.item) else v


def trials_table(study: Any, spec: TuneSpec) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name,
                               "objective": t.value if t.value is not None else math.nan,
                               "feasible": "infeasible" not in t.user_attrs,
                               "infeasible": t.user_attrs.get("infeasible", "")}
        row.update({f"params.{p.name}": t.params.get(p.name) for p in spec.params})
        row.update({k: v for k, v in sorted(t.user_attrs.items()) if k not in ("violations", "infeasible")})
        rows.append(row)
    return pd.DataFrame(rows)


def param_importance(optuna: Any, study: Any, spec: TuneSpec) -> dict[str, float]:
    """PED-ANOVA importance of each tuned parameter; {} with too few trials to tell."""
    from optuna.trial import TrialState
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "infeasible" not in t.user_attrs]
    if len(spec.params) < 2 or len(done) < 4:
        return {p.name: 1.0 / len(spec.params) for p in spec.params} if len(done) >= 1 else {}
    try:
        ev = optuna.importance.PedAnovaImportanceEvaluator()   # no scikit-learn needed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            feasible = optuna.create_study(direction="maximize")   # in memory: the feasible trials only
            feasible.add_trials(done)
            imp = optuna.importance.get_param_importances(feasible, evaluator=ev,
                                                          params=[p.name for p in spec.params])
        return {k: float(v) for k, v in imp.items()}
    except Exception as e:   # e.g. every trial scored the same: nothing to attribute
        print(f"note: parameter importance not computed ({type(e).__name__}: {e})", file=sys.stderr)
        return {}


def write_best(path: Path, spec: TuneSpec, params: dict[str, Any], value: float, trial: int) -> Path:
    """{policy, policy_params}: a `pipetwin sim` or `bench` config as it is, `serve
    --policy-file`, and a path entry of a `validate` config's `policies`."""
    doc = {"policy": spec.policy, "policy_params": {**spec.fixed, **params}}
    head = (f"# best of tune {spec.name!r}: trial {trial}, objective {value:.6g} "
            f"({spec.objective.kind}, {spec.objective.aggregate} over {len(spec.targets)} target(s))\n"
            f"#   pipetwin sim {path}    pipetwin bench {path} --model ...    pipetwin serve --policy-file {path} ...\n"
            f"#   in a validate config: policies: [{path}, {{name: {spec.policy}, label: defaults}}]\n")
    path.write_text(head + yaml.safe_dump(doc, sort_keys=False))
    return path


def write_tune_report(out: Path, spec: TuneSpec, res: TuneResult, importance: dict[str, float]) -> Path:
    t = res.trials
    ok = t[(t["state"] == "COMPLETE") & t["feasible"]]
    lines = [f"# Tune: {spec.name}", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    terms = ", ".join(f"{w:g} x {k}" for k, w in spec.objective.terms().items())
    lines += [f"Policy `{spec.policy}`; objective {terms}"
              + (f" at {spec.objective.rate:g} req/s" if spec.objective.rate else "")
              + f", {spec.objective.aggregate} over targets {', '.join(t.name for t in spec.targets)}; "
              f"{len(t)} trials ({len(ok)} feasible), TPE seed {spec.seed}, batches of {spec.batch}; "
              f"{res.computed} simulations computed, {res.cached} from cache, {res.wall_s:.1f} s.", "",
              f"Best: trial {res.best_trial}, objective **{res.best_value:.4g}**: "
              + ", ".join(f"{k}={v}" for k, v in res.best_params.items()) + " (`best.yaml`).", ""]
    if importance:
        lines += ["Parameter importance (PED-ANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in importance.items()), ""]
    top = ok.sort_values("objective", ascending=False).head(10)
    cols = ["trial", "objective", *[f"params.{p.name}" for p in spec.params],
            *[c for c in t.columns if c.endswith("capacity_bound")]]
    lines += ["## Top trials", "", "| " + " | ".join(c.removeprefix("params.") for c in cols) + " |",
              "|" + "---|" * len(cols)]
    for _, r in top.iterrows():
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    lines += ["", "## Plots", ""]
    for stem, cap in (("history", "Optimization history"), ("importance", "Parameter importance"),
                      ("top2", "Objective over the two most important parameters")):
        if (out / "plots" / f"{stem}.png").exists():
            lines += [f"### {cap}", "", f"![{cap}](plots/{stem}.png)", ""]
    path = out / "tune_report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
