"""`pipetwin validate`: what it writes besides the runs: the error table, the plots
(timelines sim above real, latency CDFs, bubble bars) and report.md."""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from core.trace import Trace
from profiles.measure.options import cpu_name
from twin.validate.compare import ERROR_COLUMNS, RANKED_METRICS, RUNS_TO_SEPARATE, SEPARATION_ALPHA
from twin.validate.config import ValidationConfig, slug


def make_plots(folder: Path, traces: dict[tuple[str, str], tuple[Trace, Trace]],
               errors: pd.DataFrame) -> list[Path]:
    import matplotlib  # why: matplotlib loads only when a validation has finished
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from experiments.plots import plot_cdfs, plot_timeline, save  # why: matplotlib, as above

    paths: list[Path] = []
    for (label, rl), (sim, real) in traces.items():
        stem = f"{slug(label)}_r{rl}".replace(".", "p")   # plots.save() takes the last "." for a suffix
        end = float(np.nanmax(real.requests["finish"].to_numpy(float)))
        dur = min(max(end * 0.15, 0.2), 3.0)
        start = max(0.0, end * 0.4)
        paths += save(plot_timeline({"sim": sim, "real": real}, start, dur,
                                    title=f"{label} @ {rl} req/s: simulated (top) vs real (bottom)"),
                      folder / f"timeline_{stem}")
        paths += save(plot_cdfs({"sim": sim, "real": real}, title=f"{label} @ {rl} req/s: latency CDFs"),
                      folder / f"cdf_{stem}")
    fig = Figure(figsize=(1.5 + 1.4 * len(errors), 4.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(errors))
    ax.bar(x - 0.2, errors["sim_bubble"] * 100, 0.4, label="sim")
    ax.bar(x + 0.2, errors["real_bubble"] * 100, 0.4, label="real")
    ax.set_xticks(x, [f"{p}\n@{r}" for p, r in zip(errors["policy"], errors["load"])], fontsize=8)
    ax.set_ylabel("bubble ratio (%)")
    ax.set_title("Pipeline bubble ratio: simulated vs real, per policy and load (req/s)")
    ax.legend()
    paths += save(fig, folder / "bubble_sim_vs_real")
    return paths


def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:+.1f}"


def format_table(errors: pd.DataFrame) -> str:
    """Markdown table of the errors (signed %, bubble in points, E2E MAPE in %)."""
    head = ["policy", "load (req/s)", "thru %", "TTFT p50 %", "TTFT p99 %", "TPOT p50 %", "TPOT p99 %",
            "E2E p50 %", "bubble pts", "E2E MAPE %", "same reqs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in errors.itertuples():
        cells = [r.policy, r.load, *(_pct(getattr(r, c)) for c in ERROR_COLUMNS[:-2]),
                 _pct(r.bubble_diff_pts), "-" if not math.isfinite(r.e2e_mape_pct) else f"{r.e2e_mape_pct:.1f}",
                 "yes" if r.same_requests else "NO"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# goal column -> the column of the real runs' own spread in that quantity
REAL_SPREAD_OF = {"throughput_err_pct": "real_spread_output_tps_pct", "ttft_p50_err_pct": "real_spread_ttft_p50_pct",
                  "tpot_p50_err_pct": "real_spread_tpot_p50_pct", "bubble_diff_pts": "real_spread_bubble_pts"}


def goal_lines(errors: pd.DataFrame, ranking: pd.DataFrame, goals: dict[str, float]) -> list[str]:
    out = []
    for col, limit in goals.items():
        if col not in errors:
            continue
        v = errors[col].abs()
        worst = errors.loc[v.idxmax()] if v.notna().any() else None
        missed = v > limit
        miss = int(missed.sum())
        unit = "pts" if col.endswith("pts") else "%"
        if worst is None:
            out.append(f"- {col}: no data")
            continue
        line = (f"- |{col}| <= {limit:g} {unit}: {'met' if miss == 0 else f'MISSED in {miss}/{len(v)} cells'}; "
                f"worst {worst[col]:+.1f} {unit} ({worst['policy']} @ {worst['load']} req/s)")
        spread_col = REAL_SPREAD_OF.get(col)
        if miss and spread_col in errors and "repeats" in errors and (errors["repeats"] > 1).all():
            # a miss no larger than the hardware's own run-to-run spread is not model error alone
            inside = int((v[missed] <= errors.loc[missed, spread_col]).sum())
            line += f"; {inside} of the {miss} misses within the real runs' own spread of that cell"
        out.append(line)
    thru = ranking[ranking["metric"] == "output_tps"] if len(ranking) else ranking
    same = bool(thru["same"].all()) if len(thru) else True
    line = (f"- same throughput ranking as the hardware: {'met' if same else 'MISSED'} "
            f"({int(thru['same'].sum()) if len(thru) else 0}/{len(thru)} loads)")
    if not same and (thru["same_separated"] == thru["separated_pairs"]).all():
        # a strict order between policies the hardware does not separate is a coin toss
        line += "; the orders differ only in pairs the hardware does not separate"
    out.append(line)
    repeats = int(errors["repeats"].min()) if "repeats" in errors else 1
    for metric, (name, _) in RANKED_METRICS.items():
        rows = ranking[ranking["metric"] == metric] if len(ranking) else ranking
        pairs = int(rows["separated_pairs"].sum()) if len(rows) else 0
        agreed = int(rows["same_separated"].sum()) if len(rows) else 0
        line = (f"- pairs of policies the hardware separates by {name} (the ranges of their real runs do not "
                f"overlap, chance <= {SEPARATION_ALPHA:g} if the two were equal): the simulator orders "
                f"{agreed} of {pairs} the same way")
        if not pairs:
            line += " (no pair is apart beyond the hardware's own noise"
            if repeats < RUNS_TO_SEPARATE:
                line += (f"; with {repeats} real run{'s' if repeats > 1 else ''} per policy none can be: "
                         f"that takes {RUNS_TO_SEPARATE} or more")
            line += ")"
        out.append(line)
    return out


def spread_section(cfg: ValidationConfig, errors: pd.DataFrame) -> list[str]:
    """Report lines: how far each side's repeated runs spread (nothing without repeats)."""
    sides = [side for side, n in (("real", cfg.repeats), ("sim", cfg.sim_repeats)) if n > 1]
    if not sides:
        return []
    text = {"real": f"{cfg.repeats} times on the runtime (the same requests)",
            "sim": f"{cfg.sim_repeats} times in the simulator (the same requests, measured stage-time "
                   "jitter drawn with another seed each time)"}
    head = [f"{side} {m}" for side in sides for m in ("thru %", "TTFT p50 %", "TPOT p50 %", "bubble pts")]
    lines = ["## Spread over repeats", "",
             "Each cell ran " + " and ".join(text[s] for s in sides) + "; errors above are mean against "
             "mean. Spread = "
             "(max - min) / mean in %, bubble in points: differences of this size between simulator "
             "and runtime are within the runs' own noise.", "",
             "| policy | load | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for r in errors.itertuples():
        cells = [f"{getattr(r, f'{side}_spread_{m}'):.1f}" for side in sides
                 for m in ("output_tps_pct", "ttft_p50_pct", "tpot_p50_pct", "bubble_pts")]
        lines.append(f"| {r.policy} | {r.load} | " + " | ".join(cells) + " |")
    return lines + [""]


# A cell whose real stages ran this much slower than the table predicts (median stage time /
# table) is flagged: the table does not describe what the runtime ran (issue 14: on a GPU
# the real runtime ran 4-100x its table), so the twin's errors there say little about
# the scheduling.
STAGE_TABLE_LIMIT = 1.2


def slow_stage_lines(errors: pd.DataFrame, limit: float = STAGE_TABLE_LIMIT) -> list[str]:
    """The report's sentence on the cells whose real stage time / table exceeds `limit`."""
    slow = errors[errors["real_vs_table"] > limit]
    if slow.empty:
        return [f"Every cell's real stage time is within {limit:g}x of the table's prediction.", ""]
    cells = ", ".join(f"{r.policy} at {r.load} ({r.real_vs_table:.2f}x)" for r in slow.itertuples())
    return [f"**Real stages slower than the table (stage time / table > {limit:g}) in {len(slow)} of "
            f"{len(errors)} cells:** {cells}. There the table, not the scheduling model, is what "
            "the simulator gets wrong first: re-measure it (`pipetwin profile`) on this machine "
            "with the runtime's settings.", ""]


def write_report(out: Path, cfg: ValidationConfig, errors: pd.DataFrame, ranking: pd.DataFrame,
                 plots: list[Path], table: str, num_pages: int, wall_s: float, model: str,
                 profile: str | None = None, reuse_real: bool = False) -> Path:
    """report.md. One template, top to bottom as the report reads (its length is the report's)."""
    try:
        cpu = cpu_name()
    except Exception:  # noqa: BLE001 - the report still gets written
        cpu = platform.processor() or "?"
    lines = [f"# Twin validation: {cfg.name}", ""]
    if cfg.description:
        lines += [cfg.description.strip(), ""]
    lines += [
        f"- config: `{cfg.source or '(in memory)'}`; model `{model}`, pp={cfg.pp}, profile `{cfg.profile}`",
        f"- machine: {platform.node()} ({cpu}, {os.cpu_count()} cores), {platform.system()} "
        f"{platform.release()}; date {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"wall {wall_s:.0f} s",
        *([f"- simulator timed by the in-situ table `{profile}`: stage rows of runtime runs on other "
           f"requests (workload seed {cfg.calibrate['seed']}, loads {cfg.calibrate['loads']} req/s, every "
           f"policy) fitted with the latency model; base table `{cfg.profile}` (see profiles/in_situ.py)"]
          if cfg.calibrate is not None and profile is not None else []),
        *([f"- simulator re-run (`--reuse-real`) against the real runs recorded earlier in `{out}/runs`; "
           "wall time and load averages are the simulator's re-run"] if reuse_real else []),
        f"- KV pages: {num_pages} (the runtime's count, given to the simulator too), page size {cfg.page_size}",
        f"- workload: {len(errors) and int(errors['requests'].iloc[0])} requests, seed {cfg.seed}; "
        f"`{yaml.safe_dump(cfg.workload, default_flow_style=True).strip()}`; loads {cfg.loads} req/s",
        "",
        "## Errors (simulator vs runtime)",
        "",
        "Signed percent errors (sim - real) / real; throughput = output tokens/s; bubble = sim - real "
        "in percentage points; E2E MAPE = mean over requests of |sim - real| / real of the E2E latency.",
        "",
        table,
        "",
        "## Goals",
        "",
        *goal_lines(errors, ranking, cfg.goals),
        "",
        "## Ranking per load",
        "",
        "Policies best first (> : more throughput, or lower TTFT P50). "
        "Separated pairs: policy pairs whose real runs' ranges do not overlap, where that "
        f"happens by chance alone (two equal policies) at most {SEPARATION_ALPHA:g} of the time: "
        "2 / C(runs of both, runs of one), so 4 or more runs each; the others are ties on this hardware. "
        "Same: how many of them the simulator orders the same way; reversed: the others, with how far "
        "apart each side has them. Apart by chance: ranges apart, but with too few runs to tell from luck "
        "(with that chance).",
        "",
        "| by | load (req/s) | simulator | runtime | same | separated pairs: same / all | reversed "
        "| apart by chance |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {RANKED_METRICS[r.metric][0]} | {r.load} | {r.sim_order} | {r.real_order} | "
          f"{'yes' if r.same else 'NO'} | "
          f"{r.same_separated} / {r.separated_pairs} | {r.reversed_separated or '-'} | "
          f"{r.apart_by_chance or '-'} |"
          for r in ranking.itertuples()],
        "",
        "## Absolute values",
        "",
        "| policy | load | thru sim / real (tok/s) | TTFT p50 sim / real (ms) | TPOT p50 sim / real (ms) "
        "| bubble sim / real | real wall (s) |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r.policy} | {r.load} | {r.sim_output_tps:.0f} / {r.real_output_tps:.0f} | "
          f"{r.sim_ttft_p50 * 1e3:.0f} / {r.real_ttft_p50 * 1e3:.0f} | "
          f"{r.sim_tpot_p50 * 1e3:.1f} / {r.real_tpot_p50 * 1e3:.1f} | "
          f"{r.sim_bubble:.2f} / {r.real_bubble:.2f} | {r.real_wall_s:.1f} |" for r in errors.itertuples()],
        "",
        *spread_section(cfg, errors),
        "## Diagnostics",
        "",
        "Stage busy time summed over stages and batches (the same tokens on both sides, so its error is "
        "mostly the latency table's), median hop between stages (transfer + wait), batches and mean "
        "decodes per batch, and the 1-minute load average before / after the real run (other load on "
        "the machine shows here).",
        "",
        "Stage time / table: median over stage intervals of the duration over the latency model's "
        "prediction for that batch shape (attention features approximated); about 1 on the sim side "
        "(a few % above with stage jitter, which brings the fit to the measured median and draws a "
        "right-tailed ratio), so the real value against the sim's is how much slower or faster the "
        "runtime's stages ran than the table says.",
        "",
        *slow_stage_lines(errors),
        "| policy | load | busy sim / real (s) | busy err % | stage time / table sim, real "
        "| hop sim / real (ms) | batches sim / real | decodes/batch sim / real | loadavg |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {r.policy} | {r.load} | {r.sim_busy_s:.1f} / {r.real_busy_s:.1f} | {r.busy_err_pct:+.1f} | "
          f"{r.sim_vs_table:.2f}, {r.real_vs_table:.2f}"
          f"{' **> %g**' % STAGE_TABLE_LIMIT if r.real_vs_table > STAGE_TABLE_LIMIT else ''} | "
          f"{r.sim_hop_ms:.2f} / {r.real_hop_ms:.2f} | {r.sim_batches} / {r.real_batches} | "
          f"{r.sim_decodes_per_batch:.1f} / {r.real_decodes_per_batch:.1f} | "
          f"{r.loadavg_before:.2f} / {r.loadavg_after:.2f} |" for r in errors.itertuples()],
        "",
        "## Plots",
        "",
        *[f"![{p.stem}](plots/{p.name})" for p in plots if p.suffix == ".png"],
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
