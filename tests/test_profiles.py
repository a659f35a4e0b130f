"""profiles/: loader validation, round trip, fitted model, analytical generator."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from profiles import ProfileError, fit, list_tables, load_profile, save_profile
from profiles import analytical, specs
from profiles.schema import TABLES_DIR, Profile

SHIPPED = "qwen2.5-32b_a100-80gb_pp4"


@pytest.fixture
def table(tmp_path: Path) -> Path:
    return save_profile(analytical.make_profile("llama-3-8b", "h100-80gb", 2, date="2025-01-01"),
                        tmp_path / "t")


def _edit_csv(path: Path, fn) -> None:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    out = fn(df)
    (df if out is None else out).to_csv(path, index=False)


def _edit_meta(path: Path, fn) -> None:
    meta = yaml.safe_load((path / "meta.yaml").read_text())
    fn(meta)
    (path / "meta.yaml").write_text(yaml.safe_dump(meta))


def _raises(path: Path, *needles: str) -> str:
    with pytest.raises(ProfileError) as exc:
        load_profile(path)
    msg = str(exc.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def test_valid_table_loads(table):
    prof = load_profile(table)
    assert prof.pp == 2 and set(prof.stages["stage"]) == {0, 1}
    # whole-layer splits keep integer layer counts
    assert prof.stages["num_layers"].dtype == "int64"
    assert all(type(x) is int for x in prof.meta["layer_split"])


def _half_split(table: Path, split=(4.5, 3.5), rows=None) -> None:
    """Make `table` an 8-layer model split `split` (stage boundary inside a layer)."""
    def meta(m):
        m["model"]["config"]["num_hidden_layers"] = 8
        m["layer_split"] = list(split)

    def csv(df):
        per_stage = rows or split
        df["num_layers"] = [str(per_stage[int(st)]) for st in df["stage"]]

    _edit_meta(table, meta)
    _edit_csv(table / "stages.csv", csv)


def test_half_layer_split_loads(table, tmp_path):
    _half_split(table)
    prof = load_profile(table)
    assert prof.meta["layer_split"] == [4.5, 3.5]
    assert sorted(set(prof.stages["num_layers"])) == [3.5, 4.5]
    again = load_profile(save_profile(prof, tmp_path / "copy", float_format="%.6g"))
    pd.testing.assert_frame_equal(prof.stages, again.stages)
    assert again.meta["layer_split"] == [4.5, 3.5]


def test_half_layer_split_rejects_disagreeing_rows(table):
    _half_split(table, rows=(4, 3.5))
    _raises(table, "stages.csv", "'num_layers'", "4 but layer_split gives stage 0 4.5 layers")


@pytest.mark.parametrize("split, rows, needles", [
    ((4.25, 3.75), None, ("meta.yaml", "'layer_split'", "multiples of 0.5")),
    ((5.5, 3.5), None, ("meta.yaml", "'layer_split' sums to 9")),
    ((4.5, 3.5), (4.25, 3.5), ("stages.csv", "'num_layers'", "not a multiple of 0.5")),
])
def test_half_layer_split_rejects_bad_values(table, split, rows, needles):
    _half_split(table, split, rows)
    _raises(table, *needles)


def test_rejects_missing_column(table):
    _edit_csv(table / "stages.csv", lambda df: df.drop(columns=["latency_p90"]))
    _raises(table, "stages.csv", "missing column", "latency_p90")


def test_rejects_non_numeric_cell(table):
    _edit_csv(table / "stages.csv", lambda df: df.__setitem__("prefill_tokens", df["prefill_tokens"].where(df.index != 2, "abc")))
    _raises(table, "stages.csv", "line 4", "row 3", "'prefill_tokens'", "abc")


def test_rejects_nan_and_empty(table):
    _edit_csv(table / "stages.csv", lambda df: df.loc.__setitem__((6, "decode_context"), ""))
    _raises(table, "stages.csv", "row 7", "'decode_context'", "NaN/empty")


def test_rejects_negative_latency(table):
    _edit_csv(table / "stages.csv", lambda df: df.loc.__setitem__((4, "latency_median"), "-0.1"))
    _raises(table, "stages.csv", "line 6", "row 5", "'latency_median'", "negative")


def test_rejects_bad_stage_id(table):
    _edit_csv(table / "stages.csv", lambda df: df.loc.__setitem__((0, "stage"), "7"))
    _raises(table, "stages.csv", "row 1", "'stage'", "outside 0..1")


def test_rejects_stage_without_rows(table):
    _edit_csv(table / "stages.csv", lambda df: df[df["stage"] != "1"])
    _raises(table, "stages.csv", "stage(s) [1] have no rows")


def test_rejects_bad_transfer_row(table):
    _edit_csv(table / "transfer.csv", lambda df: df.loc.__setitem__((1, "bytes"), "x"))
    _raises(table, "transfer.csv", "row 2", "'bytes'")


@pytest.mark.parametrize("edit, needles", [
    (lambda m: m.pop("dtype"), ("meta.yaml", "missing key", "'dtype'")),
    (lambda m: m.__setitem__("source", "guessed"), ("meta.yaml", "'source'", "guessed")),
    (lambda m: m["model"]["config"].pop("vocab_size"), ("meta.yaml", "vocab_size")),
    (lambda m: m.__setitem__("layer_split", [16, 15]), ("meta.yaml", "layer_split")),
    (lambda m: m.__setitem__("weight_bytes_per_stage", [1]), ("meta.yaml", "weight_bytes_per_stage")),
])
def test_rejects_bad_meta(table, edit, needles):
    _edit_meta(table, edit)
    _raises(table, *needles)


def test_unknown_name_lists_shipped():
    with pytest.raises(ProfileError, match="no shipped table"):
        load_profile("no-such-model_x_pp3")


def test_round_trip(table, tmp_path):
    a = load_profile(table)
    b = load_profile(save_profile(a, tmp_path / "copy"))
    assert a.meta == b.meta
    pd.testing.assert_frame_equal(a.stages, b.stages)
    pd.testing.assert_frame_equal(a.transfer, b.transfer)
    assert a.kv_pages() == b.kv_pages() > 0
    # a lossy float format rounds latencies only, never the integer shape columns
    c = load_profile(save_profile(a, tmp_path / "lossy", float_format="%.3g"))
    pd.testing.assert_frame_equal(a.stages.drop(columns=["latency_median", "latency_p10", "latency_p90"]),
                                  c.stages.drop(columns=["latency_median", "latency_p10", "latency_p90"]))
    np.testing.assert_allclose(a.stages["latency_median"], c.stages["latency_median"], rtol=5e-3)


def _synthetic(noise: float, seed: int = 0, chunk_cost: float = 0.0,
               small: tuple[float, float] = (0.0, 0.0)) -> tuple[Profile, list[tuple[float, ...]]]:
    """Two stages, latency an exact linear function of the features (times noise), plus
    `chunk_cost` for every row holding prefill tokens, plus small[0] per token for the first
    small[1] tokens of a batch (a concave, small-batch cost)."""
    base = analytical.make_profile("llama-3-8b", "h100-80gb", 2, date="2025-01-01")
    rng = np.random.default_rng(seed)
    truth = [(1e-3, 5e-5, 8e-5, 2e-9, 4e-8), (2e-3, 6e-5, 9e-5, 3e-9, 5e-8)]
    rows = []
    for s, c in enumerate(truth):
        for _ in range(80):
            p, d = int(rng.integers(0, 4096)), int(rng.integers(0, 256))
            if chunk_cost and rng.random() < 0.5:
                p = 0   # decode-only rows, so the chunk cost is not just the intercept
            if small[1] and rng.random() < 0.5:
                p, d = 0, int(rng.integers(1, 48))   # small batches, where the concave part shows
            paw, dc = p * int(rng.integers(max(p, 1), 16384)), d * int(rng.integers(1, 8192))
            lat = (c[0] + c[1] * p + c[2] * d + c[3] * paw + c[4] * dc
                   + (chunk_cost if p > 0 else 0.0) + small[0] * min(p + d, small[1])) * rng.lognormal(0, noise)
            rows.append((s, base.meta["layer_split"][s], p, d, paw, dc, lat, lat, lat, 1))
    stages = pd.DataFrame(rows, columns=base.stages.columns)
    sizes = np.array([1e3, 1e5, 1e6, 1e7, 1e8])
    transfer = pd.DataFrame({"bytes": sizes, "latency_median": 2e-5 + sizes / 1e11, "samples": 1})
    return Profile(base.meta, stages, transfer, name="synthetic"), truth


def test_fit_recovers_a_fixed_cost_of_batches_holding_a_prefill_chunk():
    prof, truth = _synthetic(noise=0.0, chunk_cost=3e-3)
    model, err = fit(prof, holdout=0.2, seed=1)
    for s, c in enumerate(truth):
        np.testing.assert_allclose(model.coefs[s][:5], c, rtol=1e-6)
        assert model.coefs[s][9] == pytest.approx(3e-3, rel=1e-6)
    assert model.stage_time(0, 1, 4, 2, 40) - model.stage_time(0, 0, 4, 0, 40) == pytest.approx(
        3e-3 + truth[0][1] + 2 * truth[0][3], rel=1e-6)
    assert err.mape < 1e-9


def test_fit_recovers_a_concave_small_batch_cost():
    """The first 24 tokens of a batch cost 40 us more each: the fit finds the knee and the
    extra cost, and predicts unseen rows, small and big, within 1%."""
    prof, truth = _synthetic(noise=0.0, small=(4e-5, 24))
    model, err = fit(prof, holdout=0.2, seed=1)
    for s in range(2):
        assert model.coefs[s][10] == pytest.approx(4e-5, rel=0.05)
        assert model.coefs[s][11] == pytest.approx(24, rel=0.05)
    assert err.held_out and err.max_ape < 0.01
    assert model.stage_time(0, 0, 8, 0, 800) - model.stage_time(0, 0, 4, 0, 400) == pytest.approx(
        4 * (truth[0][2] + 4e-5) + 400 * truth[0][4], rel=0.02)


def test_fit_recovers_linear_coefficients():
    prof, truth = _synthetic(noise=0.0)
    model, err = fit(prof, holdout=0.2, seed=1)
    for s, c in enumerate(truth):
        np.testing.assert_allclose(model.coefs[s][:5], c, rtol=1e-6)
        assert model.coefs[s][5] * model.coefs[s][7] < 1e-12     # no spurious hinge
        assert model.coefs[s][9] < 1e-12                          # nor a chunk cost
        assert model.coefs[s][10] < 1e-12                         # nor a small-batch cost
    assert err.held_out and err.mape < 1e-9 and err.max_ape < 1e-8
    assert err.rows_evaluated == 32 and len(err.stage_mape) == 2
    assert model.transfer_time(1e8) == pytest.approx(2e-5 + 1e-3, rel=1e-9)
    assert model.transfer_time(0) == 0.0
    t = model.stage_time(1, 100, 10, 100 * 500, 10 * 800)
    assert type(t) is float
    assert t == pytest.approx(sum(a * b for a, b in zip(truth[1], (1, 100, 10, 50000, 8000))), rel=1e-9)


def test_fit_reports_error_on_noisy_data():
    prof, _ = _synthetic(noise=0.05)
    _, err = fit(prof, holdout=0.25, seed=0)
    assert 0.01 < err.mape < 0.2 and err.max_ape > err.mape
    _, in_sample = fit(prof, holdout=0.0)
    assert not in_sample.held_out and in_sample.rows_evaluated == 160


def test_shipped_table_by_short_name_fits_well():
    assert SHIPPED in list_tables()
    prof = load_profile(SHIPPED)
    assert prof.meta["source"] == "analytical" and prof.pp == 4
    model, err = fit(prof)
    assert err.held_out and err.mape < 0.01 and err.max_ape < 0.05
    assert model.pp == 4 and model.sched_overhead > 0
    assert model.activation_bytes(10) == 10 * 5120 * 2 * 2
    assert prof.kv_pages() == prof.meta["kv_pages_16"] > 0


def test_shipped_tables_are_small_and_complete():
    names = list_tables()
    size = sum(f.stat().st_size for f in TABLES_DIR.rglob("*") if f.is_file())
    assert size < 5e6
    assert {"llama-3-8b_l40s_pp1", "qwen2.5-72b_h200_pp2", "llama-3-70b_a100-80gb_pp8"} <= set(names)
    assert "qwen2.5-72b_a100-80gb_pp1" not in names


def _lat(model="qwen2.5-32b", gpu="a100-80gb", pp=4, stage=1, p=0, d=0, paw=0, dc=0):
    _, cfg = specs.MODELS[model]
    split = specs.even_split(cfg["num_hidden_layers"], pp)
    return analytical.stage_latency(cfg, specs.GPUS[gpu], split[stage], stage == 0,
                                    stage == pp - 1, p, d, paw, dc)


def test_last_stage_slower_than_middle():
    for shape in ({"d": 64, "dc": 64000}, {"p": 512, "paw": 512 * 512}, {"d": 1, "dc": 100}):
        assert _lat(stage=3, **shape) > _lat(stage=1, **shape)


def test_pp1_stage_is_sum_of_pp4_stages():
    for shape in ({"d": 64, "dc": 64000}, {"p": 2048, "paw": 2048 ** 2, "d": 32, "dc": 32000}):
        whole = _lat(pp=1, stage=0, **shape)
        parts = sum(_lat(pp=4, stage=s, **shape) for s in range(4))
        assert parts == pytest.approx(whole, rel=1e-3)


def test_monotone_in_prefill_tokens_and_decode_context():
    for stage in (0, 1, 3):
        lat = [_lat(stage=stage, p=p, paw=p * p) for p in (1, 16, 128, 512, 2048, 8192)]
        assert all(a <= b for a, b in zip(lat, lat[1:])) and lat[0] < lat[-1]
        # and at a fixed chunk, in the context it attends to
        lat = [_lat(stage=stage, p=512, paw=512 * c) for c in (512, 4096, 32768)]
        assert all(a < b for a, b in zip(lat, lat[1:]))
    ctx = [_lat(d=32, dc=32 * c) for c in (1, 100, 1000, 10000, 100000)]
    assert all(a < b for a, b in zip(ctx, ctx[1:]))


def test_small_decode_is_memory_bound():
    prof = analytical.make_profile("qwen2.5-32b", "a100-80gb", 4, date="2025-01-01")
    weights = prof.meta["weight_bytes_per_stage"][1]
    ideal = weights / specs.GPUS["a100-80gb"].mem_bw
    assert ideal < _lat(d=1, dc=128) < 2 * ideal
    # and well inside the memory-bound regime: 8 decodes barely cost more than 1
    assert _lat(d=8, dc=8 * 128) < 1.05 * _lat(d=1, dc=128)


def test_kv_pages_grow_with_pp():
    pages = [analytical.make_profile("qwen2.5-32b", "a100-80gb", pp, date="x").kv_pages() for pp in (1, 2, 4, 8)]
    assert all(a < b for a, b in zip(pages, pages[1:]))
    prof = analytical.make_profile("qwen2.5-32b", "a100-80gb", 4, date="x")
    assert prof.kv_pages(page_size=32) == pytest.approx(prof.kv_pages() / 2, abs=1)
    assert prof.kv_pages(memory_fraction=0.5) < prof.kv_pages()


def test_uneven_split_and_skips(tmp_path):
    prof = analytical.make_profile("llama-3-8b", "l40s", 3, layer_split=[12, 10, 10], date="x")
    assert prof.meta["layer_split"] == [12, 10, 10]
    assert analytical.skip_reason("qwen2.5-72b", "a100-80gb", 1)
    assert analytical.skip_reason("llama-3-8b", "a100-80gb", 1) is None
    written, skipped = analytical.generate_all(tmp_path, models=["qwen2.5-72b"], gpus=["h200"], pps=[1, 2])
    assert written == ["qwen2.5-72b_h200_pp2"] and skipped[0].startswith("qwen2.5-72b_h200_pp1")
    assert load_profile(tmp_path / written[0]).pp == 2


def test_analytical_tables_refuse_half_layer_splits():
    """The roofline has no attention/MLP breakdown: a half split is refused, by name."""
    with pytest.raises(ValueError, match="whole layers"):
        analytical.make_profile("llama-3-8b", "h100-80gb", 2, layer_split=[16.5, 15.5])


def _with_jitter(table: Path, rows) -> Path:
    pd.DataFrame(rows, columns=["tokens", "stage_0", "stage_1"]).to_csv(table / "jitter.csv", index=False)
    return table


def test_jitter_file_is_optional_and_round_trips(table, tmp_path):
    assert load_profile(table).jitter is None
    a = load_profile(_with_jitter(table, [(1, 1.10, 0.95), (40, 0.98, 1.02)]))
    assert a.jitter["tokens"].tolist() == [1, 40] and a.jitter["stage_0"].tolist() == [1.10, 0.98]
    b = load_profile(save_profile(a, tmp_path / "copy"))
    pd.testing.assert_frame_equal(a.jitter, b.jitter)
    # saving a table without jitter over one with it removes the stale file
    a.jitter = None
    assert load_profile(save_profile(a, tmp_path / "copy")).jitter is None


@pytest.mark.parametrize("rows, columns, needles", [
    ([(1, 1.0)], ["tokens", "stage_0"], ["jitter.csv", "stage_1", "pp=2"]),
    ([(1, 1.0, 0.0)], None, ["jitter.csv", "stage_1", "positive"]),
    ([(0, 1.0, 1.0)], None, ["jitter.csv", "tokens", ">= 1"]),
    ([(1, "fast", 1.0)], None, ["jitter.csv", "stage_0", "not a number"]),
    ([], None, ["jitter.csv", "no rows"]),
])
def test_bad_jitter_file_is_named(table, rows, columns, needles):
    pd.DataFrame(rows, columns=columns or ["tokens", "stage_0", "stage_1"]).to_csv(table / "jitter.csv", index=False)
    _raises(table, *needles)


@pytest.mark.parametrize("table", ["qwen2.5-14b_h100-80gb_pp8", "llama-32m_cpu-1thread_pp2"])
def test_stage_times_agree_bit_for_bit_with_stage_time(table):
    """The simulator times batches with `stage_times` (all stages in one call), tools with
    `stage_time`, the policies with `SlowestStage.predict`: a trace must not depend on which
    one ran, so they must agree exactly, on both sides of every knee, with and without
    prefill."""
    from profiles.latency_model import SlowestStage

    model = fit(table)[0]
    rng = np.random.default_rng(3)
    shapes = [(0, 1, 0, 17), (0, 0, 0, 0), (1, 0, 1, 1)]
    for _ in range(300):
        p = int(rng.choice([0, rng.integers(1, 4096)]))
        d = int(rng.integers(0, 512))
        shapes.append((p, d, p * int(rng.integers(p, 8 * p + 1)), d * int(rng.integers(1, 4096))))
    slowest = SlowestStage(model)
    for shape in shapes:
        each = [model.stage_time(s, *shape) for s in range(model.pp)]
        assert model.stage_times(*shape) == each, shape
        assert slowest.predict(*shape) == max(each)


def test_sched_overhead_per_item_is_optional_and_checked(tmp_path):
    """Tables before 2026-12-05 have no per-item term (0); a bad one is a named error; the
    in-situ table zeroes it (its stage-0 rows hold that work already)."""
    import shutil
    assert fit("llama-32m_cpu-1thread_pp2")[0].sched_overhead_per_item == 0.0
    src = Path(__file__).resolve().parents[1] / "profiles" / "tables" / "llama-32m_cpu-1thread_pp2"
    for value, ok in ((2.5e-6, True), (-1e-6, False), (True, False), ("1e-6", False)):
        dst = tmp_path / f"t{value!s}"
        shutil.copytree(src, dst)
        meta = yaml.safe_load((dst / "meta.yaml").read_text())
        meta["sched_overhead_per_item_s"] = value
        (dst / "meta.yaml").write_text(yaml.safe_dump(meta))
        if ok:
            assert fit(str(dst))[0].sched_overhead_per_item == value
        else:
            with pytest.raises(ProfileError, match="'sched_overhead_per_item_s' must be a non-negative number"):
                load_profile(str(dst))
