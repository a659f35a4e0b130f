"""The disk cache of latency-model fits: same model as a fresh fit, keyed by the table's
files, skipped when it cannot be used."""
from __future__ import annotations

import shutil

from profiles import fit, load_profile
from profiles.fit_cache import cache_dir, cached_fit, fit_key
from profiles.schema import resolve

PROFILE = "qwen2.5-32b_a100-80gb_pp4"
SHAPES = [(s, p, d, p * p // 2, d * 900) for s in range(4) for p, d in ((0, 64), (512, 8), (2048, 0))]


def test_cached_fit_is_the_fit_and_is_keyed_by_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPETWIN_CACHE_DIR", str(tmp_path / "cache"))
    prof = load_profile(PROFILE)
    fresh, err = fit(prof)
    first, _ = cached_fit(PROFILE, prof)
    assert len(list(cache_dir().glob("*.pkl"))) == 1
    again, err2 = cached_fit(PROFILE, prof)
    assert str(err2) == str(err)
    for shape in SHAPES:
        assert again.stage_time(*shape) == first.stage_time(*shape) == fresh.stage_time(*shape)
    copy = tmp_path / "table"
    shutil.copytree(resolve(PROFILE), copy)
    assert fit_key(copy) == fit_key(resolve(PROFILE))
    with open(copy / "stages.csv", "a") as f:
        f.write("\n")
    assert fit_key(copy) != fit_key(resolve(PROFILE))


def test_unusable_cache_falls_back_to_fitting(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PIPETWIN_CACHE_DIR", str(blocker))
    prof = load_profile(PROFILE)
    model, _ = cached_fit(PROFILE, prof)
    assert model.stage_time(*SHAPES[0]) == fit(prof)[0].stage_time(*SHAPES[0])
    monkeypatch.setenv("PIPETWIN_CACHE_DIR", str(tmp_path / "c"))
    cached_fit(PROFILE, prof)
    (pkl,) = cache_dir().glob("*.pkl")
    pkl.write_bytes(b"garbage")
    model, _ = cached_fit(PROFILE, prof)
    assert model.stage_time(*SHAPES[1]) == fit(prof)[0].stage_time(*SHAPES[1])
