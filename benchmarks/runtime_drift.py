"""How steady is this machine? One cell of a validation config, run again and again on one
engine (then on a fresh one), each run's stage times set against a latency table.

`pipetwin validate` compares a simulator timed by calibration runs with real runs made
minutes later; if the machine's speed wanders, that wander is error the simulator cannot
remove. This prints, per run, the median over stage intervals of (measured / table) and
the same for the summed busy time. A trend on one engine that a fresh engine resets would
be the runtime aging; a wander that survives a fresh engine is the machine.

    flock /tmp/pipetwin-bench.lock .venv/bin/python benchmarks/runtime_drift.py \\
        --config experiments/twin_cpu.yaml --policy sarathi-256 --load 5.5 \\
        --table results/twin_cpu/calibration/profile --runs 12
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def stage_ratio(trace, model) -> tuple[float, float]:
    """(median of measured / predicted over stage intervals, summed measured / predicted)."""
    import numpy as np

    b = trace.batches
    pred = np.array([model.stage_time(int(r.stage), r.prefill_tokens, r.decode_tokens,
                                      r.prefill_attention_work, r.decode_context) for r in b.itertuples()])
    dur = (b["end"] - b["start"]).to_numpy(float)
    return float(np.median(dur / pred)), float(dur.sum() / pred.sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="experiments/twin_cpu.yaml", help="a `pipetwin validate` config")
    ap.add_argument("--policy", help="policy label in the config (default: the first)")
    ap.add_argument("--load", type=float, help="request rate (default: the config's first load)")
    ap.add_argument("--table", help="latency table to compare with (default: the config's profile)")
    ap.add_argument("--runs", type=int, default=12, help="runs on the first engine (then 3 on a fresh one)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")

    from twin.bench import Bench
    from twin.workload import workload_requests
    from twin.validate.config import load_validation
    from sim import fitted_model

    cfg = load_validation(args.config)
    pols = {p["label"]: p for p in cfg.policies}
    if args.policy is not None and args.policy not in pols:
        ap.error(f"--policy must be one of {sorted(pols)}, got {args.policy!r}")
    pol = pols[args.policy] if args.policy else cfg.policies[0]
    model = fitted_model(args.table or cfg.profile)[0]
    wl = cfg.workload_for(args.load if args.load is not None else cfg.loads[0])
    seed = wl.pop("seed")
    for engine, runs in ((0, args.runs), (1, 3)):
        with Bench(cfg.model, cfg.pp, pol["name"], pol["params"], num_pages=cfg.num_pages,
                   page_size=cfg.page_size, layer_split=cfg.layer_split, num_threads=cfg.threads,
                   seed=cfg.seed, device=cfg.device, dtype=cfg.dtype) as bench:
            for k in range(runs):
                trace = bench.run(workload_requests(wl, seed), pol["name"], pol["params"], seed=seed)
                med, busy = stage_ratio(trace, model)
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
                print(f"{time.strftime('%H:%M:%S')} engine {engine} run {k}: stage time / table median "
                      f"{med:.3f}, busy {busy:.3f}; load {load:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
