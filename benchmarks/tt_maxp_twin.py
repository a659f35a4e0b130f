"""Tune Token Throttling's `maxp` in the simulator, then check the choice on the runtime.

The workload is benchmarks/runtime_cpu.py's (b): 64 Azure-conversation-shaped requests,
all present at t = 0 (saturation), pp = 2, the 32M random Llama on CPU. For each `maxp`
(most prefill tokens in one micro-batch) the simulator, timed by a latency table, predicts
output tok/s and the bubble ratio over the saturated part of the run; with `--real` the
real pipeline runs the same requests with the same policy parameters (engine started
once, runs alternate between settings so each sees the same machine). The micro-batch
counts of the two sides must agree: the same core scheduler makes every decision.

    .venv/bin/python benchmarks/tt_maxp_twin.py                 # simulator only, seconds
    flock /tmp/pipetwin-bench.lock .venv/bin/python benchmarks/tt_maxp_twin.py --real --repeats 2
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import runtime_cpu  # noqa: E402  (this folder: the model, the workload, the saturated bubble)


def predict(reqs: list[tuple[list[int], int]], maxp: int, profile: str, num_pages: int) -> dict:
    from core.request import Request
    from sim import SimConfig, simulate

    fresh = [Request(id=i, prompt_len=len(p), max_output=o) for i, (p, o) in enumerate(reqs)]
    cfg = SimConfig(profile=profile, policy="token_throttling", policy_params={"maxp": maxp}, pp=2,
                    num_pages=num_pages, page_size=16, driver_on_stage0=True)
    res = simulate(cfg, requests=fresh)
    return {"output_tps": res.summary["output_tps"], "bubble_ratio": res.summary["bubble_ratio"],
            "bubble_ratio_saturated": runtime_cpu.saturated_bubble_ratio(res.trace, 2),
            "micro_batches": int(res.trace.batches["batch_id"].nunique())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--maxp", default="256,512,1024,2048", help="comma list of maxp values")
    ap.add_argument("--profile", default="llama-32m_cpu-1thread_pp2", help="latency table the simulator uses")
    ap.add_argument("--real", action="store_true", help="also run the real pipeline (minutes)")
    ap.add_argument("--repeats", type=int, default=1, help="real runs per maxp (best and all are kept)")
    ap.add_argument("--num-pages", type=int, default=4096)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    try:
        values = [int(x) for x in args.maxp.split(",")]
    except ValueError:
        ap.error(f"--maxp: expected a comma list of integers, got {args.maxp!r}")
    reqs = runtime_cpu.workloads(False)["varied"]
    rows = {m: {"maxp": m, "sim": predict(reqs, m, args.profile, args.num_pages), "real": []} for m in values}
    if args.real:
        with tempfile.TemporaryDirectory(prefix="pipetwin-bench-") as tmp:
            model = runtime_cpu.make_model(Path(tmp))
            engine = runtime_cpu.EngineRunner(model, 2, "token_throttling", None, args.num_pages, None)
            try:
                for _ in range(args.repeats):
                    for m in values:   # alternate settings: each sees the same machine state
                        engine.set_policy_params({"maxp": m})
                        rows[m]["real"].append(engine.run(reqs))
            finally:
                engine.close()
    print(f"{'maxp':>5} | {'sim tok/s':>9} {'sim bubble (sat.)':>17} {'batches':>7} | "
          f"{'real tok/s':>10} {'real bubble (sat.)':>18} {'batches':>7}")
    for m, r in rows.items():
        s = r["sim"]
        line = (f"{m:>5} | {s['output_tps']:>9.1f} {s['bubble_ratio']:>8.1%} ({s['bubble_ratio_saturated']:.1%}) "
                f"{s['micro_batches']:>7} |")
        for x in r["real"]:
            line += (f" {x['output_tps']:>10.1f} {x['bubble_ratio']:>9.1%} ({x['bubble_ratio_saturated']:.1%}) "
                     f"{x['micro_batches']:>7}")
        print(line)
    print(f"simulator: table {args.profile}; real: pp=2 gloo, one thread per stage, Token Throttling "
          "with only maxp changed")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(list(rows.values()), indent=2, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
