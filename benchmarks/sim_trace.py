"""Simulator speed and memory on a real trace, per policy, and how cost scales with requests.

    python benchmarks/sim_trace.py --trace ../shared/data/traces/azure_conv_2023.csv \
        [--profile qwen2.5-32b_a100-80gb_pp4] [--limits 5000 10000 0]

Each run is a fresh subprocess so its peak RSS (ru_maxrss) is its own; `--limits 0` is the
whole trace. Wall time covers everything `simulate` does: reading the trace, fitting the
profile, the simulation, building the trace tables and computing the metrics.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, time
from sim import SimConfig, simulate
policy, trace, profile, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
workload = {"trace": trace, **({"limit": limit} if limit else {})}
t0 = time.perf_counter()
res = simulate(SimConfig(profile=profile, policy=policy, workload=workload))
wall = time.perf_counter() - t0
s = res.summary
print(json.dumps({"policy": policy, "requests": s["requests"], "wall_s": wall,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "micro_batches": int(res.trace.batches["batch_id"].nunique()),
                  "output_tokens": int(len(res.trace.tokens)), "bubble_ratio": s["bubble_ratio"],
                  "throughput_rps": s["throughput_rps"], "ttft_p50": s["ttft_p50"], "tpot_p50": s["tpot_p50"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--profile", default="qwen2.5-32b_a100-80gb_pp4")
    ap.add_argument("--policies", nargs="+", default=["token_throttling", "sarathi", "vllm"])
    ap.add_argument("--limits", type=int, nargs="+", default=[0], help="requests per run; 0 = whole trace")
    args = ap.parse_args()
    print(f"{'policy':17} {'requests':>8} {'wall s':>7} {'peak MB':>8} {'batches':>8} {'out tokens':>10} "
          f"{'bubble':>7} {'req/s':>6} {'TTFT50 s':>8} {'TPOT50 ms':>9}")
    for policy in args.policies:
        for limit in args.limits:
            out = subprocess.run([sys.executable, "-c", CHILD, policy, args.trace, args.profile, str(limit)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['policy']:17} {r['requests']:>8} {r['wall_s']:>7.2f} {r['peak_mb']:>8.0f} "
                  f"{r['micro_batches']:>8} {r['output_tokens']:>10} {r['bubble_ratio']:>7.3f} "
                  f"{r['throughput_rps']:>6.2f} {r['ttft_p50']:>8.2f} {r['tpot_p50'] * 1e3:>9.1f}")


if __name__ == "__main__":
    main()
