"""`pipetwin tune --validate`: the validate config it builds from a tune's best setting, and
how it reads the validate run's ranking (the runtime run itself is validate's, tested there)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from cli.main import main
from twin.tune_validate import agreement_lines, check_tune_validation, summary_lines, tune_validation_config
from twin.validate.config import load_validation

ROOT = Path(__file__).resolve().parents[1]
TWIN = ROOT / "experiments" / "twin_cpu.yaml"


def best_yaml(folder: Path) -> Path:
    p = folder / "best.yaml"
    p.write_text("# best of tune 't'\n" + yaml.safe_dump({"policy": "token_throttling",
                                                        "policy_params": {"maxp": 512, "minp": 16}}))
    return p


def test_config_compares_defaults_with_the_tuned_setting_on_the_files_runtime(tmp_path, capsys):
    cfg = tune_validation_config(TWIN, tmp_path, best_yaml(tmp_path))
    base = load_validation(TWIN)
    assert [(p["name"], p["label"], p.get("params") or {}) for p in cfg.policies] == [
        ("token_throttling", "defaults", {}), ("token_throttling", "tuned", {"maxp": 512, "minp": 16})]
    assert "policies" in capsys.readouterr().out   # the file's own policies are replaced, and it says so
    for key in ("model", "pp", "profile", "loads", "workload", "calibrate", "repeats", "seed"):
        assert getattr(cfg, key) == getattr(base, key), key
    assert Path(cfg.out) == tmp_path / "validate" and cfg.name == "twin_cpu_tuned"
    # the config it ran is on disk, and `pipetwin validate` reads it back the same
    again = load_validation(tmp_path / "validate.yaml")
    assert again.policies == cfg.policies and again.out == cfg.out


def test_config_errors_name_the_flag_and_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="--validate"):
        tune_validation_config(tmp_path / "nope.yaml", tmp_path, best_yaml(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match="--validate .*mapping"):
        tune_validation_config(bad, tmp_path, best_yaml(tmp_path))
    (tmp_path / "best.yaml").write_text("policy_params: {maxp: 1}\n")
    with pytest.raises(Exception, match="best setting"):
        tune_validation_config(TWIN, tmp_path, tmp_path / "best.yaml")


def test_verdicts_follow_the_ranking():
    ranking = pd.DataFrame([
        {"metric": "output_tps", "load": "3.0", "sim_order": "tuned > defaults", "real_order": "defaults > tuned",
         "separated_pairs": 0, "same_separated": 0},
        {"metric": "output_tps", "load": "5.5", "sim_order": "tuned > defaults", "real_order": "tuned > defaults",
         "separated_pairs": 1, "same_separated": 1},
        {"metric": "output_tps", "load": "inf", "sim_order": "tuned > defaults", "real_order": "defaults > tuned",
         "separated_pairs": 1, "same_separated": 0},
        {"metric": "ttft_p50", "load": "3.0", "sim_order": "tuned > defaults", "real_order": "tuned > defaults",
         "separated_pairs": 1, "same_separated": 1}])
    lines = agreement_lines(ranking)
    assert len(lines) == 3   # by throughput only
    assert "does not separate" in lines[0] and "runtime defaults" in lines[0]
    assert lines[1].endswith("the hardware agrees")
    assert lines[2].endswith("DISAGREES")
    errors = pd.DataFrame([
        {"load": "inf", "policy": "defaults", "real_output_tps": 100.0, "sim_output_tps": 110.0},
        {"load": "inf", "policy": "tuned", "real_output_tps": 90.0, "sim_output_tps": 121.0}])
    text = "\n".join(summary_lines(errors, ranking.iloc[2:]))
    assert "real -10.0%, simulated +10.0%" in text


def test_cli_checks_the_validate_file_before_searching(tmp_path, capsys):
    out = tmp_path / "t"
    with pytest.raises(SystemExit) as e:
        main(["tune", str(ROOT / "experiments" / "tune_tt.yaml"), "--out", str(out),
              "--validate", str(tmp_path / "missing.yaml")])
    assert e.value.code == 2 and "--validate" in capsys.readouterr().err
    assert not out.exists()   # nothing was searched
    # a file that exists but would fail only after the search: every check runs first
    bad = yaml.safe_load(TWIN.read_text())
    for change, named in (({"repeats": 0}, "repeats must be an int >= 1"),
                          ({"profile": "llama-32m_cpu-1thread_pp3"}, "pp is 2 but profile"),
                          ({"lodas": [1.0]}, "unknown key 'lodas'")):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**bad, **change}))
        with pytest.raises(SystemExit) as e:
            main(["tune", str(ROOT / "experiments" / "tune_tt_cpu.yaml"), "--out", str(out),
                  "--validate", str(tmp_path / "bad.yaml")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--validate {tmp_path / 'bad.yaml'}" in err and named in err, err
        assert not out.exists()


def test_tune_then_validate_end_to_end(tmp_path, capsys):
    """A short tune, then both settings through the simulator and the pp=2 CPU runtime on the
    same requests: the validate folder holds one error row per setting, and the verdict is printed."""
    pytest.importorskip("torch")
    pytest.importorskip("optuna")
    v = {"name": "tiny", "model": "dummy:llama-32m", "pp": 2, "profile": "llama-32m_cpu-1thread_pp2",
         "num_pages": 256, "page_size": 16, "seed": 3, "threads": 1,
         "workload": {"num_requests": 12, "arrival": {"kind": "gamma", "burstiness": 1.0},
                      "prompt_len": {"kind": "lognormal", "mean": 60, "spread": 0.5, "max": 200},
                      "output_len": {"kind": "lognormal", "mean": 12, "spread": 0.5, "max": 30}},
         "loads": ["inf"], "policies": [{"name": "sarathi"}], "repeats": 2}
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(v))
    out = tmp_path / "t"
    assert main(["tune", str(ROOT / "experiments" / "tune_tt_cpu.yaml"), "--trials", "4", "--workers", "1",
                 "--out", str(out), "--validate", str(tmp_path / "v.yaml")]) == 0
    printed = capsys.readouterr().out
    errors = pd.read_csv(out / "validate" / "errors.csv")
    assert sorted(errors["policy"]) == ["defaults", "tuned"]
    assert errors["same_requests"].all() and (errors["repeats"] == 2).all()
    assert (errors["real_finished"] == 12).all() and (errors["sim_finished"] == 12).all()
    best = yaml.safe_load((out / "best.yaml").read_text())["policy_params"]
    ran = load_validation(out / "validate.yaml")
    assert ran.policies[1]["params"] == best
    assert "tuned vs defaults on the runtime:" in printed and "load inf:" in printed
    assert (out / "validate" / "report.md").is_file()


def test_validating_on_other_hardware_than_tuned_is_noted(tmp_path, capsys):
    """Tuned on an A100 table, validated on the CPU twin's: allowed, but said before the search."""
    check_tune_validation(TWIN, "token_throttling", tmp_path, {"qwen2.5-32b_a100-80gb_pp4"})
    out = capsys.readouterr().out
    assert out.startswith("note: tuned on qwen2.5-32b_a100-80gb_pp4;") and "'llama-32m_cpu-1thread_pp2'" in out
    check_tune_validation(TWIN, "token_throttling", tmp_path, {"llama-32m_cpu-1thread_pp2"})
    assert capsys.readouterr().out == ""
