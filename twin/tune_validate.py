"""`pipetwin tune --validate`: the tuned setting and the policy's defaults on the real runtime.

The tune picks a setting in the simulator; this asks the hardware whether it agrees. It
takes a validate config for the runtime side (model, pp, workload, loads, ...), replaces its
`policies` with the two settings (labels `defaults` and `tuned`), writes that config into
the tune's results folder (so the run can be repeated with `pipetwin validate`) and runs it
through the validate machinery: the same requests through the simulator and the runtime,
the error table, and per load whether both sides order the two settings the same way.
"""
from __future__ import annotations

from pathlib import Path
import pandas as pd
import yaml

from experiments.tune_config import read_policy_setting
from twin.validate.config import ValidationConfig, load_validation, validation_from_dict

LABELS = ("defaults", "tuned")


def _validation_raw(validate_file: Path, policy: str, params: dict, tune_out: Path) -> tuple[dict, int]:
    """`validate_file`'s config with policies [defaults, tuned] and its results under
    tune_out, and how many policies the file itself gave (replaced)."""
    if not validate_file.is_file():
        raise FileNotFoundError(f"--validate {validate_file}: no such validation config")
    raw = yaml.safe_load(validate_file.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"--validate {validate_file}: a validation config is a mapping (see experiments/twin_cpu.yaml)")
    given = len(raw.get("policies") or [])
    return {**raw, "name": f"{raw.get('name', validate_file.stem)}_tuned",
            "policies": [{"name": policy, "label": LABELS[0]},
                         {"name": policy, "label": LABELS[1], "params": dict(params)}],
            "out": str(tune_out / "validate")}, given


def check_tune_validation(validate_file: str | Path, policy: str, tune_out: Path,
                          tuned_on: set[str] = frozenset()) -> None:
    """Before a search: the validate config with `policy`'s defaults in both slots must load
    (every key, the table and its pp, the loads), so a bad file fails now, not after it.
    Prints a note when it runs on another table than the tune's targets (`tuned_on`)."""
    raw, _ = _validation_raw(Path(validate_file), policy, {}, tune_out)
    where = f"--validate {validate_file}"
    try:
        cfg = validation_from_dict(raw, where)
    except ValueError as e:   # a value check (ValidationConfig) does not know the file: say it
        raise ValueError(str(e) if where in str(e) else f"{where}: {e}") from None
    if tuned_on and cfg.profile not in tuned_on:   # allowed, but rarely what was meant
        print(f"note: tuned on {', '.join(sorted(tuned_on))}; {where} runs on table {cfg.profile!r} "
              f"(model {cfg.model}, pp {cfg.pp}): the tuned setting is tried on other hardware than it was tuned for")


def tune_validation_config(validate_file: str | Path, tune_out: Path, best_yaml: Path) -> ValidationConfig:
    """The validate config of `validate_file` with policies [defaults, tuned] and its results
    under `tune_out`/validate; written to `tune_out`/validate.yaml and loaded from there."""
    validate_file = Path(validate_file)
    policy, params = read_policy_setting(best_yaml, "best setting")
    raw, given = _validation_raw(validate_file, policy, params, tune_out)
    if given:   # say so: the file's own policies are not what this run compares
        print(f"--validate {validate_file}: its policies ({given}) are replaced by {policy}'s defaults "
              f"and the tuned setting")
    path = tune_out / "validate.yaml"
    path.write_text(f"# written by pipetwin tune --validate {validate_file}; rerun: pipetwin validate {path}\n"
                    + yaml.safe_dump(raw, sort_keys=False))
    return load_validation(path)


def agreement_lines(ranking: pd.DataFrame) -> list[str]:
    """Per load: which setting each side puts first by output throughput, and whether the
    hardware separates them beyond its own run-to-run spread."""
    lines = []
    for row in ranking[ranking["metric"] == "output_tps"].itertuples():
        sim_first, real_first = row.sim_order.split(" > ")[0], row.real_order.split(" > ")[0]
        if row.separated_pairs == 0:
            verdict = ("the hardware does not separate them (their repeated runs overlap, or are too few "
                       "to tell apart from chance)")
        elif row.same_separated == row.separated_pairs:
            verdict = "the hardware agrees"
        else:
            verdict = "the hardware DISAGREES"
        lines.append(f"load {row.load}: simulator puts {sim_first} first, runtime {real_first}: {verdict}")
    return lines


def summary_lines(errors: pd.DataFrame, ranking: pd.DataFrame) -> list[str]:
    """What `tune --validate` prints after the validate table: the verdict per load, and the
    tuned setting's real and simulated output throughput over the defaults'."""
    lines = ["tuned vs defaults on the runtime:"] + ["  " + s for s in agreement_lines(ranking)]
    by = errors.set_index(["load", "policy"])
    for load in dict.fromkeys(errors["load"]):
        if (load, LABELS[0]) in by.index and (load, LABELS[1]) in by.index:
            d, t = by.loc[(load, LABELS[0])], by.loc[(load, LABELS[1])]
            lines.append(f"  load {load}: tuned over defaults, output tok/s real "
                         f"{t['real_output_tps'] / d['real_output_tps'] - 1:+.1%}, simulated "
                         f"{t['sim_output_tps'] / d['sim_output_tps'] - 1:+.1%}")
    return lines
