"""`pipetwin validate`: one cell's error row (simulator against the runtime on the same
requests) and the per-load throughput ranking."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from core.metrics import request_latencies, summarize
from core.trace import Trace


# metric key -> summary key; the error is the signed relative error (sim - real) / real
REL_METRICS: dict[str, str] = {
    "throughput": "output_tps",
    "ttft_p50": "ttft_p50",
    "ttft_p99": "ttft_p99",
    "tpot_p50": "tpot_p50",
    "tpot_p99": "tpot_p99",
    "e2e_p50": "e2e_p50",
}


# every column of the error table
ERROR_COLUMNS = (*[f"{m}_err_pct" for m in REL_METRICS], "bubble_diff_pts", "e2e_mape_pct")


SPREAD_METRICS = ("output_tps", "ttft_p50", "tpot_p50")


def same_requests(sim: Trace, real: Trace) -> bool:
    """Both sides saw the same requests: ids, prompt/output lengths, arrival times."""
    cols = ["request_id", "prompt_len", "output_len", "arrival"]
    a = sim.requests[cols].sort_values("request_id").reset_index(drop=True)
    b = real.requests[cols].sort_values("request_id").reset_index(drop=True)
    if len(a) != len(b):
        return False
    return bool((a[cols[:3]].to_numpy() == b[cols[:3]].to_numpy()).all()
                and np.allclose(a["arrival"].to_numpy(float), b["arrival"].to_numpy(float), atol=1e-9))


def mean_summary(summaries: list[dict]) -> dict:
    """Numeric summary values averaged over repeated real runs (others from the first)."""
    out = dict(summaries[0])
    for k, v in out.items():
        vals = [s.get(k) for s in summaries]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in vals):
            out[k] = float(np.mean(vals))
    return out


def spread(summaries: list[dict], side: str) -> dict[str, float]:
    """How much repeated runs of one side disagree: (max - min) / mean in %, bubble in points."""
    row = {}
    for k in SPREAD_METRICS:
        vals = np.array([s[k] for s in summaries], dtype=float)
        row[f"{side}_spread_{k}_pct"] = 100.0 * float(np.ptp(vals) / np.mean(vals)) if np.mean(vals) else math.nan
    row[f"{side}_spread_bubble_pts"] = 100.0 * float(np.ptp([s["bubble_ratio"] for s in summaries]))
    return row


def compare(sim_summary: dict, real_summary: dict, sim: Trace, real: Trace) -> dict[str, float]:
    """The error row: signed % errors, bubble difference in points, request-level E2E MAPE."""
    row: dict[str, float] = {}
    for m, key in REL_METRICS.items():
        s, r = sim_summary.get(key), real_summary.get(key)
        ok = s is not None and r is not None and math.isfinite(s) and math.isfinite(r) and r != 0
        row[f"{m}_err_pct"] = 100.0 * (s - r) / r if ok else math.nan
    row["bubble_diff_pts"] = 100.0 * (sim_summary["bubble_ratio"] - real_summary["bubble_ratio"])
    ls = request_latencies(sim.requests).set_index("request_id")["e2e"]
    lr = request_latencies(real.requests).set_index("request_id")["e2e"]
    both = ls.index.intersection(lr.index)
    row["e2e_mape_pct"] = (100.0 * float(np.mean(np.abs(ls[both] - lr[both]) / lr[both]))
                           if len(both) else math.nan)
    return row


def stage_diagnostics(sim: Trace, real: Trace, latency: Any = None) -> dict[str, float]:
    """Where an error comes from: total stage busy time (the same requests, so the same
    tokens, on both sides: its error is the latency table's, batch mix aside), the median
    hop (next stage's start - this stage's end: transfer + waiting) and, given the fitted
    latency model, the median ratio of each stage interval to the model's prediction for
    its shape (`{side}_vs_table`: ~1 on the sim side; on the real side > 1 means the
    stages ran slower than the table measured them). Where a batches table lacks the
    attention features (the simulator's), they are approximated: a batch's prefill as one
    chunk from position 0, every decode at the mean context (mean prompt + half the mean
    output)."""
    row: dict[str, float] = {}
    req = real.requests
    ctx = float(req["prompt_len"].mean() + req["output_len"].mean() / 2)
    for side, t in (("sim", sim), ("real", real)):
        b = t.batches
        if latency is not None and len(b):
            if {"prefill_attention_work", "decode_context"} <= set(b.columns):  # runtime traces have them
                work, dctx = b["prefill_attention_work"], b["decode_context"]
            else:
                work, dctx = b["prefill_tokens"] ** 2, b["decode_tokens"] * ctx
            pred = latency.predict(b.assign(prefill_attention_work=work, decode_context=dctx))
            dur = (b["end"] - b["start"]).to_numpy(float)
            ok = pred > 0
            row[f"{side}_vs_table"] = float(np.median(dur[ok] / pred[ok])) if ok.any() else math.nan
        else:
            row[f"{side}_vs_table"] = math.nan
        row[f"{side}_busy_s"] = float((b["end"] - b["start"]).sum())
        row[f"{side}_batches"] = int(b["batch_id"].nunique())
        row[f"{side}_decodes_per_batch"] = float(b.loc[b["stage"] == 0, "decode_tokens"].mean())
        start = b.pivot_table(index="batch_id", columns="stage", values="start")
        end = b.pivot_table(index="batch_id", columns="stage", values="end")
        hops = [start[s + 1] - end[s] for s in range(int(b["stage"].max())) if s + 1 in start]
        row[f"{side}_hop_ms"] = float(pd.concat(hops).median() * 1e3) if hops else math.nan
    row["busy_err_pct"] = 100.0 * (row["sim_busy_s"] - row["real_busy_s"]) / row["real_busy_s"]
    return row


# A pair counts as separated by the hardware only when its real runs' ranges being apart is
# unlikely by chance alone. With two runs a policy, two equal policies' ranges miss each other
# one time in three (measured: the pp 2 twin's 3 req/s cell flipped between two runs of it).
SEPARATION_ALPHA = 0.05


def chance_apart(n_a: int, n_b: int) -> float:
    """How often n_a and n_b runs of two *equal* policies give ranges (of throughput, of TTFT)
    that do not overlap, either way round: 2 / C(n_a + n_b, n_a) (all orders of exchangeable
    runs equally likely; the exact level of the non-overlap test). 2 and 2 runs: 1/3; 3 and 3:
    0.1; 4 and 4: 0.029."""
    return min(1.0, 2.0 / math.comb(n_a + n_b, n_a))


# the fewest runs a policy for which a separation can count (4: 2/70 <= 0.05)
RUNS_TO_SEPARATE = next(n for n in range(1, 64) if chance_apart(n, n) <= SEPARATION_ALPHA)


# what the ranking orders policies by: metric -> (its name in the report, higher is better)
RANKED_METRICS: dict[str, tuple[str, bool]] = {"output_tps": ("throughput", True),
                                               "ttft_p50": ("TTFT P50", False)}


def ranking(rows: pd.DataFrame, metric: str = "output_tps") -> pd.DataFrame:
    """Per load: the policies best first by `metric` (a RANKED_METRICS key) on each side
    (`same`: identical orders), and the pairs the hardware itself separates -- the ranges of
    their repeated runs do not overlap, and that is unlikely by chance (`chance_apart` <=
    SEPARATION_ALPHA) -- with how many of those the simulator orders the same way. Pairs
    whose ranges are apart with too few runs to tell are listed in `apart_by_chance` with
    that chance; they and the overlapping pairs are ties the simulator cannot be held to.
    Gaps are the better policy's value over the worse one's (TTFT: negative, lower)."""
    higher = RANKED_METRICS[metric][1]
    real, sim, lo_col, hi_col = f"real_{metric}", f"sim_{metric}", f"real_{metric}_min", f"real_{metric}_max"
    out = []
    for rate, g in rows.groupby("load", sort=False):
        sim_order = list(g.sort_values(sim, ascending=not higher, kind="stable")["policy"])
        real_order = list(g.sort_values(real, ascending=not higher, kind="stable")["policy"])
        separated = agreed = 0
        reversed_pairs, too_few = [], []
        recs = g.to_dict("records")
        for i, a in enumerate(recs):
            for b in recs[i + 1:]:
                best, other = (a, b) if (a[real] >= b[real]) == higher else (b, a)
                apart = best[lo_col] > other[hi_col] if higher else best[hi_col] < other[lo_col]
                if not apart:
                    continue
                real_gap = 100 * (best[real] / other[real] - 1)
                sim_gap = 100 * (best[sim] / other[sim] - 1)
                pair = f"{best['policy']} > {other['policy']} (real {real_gap:+.1f}%, sim {sim_gap:+.1f}%"
                chance = chance_apart(int(best["repeats"]), int(other["repeats"]))
                if chance > SEPARATION_ALPHA:
                    too_few.append(f"{pair}, chance {chance:.2f})")
                    continue
                separated += 1
                if (best[sim] > other[sim]) if higher else (best[sim] < other[sim]):
                    agreed += 1
                else:   # how far apart, to tell a near-tie from a real miss
                    reversed_pairs.append(pair + ")")
        out.append({"metric": metric, "load": rate, "sim_order": " > ".join(sim_order),
                    "real_order": " > ".join(real_order), "same": sim_order == real_order,
                    "separated_pairs": separated, "same_separated": agreed,
                    "reversed_separated": "; ".join(reversed_pairs), "apart_by_chance": "; ".join(too_few)})
    return pd.DataFrame(out)


def rankings(rows: pd.DataFrame) -> pd.DataFrame:
    """`ranking` by every RANKED_METRICS metric, one table (ranking.csv)."""
    return pd.concat([ranking(rows, m) for m in RANKED_METRICS], ignore_index=True)


def cell_row(label: str, load: str, sims: list[Any], reals: list[Trace], latency: Any) -> dict[str, Any]:
    """One (policy, load) cell's row of errors.csv: the simulator's runs (SimResults) mean
    against the real runs' mean, each side's spread, absolute values and diagnostics."""
    sim_trace, sim_sum = sims[0].trace, mean_summary([r.summary for r in sims])
    real_sums = []
    for t in reals:
        t_sum = summarize(t)
        t_sum["wall_s"] = t.meta["wall_s"]
        real_sums.append(t_sum)
    real, real_sum = reals[0], mean_summary(real_sums)
    keys = ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "e2e_p50")
    return {"policy": label, "load": load, "requests": len(real.requests), "repeats": len(reals),
            "sim_repeats": len(sims), **spread(real_sums, "real"), **spread([r.summary for r in sims], "sim"),
            "same_requests": same_requests(sim_trace, real),
            **compare(sim_sum, real_sum, sim_trace, real),
            "sim_output_tps": sim_sum["output_tps"], "real_output_tps": real_sum["output_tps"],
            "sim_bubble": sim_sum["bubble_ratio"], "real_bubble": real_sum["bubble_ratio"],
            **{f"sim_{k}": sim_sum[k] for k in keys},
            **{f"real_{k}": real_sum[k] for k in keys},
            **{f"real_{k}_{f.__name__}": f(t[k] for t in real_sums)
               for k in RANKED_METRICS for f in (min, max)},
            "real_finished": real_sum["finished"], "sim_finished": sim_sum["finished"],
            "real_wall_s": real.meta["wall_s"], **stage_diagnostics(sim_trace, real, latency)}
