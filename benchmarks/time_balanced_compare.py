"""Issue 17's comparison table from a finished sweep (experiments/time_balanced_*.yaml).

    .venv/bin/python benchmarks/time_balanced_compare.py results/time_balanced_conv [...]

Per profile (the sweep's grid) and policy: the tuned variant (highest capacity of its equal
grid; ties: the lower max-throughput bubble), its capacity and what bound it, the gain over
tuned Token Throttling, the bubble ratio of its max-throughput run (every request at t=0:
saturation), and TTFT P99 of the tuned variants at equal load: at the sweep's own rate
(results.csv) and at the highest capacity probe that tuned TT and this policy both ran and
both met. Then time_balanced and Token Throttling variant by variant (same parameters).
Prints markdown.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

KEY = "workload.rate_scale"


def profile_of(series: str) -> str:
    m = re.search(r"profile=([^,\s)]+)", series)
    return m.group(1) if m else ""


def variant_of(series: str) -> str:
    return re.sub(r",?\s*profile=[^,\s)]+", "", series.split(" ", 1)[1] if " " in series else "").strip(" ,") or "defaults"


def table(folder: Path) -> str:
    cap = pd.read_csv(folder / "capacity.csv")
    runs = pd.read_csv(folder / "capacity_runs.csv")
    results = pd.read_csv(folder / "results.csv")
    cap["profile"] = cap["series"].map(profile_of)
    runs["profile"] = runs["series"].map(profile_of)
    lines = [f"### {folder.name}", "",
             "| profile | policy | tuned variant | capacity (rate_scale) | req/s | bound | vs tuned TT "
             "| bubble at saturation | TTFT P99 s at the trace's rate | TTFT P99 s at a common probe |",
             "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for profile, g in cap.groupby("profile", sort=False):
        best = (g.sort_values(["capacity", "max_bubble_ratio"], ascending=[False, True])
                .groupby("policy", sort=False).head(1).set_index("policy"))
        tt = best.loc["token_throttling"] if "token_throttling" in best.index else None
        order = [p for p in ("time_balanced", "token_throttling", "sarathi", "vllm") if p in best.index]
        for policy in order:
            r = best.loc[policy]
            gain = "" if tt is None or policy == "token_throttling" else f"{r['capacity'] / tt['capacity'] - 1:+.1%}"
            own = results[(results["series"] == r["series"])] if "series" in results else results.iloc[0:0]
            ttft_rate = f"{own['ttft_p99'].iloc[0]:.2f}" if len(own) else ""
            common = ""
            if tt is not None and policy != "token_throttling":
                a = runs[(runs["series"] == r["series"]) & runs["meets"]]
                b = runs[(runs["series"] == tt["series"]) & runs["meets"]]
                both = sorted(set(a[KEY]) & set(b[KEY]))
                if both:
                    x = both[-1]
                    common = (f"{x:g}: {a[a[KEY] == x]['ttft_p99'].iloc[0]:.2f} vs TT "
                              f"{b[b[KEY] == x]['ttft_p99'].iloc[0]:.2f}")
            lines.append(f"| {profile} | {policy} | {variant_of(r['series'])} | {r['capacity']:.3g} "
                         f"| {r['capacity_rps']:.2f} | {r['bound']} | {gain} | {r['max_bubble_ratio']:.3f} "
                         f"| {ttft_rate} | {common} |")
    lines += ["", "Same parameters, time_balanced vs Token Throttling (capacity; bubble ratio at saturation):", "",
              "| profile | variant | capacity TB | capacity TT | TB / TT | bubble TB | bubble TT |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for profile, g in cap.groupby("profile", sort=False):
        g = g.assign(variant=g["series"].map(variant_of))
        tb = g[g["policy"] == "time_balanced"].set_index("variant")
        tt = g[g["policy"] == "token_throttling"].set_index("variant")
        for v in tb.index.intersection(tt.index):
            a, b = tb.loc[v], tt.loc[v]
            ratio = f"{a['capacity'] / b['capacity'] - 1:+.1%}" if b["capacity"] > 0 else ""
            lines.append(f"| {profile} | {v} | {a['capacity']:.3g} | {b['capacity']:.3g} | {ratio} "
                         f"| {a['max_bubble_ratio']:.3f} | {b['max_bubble_ratio']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    for folder in ap.parse_args().folders:
        print(table(folder))
        print()


if __name__ == "__main__":
    main()
