"""`pipetwin profile` (profiles/measure/) on a tiny dummy model: the table it writes
loads, fits and drives the simulator; bad flags fail with the flag named. No timing
assertions (this machine may be shared)."""
from __future__ import annotations

import contextlib
import io
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from cli.main import main  # noqa: E402
from profiles import fit, load_profile  # noqa: E402
from profiles.measure.options import ProfileOptions, ProfilerError, default_table_name  # noqa: E402
from profiles.measure.profile_grid import GRIDS, grid_shapes  # noqa: E402
from profiles.measure.profiler import profile  # noqa: E402
from sim import SimConfig, simulate  # noqa: E402

TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
        "max_position_embeddings": 2048, "torch_dtype": "float32"}
MODEL = "dummy:" + json.dumps(TINY)
SMALL_WORKLOAD = {"num_requests": 12,
                  "arrival": {"kind": "gamma", "rate": 20.0},
                  "prompt_len": {"kind": "lognormal", "mean": 60, "spread": 0.5, "max": 200},
                  "output_len": {"kind": "lognormal", "mean": 12, "spread": 0.5, "max": 40}}


@pytest.fixture(scope="module")
def pp2_table(tmp_path_factory):
    """Through the CLI: pp=2 with an uneven split, the small grid, a few seconds."""
    out = tmp_path_factory.mktemp("prof") / "tiny_cpu_pp2"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["profile", "--model", MODEL, "--pp", "2", "--layer-split", "2,1", "--grid", "small",
                   "--time-budget", "6", "--repeats", "2", "--no-progress", "--out", str(out)])
    assert rc == 0
    return out, buf.getvalue()


def test_table_loads_and_is_measured(pp2_table):
    out, printed = pp2_table
    prof = load_profile(out)
    meta = prof.meta
    assert meta["source"] == "measured" and meta["pp"] == 2 and meta["layer_split"] == [2, 1]
    assert all(type(x) is int for x in meta["layer_split"]) and prof.stages["num_layers"].dtype == "int64"
    assert meta["model"]["config"]["hidden_size"] == 64 and meta["dtype"] == "float32"
    assert meta["device"].startswith("cpu:") and meta["torch_version"] == str(torch.__version__)
    assert meta["sched_overhead_s"] > 0 and meta["kv_pages_16"] > 0 and prof.kv_pages() > 0
    # the per-batch CPU work grows with the batch (the page lists, the scheduler's rows)
    assert meta["sched_overhead_per_item_s"] > 0
    assert fit(prof)[0].sched_overhead_per_item == meta["sched_overhead_per_item_s"]
    assert len(meta["weight_bytes_per_stage"]) == 2 and min(meta["weight_bytes_per_stage"]) > 0
    st = prof.stages
    assert set(st["stage"]) == {0, 1}
    last = st[st["stage"] == 1]
    assert len(last) >= 12 and (last["num_layers"] == 1).all()
    assert (st["latency_median"] > 0).all() and (st["samples"] == 2).all()
    # prefill-only, decode-only and mixed shapes are all there
    assert ((st["prefill_tokens"] > 0) & (st["decode_tokens"] == 0)).any()
    assert ((st["prefill_tokens"] == 0) & (st["decode_tokens"] > 0)).any()
    assert ((st["prefill_tokens"] > 0) & (st["decode_tokens"] > 0)).any()
    assert len(prof.transfer) > 0 and (prof.transfer["latency_median"] > 0).all()
    assert "held-out" in printed and "stage 1" in printed and str(out) in printed


def test_table_fits_and_simulates(pp2_table):
    out, _ = pp2_table
    model, err = fit(load_profile(out))
    assert model.pp == 2 and err.held_out and len(err.stage_mape) == 2
    assert model.stage_time(1, 64, 4, 64 * 64, 4 * 100) > 0
    res = simulate(SimConfig(profile=str(out), num_pages=512, workload=SMALL_WORKLOAD))
    assert res.summary["finished"] == SMALL_WORKLOAD["num_requests"]
    assert res.summary["unfinished"] == 0 and res.summary["rejected"] == 0


def test_pp1_api_has_no_transfer_rows(tmp_path):
    res = profile(ProfileOptions(model=MODEL, pp=1, grid="small", time_budget=1.0, repeats=1,
                                 visits=1, out=tmp_path / "t", progress=False))
    prof = load_profile(res.path)
    assert prof.pp == 1 and len(prof.transfer) == 0
    assert len(prof.stages) >= 12          # the minimum shapes are measured whatever the budget
    assert not isinstance(res.error, str)  # so the table can be fitted


def test_half_layer_split_table(tmp_path, monkeypatch):
    """--layer-split 1.5,1.5: rows say 1.5 layers; the KV per token counts the attentions a
    stage holds (stage 0: layers 0 and 1, stage 1: layer 2), not its split entry."""
    from profiles.measure import profiler
    # a stand-in for the two-process ping-pong, which has its own test above
    monkeypatch.setattr(profiler, "measure_transfers",
                        lambda opts: ([dict(bytes=1024, latency_median=1e-5, samples=1)], "stub"))
    res = profile(ProfileOptions(model=MODEL, pp=2, layer_split="1.5,1.5", grid="small", time_budget=1.0,
                                 repeats=1, visits=1, out=tmp_path / "t", progress=False))
    prof = load_profile(res.path)
    assert prof.meta["layer_split"] == [1.5, 1.5]
    assert set(prof.stages["num_layers"]) == {1.5}
    per_layer = 2 * TINY["num_key_value_heads"] * (TINY["hidden_size"] // TINY["num_attention_heads"]) * 4
    assert prof.meta["kv_bytes_per_token_per_stage"] == [2 * per_layer, per_layer]
    assert not isinstance(res.error, str)


def test_grid_shapes_are_valid_and_unique():
    for name in GRIDS:
        shapes = grid_shapes(name)
        assert len(set(shapes)) == len(shapes) > 12
        for s in shapes:
            p, d, paw, dc = s.features()
            assert p + d > 0 and paw >= p and dc >= d
        assert shapes[0].prefill_tokens == 0 and shapes[0].decodes == 1   # the floor first
    assert default_table_name("llama-32m", "cpu", 1, 2) == "llama-32m_cpu-1thread_pp2"


@pytest.mark.parametrize("flags,named", [
    (["--layer-split", "2,2"], "--layer-split"),       # sums to 4, the model has 3 layers
    (["--layer-split", "3"], "--layer-split"),         # one entry for pp=2
    (["--layer-split", "1.25,1.75"], "--layer-split"),  # not a multiple of 0.5
    (["--dtype", "float64"], "--dtype"),
    (["--time-budget", "0"], "--time-budget"),
    (["--repeats", "0"], "--repeats"),
    (["--pp", "5"], "--pp"),
    (["--grid", "huge"], "--grid"),
    (["--device", "tpu"], "--device"),
])
def test_bad_flags_exit_2_naming_the_flag(flags, named, tmp_path, capsys):
    argv = ["profile", "--model", MODEL, "--pp", "2", "--out", str(tmp_path / "t"), "--no-progress"]
    with pytest.raises(SystemExit) as e:
        main(argv + flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and named in err and "Traceback" not in err
    assert not (tmp_path / "t").exists()


def test_bad_model_and_existing_out(tmp_path):
    with pytest.raises(ProfilerError, match="--model"):
        ProfileOptions(model="dummy:no-such-preset", out=tmp_path / "a").validate()
    with pytest.raises(ProfilerError, match="--model"):
        ProfileOptions(model=str(tmp_path), out=tmp_path / "a").validate()    # no config.json
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "meta.yaml").write_text("x: 1\n")
    with pytest.raises(ProfilerError, match="--force"):
        ProfileOptions(model=MODEL, out=tmp_path / "b").validate()
