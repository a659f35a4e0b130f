"""Issue 17: what the waiting order (time_balanced's `defer_per_1k_tokens`) buys, and whom
it costs, from a finished sweep (experiments/queue_order_code*.yaml).

    .venv/bin/python benchmarks/queue_order_compare.py results/queue_order_code [...]

1. Capacity: per profile and policy family (the label without its grid values), the
   best variant of its equal grid, what bound it, and its gain over the best Token
   Throttling variant.
2. At equal load: every family's best variant re-simulated at Token Throttling's
   capacity. P99 TTFT hides a starved 1%, so this also gives the P99.9 and the worst
   TTFT, the share of requests over the TTFT SLO, and the P99 TTFT of the longest 5% of
   prompts (those a shorter-first order makes wait).
Prints markdown.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.config import parse_experiment  # noqa: E402
from experiments.expand import expand  # noqa: E402
from sim.config import SimConfig  # noqa: E402
from sim.run import simulate  # noqa: E402

KEY = "workload.rate_scale"


def family(label: str) -> str:
    """'TT + order defer_per_1k_tokens=0.1' -> 'TT + order'."""
    head, _, last = label.rpartition(" ")
    return head if head and "=" in last else label


def profile_of(series: str) -> str:
    m = re.search(r"profile=([^,\s)]+)", series)
    return m.group(1) if m else ""


def best_variants(folder: Path) -> pd.DataFrame:
    cap = pd.read_csv(folder / "capacity.csv")
    cap["profile"] = cap["series"].map(profile_of)
    cap["family"] = cap["label"].map(family)
    return (cap.sort_values(["capacity", "max_bubble_ratio"], ascending=[False, True])
            .groupby(["profile", "family"], sort=False).head(1))


def equal_load(folder: Path, best: pd.DataFrame, slo_ttft: float) -> list[str]:
    """`best`: the rows (of capacity.csv) to re-simulate, with profile and family."""
    # Each variant's resolved config, as the sweep ran it (trace paths resolve from the
    # repository root, where the sweep was run).
    runs = {r.series: r for r in expand(parse_experiment(yaml.safe_load((folder / "sweep.yaml").read_text())))}
    lines = ["| profile | rate_scale (TT's capacity) | policy | TTFT P50 s | P99 | P99.9 | max "
             f"| over {slo_ttft:g} s | longest 5% of prompts: TTFT P99 s |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for profile, g in best.groupby("profile", sort=False):
        tt = g[g["family"] == "TT"]
        if tt.empty or not tt["capacity"].iloc[0] > 0:
            continue
        rate = float(tt["capacity"].iloc[0])
        for _, r in g.iterrows():
            config = copy.deepcopy(runs[r["series"]].config)
            config["workload"]["rate_scale"] = rate
            cfg = SimConfig.from_dict(config)
            req = simulate(cfg).trace.requests
            ttft = (req["first_token"] - req["arrival"]).to_numpy()
            long = ttft[req["prompt_len"].to_numpy() >= np.quantile(req["prompt_len"], 0.95)]
            q = np.quantile(ttft, [0.5, 0.99, 0.999])
            lines.append(f"| {profile} | {rate:.3g} | {r['label']} | {q[0]:.2f} | {q[1]:.2f} | {q[2]:.2f} "
                         f"| {ttft.max():.2f} | {np.mean(ttft > slo_ttft):.1%} | {np.quantile(long, 0.99):.2f} |")
    return lines


def report(folder: Path, simulate_equal_load: bool, every_variant_of: list[str]) -> str:
    best = best_variants(folder)
    lines = [f"### {folder.name}", "",
             "| profile | policy | best variant | capacity (rate_scale) | req/s | bound | vs TT |",
             "| --- | --- | --- | ---: | ---: | --- | ---: |"]
    for profile, g in best.groupby("profile", sort=False):
        tt = g[g["family"] == "TT"]["capacity"]
        for _, r in g.iterrows():
            gain = "" if tt.empty or r["family"] == "TT" or not tt.iloc[0] > 0 \
                else f"{r['capacity'] / tt.iloc[0] - 1:+.1%}"
            lines.append(f"| {profile} | {r['family']} | {r['label'][len(r['family']):].strip()} "
                         f"| {r['capacity']:.3g} | {r['capacity_rps']:.2f} | {r['bound']} | {gain} |")
    if simulate_equal_load:
        cap = pd.read_csv(folder / "capacity.csv")
        cap["profile"] = cap["series"].map(profile_of)
        cap["family"] = cap["label"].map(family)
        rows = pd.concat([best, cap[cap["family"].isin(every_variant_of) & ~cap["series"].isin(best["series"])]])
        lines += ["", "At equal load (Token Throttling's capacity), each policy's best variant"
                  + (f" and every variant of {', '.join(every_variant_of)}" if every_variant_of else "") + ":", ""]
        lines += equal_load(folder, rows, float(cap["slo.ttft_p99"].iloc[0]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--no-equal-load", action="store_true", help="skip the re-simulation at equal load")
    ap.add_argument("--every-variant-of", action="append", default=[], metavar="FAMILY",
                    help="also re-simulate every variant of this policy family at equal load (repeatable)")
    args = ap.parse_args()
    for folder in args.folders:
        print(report(folder, not args.no_equal_load, args.every_variant_of))
        print()


if __name__ == "__main__":
    main()
