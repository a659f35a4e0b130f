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
3. With --at-capacity: the same tail for each best variant at its own capacity, where a
   P99 SLO lets 1% of the requests wait as long as they may.
Prints markdown.
"""
from __future__ import annotations

import argparse
import copy
import functools
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


def capacities(folder: Path) -> pd.DataFrame:
    """The sweep's capacity.csv, with each series' profile and policy family."""
    cap = pd.read_csv(folder / "capacity.csv")
    cap["profile"] = cap["series"].map(profile_of)
    cap["family"] = cap["label"].map(family)
    return cap


def best_variants(cap: pd.DataFrame) -> pd.DataFrame:
    return (cap.sort_values(["capacity", "max_bubble_ratio"], ascending=[False, True])
            .groupby(["profile", "family"], sort=False).head(1))


TAIL_HEADER = ("| TTFT P50 s | P99 | P99.9 | max | over {slo:g} s | longest 5% of prompts: TTFT P99 s |",
               "| ---: | ---: | ---: | ---: | ---: | ---: |")


def ttft_tail(folder: Path, series: str, rate: float, slo_ttft: float) -> str:
    """One variant (a series of capacity.csv) re-simulated at `rate`: its TTFT tail as the
    cells of TAIL_HEADER. The config is the one the sweep ran (trace paths resolve from the
    repository root, where the sweep was run)."""
    runs = _runs(folder)
    config = copy.deepcopy(runs[series].config)
    config["workload"]["rate_scale"] = rate
    req = simulate(SimConfig.from_dict(config)).trace.requests
    ttft = (req["first_token"] - req["arrival"]).to_numpy()
    long = ttft[req["prompt_len"].to_numpy() >= np.quantile(req["prompt_len"], 0.95)]
    q = np.quantile(ttft, [0.5, 0.99, 0.999])
    return (f"| {q[0]:.2f} | {q[1]:.2f} | {q[2]:.2f} | {ttft.max():.2f} | {np.mean(ttft > slo_ttft):.1%} "
            f"| {np.quantile(long, 0.99):.2f} |")


@functools.lru_cache(maxsize=None)
def _runs(folder: Path) -> dict:
    """Each variant's resolved config, as the sweep expanded it (read once per folder)."""
    spec = parse_experiment(yaml.safe_load((folder / "sweep.yaml").read_text()))
    return {r.series: r for r in expand(spec)}


def equal_load(folder: Path, best: pd.DataFrame, slo_ttft: float) -> list[str]:
    """`best`: the rows (of capacity.csv) to re-simulate, with profile and family, each at
    Token Throttling's capacity on its profile."""
    head, rule = TAIL_HEADER
    lines = ["| profile | rate_scale (TT's capacity) | policy " + head.format(slo=slo_ttft),
             "| --- | ---: | --- " + rule]
    for profile, g in best.groupby("profile", sort=False):
        tt = g[g["family"] == "TT"]
        if tt.empty or not tt["capacity"].iloc[0] > 0:
            continue
        rate = float(tt["capacity"].iloc[0])
        for _, r in g.iterrows():
            lines.append(f"| {profile} | {rate:.3g} | {r['label']} " + ttft_tail(folder, r["series"], rate, slo_ttft))
    return lines


def at_capacity(folder: Path, best: pd.DataFrame, slo_ttft: float) -> list[str]:
    """Each row re-simulated at its own capacity: what the P99 SLO lets the last 1% wait
    there (a late queue or a shorter-first order spends that 1% on a few prompts)."""
    head, rule = TAIL_HEADER
    lines = ["| profile | policy | capacity (rate_scale) " + head.format(slo=slo_ttft), "| --- | --- | ---: " + rule]
    for _, r in best.iterrows():
        if r["capacity"] > 0:
            lines.append(f"| {r['profile']} | {r['label']} | {r['capacity']:.3g} "
                         + ttft_tail(folder, r["series"], float(r["capacity"]), slo_ttft))
    return lines


def report(folder: Path, simulate_equal_load: bool, every_variant_of: list[str], simulate_at_capacity: bool) -> str:
    cap = capacities(folder)
    best = best_variants(cap)
    slo_ttft = float(cap["slo.ttft_p99"].iloc[0])
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
        rows = pd.concat([best, cap[cap["family"].isin(every_variant_of) & ~cap["series"].isin(best["series"])]])
        lines += ["", "At equal load (Token Throttling's capacity), each policy's best variant"
                  + (f" and every variant of {', '.join(every_variant_of)}" if every_variant_of else "") + ":", ""]
        lines += equal_load(folder, rows, slo_ttft)
    if simulate_at_capacity:
        lines += ["", "At its own capacity, each policy's best variant:", ""]
        lines += at_capacity(folder, best, slo_ttft)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--no-equal-load", action="store_true", help="skip the re-simulation at equal load")
    ap.add_argument("--every-variant-of", action="append", default=[], metavar="FAMILY",
                    help="also re-simulate every variant of this policy family at equal load (repeatable)")
    ap.add_argument("--at-capacity", action="store_true",
                    help="also re-simulate each policy's best variant at its own capacity (its TTFT tail there)")
    args = ap.parse_args()
    for folder in args.folders:
        print(report(folder, not args.no_equal_load, args.every_variant_of, args.at_capacity))
        print()


if __name__ == "__main__":
    main()
