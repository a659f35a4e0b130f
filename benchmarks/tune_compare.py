"""Policies tuned with an equal budget (`pipetwin tune`), side by side.

    .venv/bin/python benchmarks/tune_compare.py results/tune_conv_tt results/tune_conv_tb_late ...

Each folder is a finished tune (trials.csv, best.yaml). The first is the baseline. Per
policy: its best trial's setting, its objective and the gain over the baseline's, then
per target its capacity, what bound it, and two gains: over the baseline's best trial on
that target, and over the baseline's best capacity there in any of its trials (a stricter
baseline, near what tuning the baseline per target would give). The best trial is the one
with the highest objective (the tune's own choice), so a target may have done better under
another trial; the last column gives each target's best over all of a policy's trials.

`--equal-load TUNE_YAML` (the baseline's tune config, for its targets' profiles and
workload) then simulates every policy's best setting at the baseline's capacity on each
target, the goal's "equal load", and tabulates its TTFT (P99, worst) and P99 TPOT.
`--at-capacity` adds the same table with each policy at its *own* capacity: what the
requests a P99 SLO leaves out (the worst TTFT) pay where the policy is run at its limit.
Prints markdown.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pandas as pd
import yaml


def load(folder: Path) -> tuple[str, dict, pd.DataFrame]:
    trials = pd.read_csv(folder / "trials.csv")
    trials = trials[(trials["state"] == "COMPLETE") & trials["feasible"]]
    best = yaml.safe_load((folder / "best.yaml").read_text())
    return best["policy"], best["policy_params"], trials


def targets_of(trials: pd.DataFrame) -> list[str]:
    return [c.removesuffix(".capacity") for c in trials.columns if c.endswith(".capacity")]


def best_row(trials: pd.DataFrame) -> pd.Series:
    """The tune's own choice: the highest objective, the earliest trial on a tie."""
    return trials.sort_values(["objective", "trial"], ascending=[False, True], kind="stable").iloc[0]


def setting(params: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def compare(folders: list[Path]) -> str:
    loaded = [(f, *load(f)) for f in folders]
    targets = targets_of(loaded[0][3])
    for f, _, _, trials in loaded[1:]:
        if targets_of(trials) != targets:
            raise SystemExit(f"{f}: targets {targets_of(trials)} differ from {folders[0]}'s {targets}")

    base = best_row(loaded[0][3])
    base_anywhere = {t: loaded[0][3][f"{t}.capacity"].max() for t in targets}
    head = ["policy", "tuned setting", "trials", "objective", "vs baseline"]
    head += [f"{t}: capacity, bound (vs baseline / vs its best anywhere)" for t in targets]
    head += ["best of any trial, per target"]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in targets) + " | --- |"]
    for folder, policy, params, trials in loaded:
        row = best_row(trials)
        cells = [f"{policy} ({folder.name})", setting(params), str(len(trials)), f"{row['objective']:.4g}",
                 f"{row['objective'] / base['objective'] - 1:+.1%}"]
        for t in targets:
            bound = row.get(f"{t}.capacity_bound", "")
            cap = row[f"{t}.capacity"]
            cells.append(f"{cap:.4g}, {bound} ({cap / base[f'{t}.capacity'] - 1:+.1%} / {cap / base_anywhere[t] - 1:+.1%})")
        cells.append(" / ".join(f"{trials[f'{t}.capacity'].max():.4g}" for t in targets))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


EQUAL_LOAD_METRICS = {"ttft_p99": "TTFT P99 s", "ttft_max": "worst TTFT s", "tpot_p99": "TPOT P99 ms"}


def equal_load(folders: list[Path], tune_yaml: Path, workers: int, own_capacity: bool = False) -> str:
    """Each policy's best setting at the baseline's capacity per target (or, with
    `own_capacity`, at its own best trial's capacity there), one simulation each."""
    from concurrent.futures import ProcessPoolExecutor

    from experiments.config_keys import set_dotted
    from experiments.errors import ConfigError
    from experiments.task_runner import execute   # importable in a worker, unlike this script
    from experiments.tune_config import load_tune

    try:
        spec = load_tune(tune_yaml)
    except ConfigError as e:
        raise SystemExit(f"--equal-load: {e}") from None
    if spec.capacity is None:
        raise SystemExit(f"{tune_yaml}: not a capacity tune (no capacity section), so there is no load to match")
    loaded = [(f, *load(f)) for f in folders]
    base_trials = loaded[0][3]
    base = best_row(base_trials)
    targets = {t.name: t for t in spec.targets}
    names = list(targets)   # the tune config's order
    if set(targets_of(base_trials)) != set(names):
        raise SystemExit(f"{tune_yaml}: targets {names} are not the tuned ones, {targets_of(base_trials)}")
    jobs = []
    for name in names:
        for folder, policy, params, trials in loaded:
            cfg = copy.deepcopy(targets[name].config)
            cfg["policy"], cfg["policy_params"] = policy, dict(params)
            load_value = float((best_row(trials) if own_capacity else base)[f"{name}.capacity"])
            set_dotted(cfg, spec.capacity.key, load_value)
            jobs.append((name, folder.name, policy, load_value, cfg))
    configs = [cfg for *_, cfg in jobs]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            summaries = list(pool.map(execute, configs))
    else:
        summaries = [execute(cfg) for cfg in configs]
    load_label = "own capacity" if own_capacity else "load"
    head = ["target", f"{load_label} ({spec.capacity.key})", "policy", *EQUAL_LOAD_METRICS.values()]
    lines = ["| " + " | ".join(head) + " |", "| --- | ---: | --- | " + " | ".join("---:" for _ in EQUAL_LOAD_METRICS) + " |"]
    for (name, folder, policy, load_value, cfg), summary in zip(jobs, summaries):
        cells = [name, f"{load_value:.4g}", f"{policy} ({folder})"]
        for key in EQUAL_LOAD_METRICS:
            value = summary[key] * (1000 if key.startswith("tpot") else 1)
            cells.append(f"{value:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="finished tune folders; the first is the baseline")
    ap.add_argument("--equal-load", type=Path, metavar="TUNE_YAML",
                    help="the baseline's tune config: also simulate every best setting at the baseline's capacity "
                         "per target and report TTFT P99, worst TTFT and TPOT P99")
    ap.add_argument("--at-capacity", action="store_true",
                    help="with --equal-load: also simulate every best setting at its own capacity per target")
    ap.add_argument("--workers", type=int, default=1, help="processes for --equal-load's simulations")
    args = ap.parse_args()
    if args.workers < 1:
        ap.error(f"--workers must be >= 1, got {args.workers}")
    if args.at_capacity and args.equal_load is None:
        ap.error("--at-capacity needs --equal-load TUNE_YAML (the tune config gives the targets' profiles and workload)")
    for f in args.folders:
        if not (f / "trials.csv").is_file() or not (f / "best.yaml").is_file():
            raise SystemExit(f"{f}: no trials.csv and best.yaml (not a finished `pipetwin tune` folder)")
    print(compare(args.folders))
    if args.equal_load is not None:
        print()
        print(equal_load(args.folders, args.equal_load, args.workers))
    if args.at_capacity:
        print()
        print(equal_load(args.folders, args.equal_load, args.workers, own_capacity=True))


if __name__ == "__main__":
    main()
