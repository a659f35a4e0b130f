"""OUT/report.md and OUT/plots/ from a sweep's results folder (also `pipetwin plot`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.policies import policy_class, policy_params
from core.trace import Trace
from experiments import plots
from experiments.config_keys import as_float, fmt_value
from experiments.expand import timeline_rate
from experiments.spec import Experiment


def _read(path_stem: Path) -> pd.DataFrame | None:
    csv = path_stem.with_suffix(".csv")
    return pd.read_csv(csv) if csv.is_file() else None


def _f(v: Any, digits: int = 2, scale: float = 1.0) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v * scale:.{digits}f}"


def _pct(new: float, old: float) -> str:
    if not (old and math.isfinite(old) and math.isfinite(new)):
        return "n/a"
    return f"{(new / old - 1) * 100:+.0f}%"


def load_traces(out: Path, df: pd.DataFrame, exp: Experiment) -> dict[str, Any]:
    """label -> Trace of the first kept run per label at the timeline rate."""
    rate = timeline_rate(exp)
    d = df[df["trace"].fillna("").astype(str) != ""]
    if exp.report.x is not None and rate is not None:
        d = d[pd.to_numeric(d[exp.report.x], errors="coerce") == as_float(rate)]
    traces = {}
    for label, g in d.groupby("label", sort=False):
        folder = out / str(g["trace"].iloc[0])
        if (folder / "meta.json").is_file():
            traces[str(label)] = Trace.load(folder)
    return traces


def make_plots(out: Path, exp: Experiment, df: pd.DataFrame, cap: pd.DataFrame | None,
               plot_dir: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """Writes the plots the config asks for; returns [(caption, png path)] and notes on skips."""
    made: list[tuple[str, Path]] = []
    notes: list[str] = []
    x = exp.report.x
    wanted = exp.report.plots

    def emit(fig: Any, stem: str, caption: str) -> None:
        paths = plots.save(fig, plot_dir / stem)
        made.append((caption, paths[0]))

    if x is not None:
        if "bubble" in wanted:
            emit(plots.plot_bubble(df, x), "bubble_vs_rate", "Bubble ratio vs load")
        if "latency" in wanted:
            emit(plots.plot_latency(df, x), "throughput_latency", "Throughput vs latency (P50, P99)")
    elif {"bubble", "latency"} & set(wanted):
        notes.append("bubble/latency plots need a swept rate key (report.x)")

    traces = load_traces(out, df, exp) if {"timeline", "kv_queue", "cdf"} & set(wanted) else {}
    rate = timeline_rate(exp)
    at = f" at {fmt_value(rate)} {'req/s' if x == 'workload.arrival.rate' else ''}".rstrip() if rate is not None else ""
    window = None
    if traces:
        start = exp.report.timeline_start
        if start is None:  # the middle of the arrivals: the pipeline is in steady state there
            start = round(min(float(t.requests["arrival"].max()) for t in traces.values()) / 2, 1)
        window = (start, start + exp.report.timeline_duration)
        if "timeline" in wanted:
            emit(plots.plot_timeline(traces, window[0], exp.report.timeline_duration,
                                     title=f"Per-stage timeline{at}, {window[0]:g}-{window[1]:g} s"),
                 "timeline", f"Per-stage timeline{at} (gaps are bubbles)")
        if "kv_queue" in wanted:
            emit(plots.plot_kv_queue(traces, title=f"KV cache and waiting queue{at}", window=window),
                 "kv_queue", f"KV utilization and queue length{at}")
        if "cdf" in wanted:
            emit(plots.plot_cdfs(traces, title=f"Latency CDFs{at}"), "latency_cdf", f"Latency CDFs{at}")
    elif {"timeline", "kv_queue", "cdf"} & set(wanted):
        notes.append("timeline/KV/CDF plots skipped: no kept traces (set report.timeline.rate to a swept rate)")

    if "heatmap" in wanted:
        for spec in exp.policies:
            if len(spec.grid) < 2:
                continue
            px, py = (f"policy_params.{k}" for k in list(spec.grid)[:2])
            labels = [lab for lab, _ in spec.variants()]
            sub = df[df["label"].isin(labels)]
            hrate = exp.report.heatmap_rate
            if x is not None and len(sub):
                xs = pd.to_numeric(sub[x], errors="coerce")
                if hrate is None:
                    finite = xs[np.isfinite(xs)]
                    hrate = finite.max() if len(finite) else None
                if hrate is not None:
                    sub = sub[xs == as_float(hrate)]
            metric = exp.report.heatmap_metric
            unit = " req/s" if x == "workload.arrival.rate" else ""
            where = f" at {fmt_value(hrate)}{unit}" if hrate is not None else ""
            stem = f"heatmap_{spec.label}_{metric}".replace(" ", "_").replace("/", "_")
            emit(plots.plot_heatmap(sub, px, py, metric, f"{spec.label}: {metric.replace('_', ' ')}{where}"), stem,
                 f"{spec.label}: {metric}{where} over {px.split('.')[-1]} x {py.split('.')[-1]}")
            if cap is not None and "max_throughput_rps" in cap:
                params = {lab: p for lab, p in spec.variants()}
                c = cap[cap["label"].isin(labels)].copy()
                for k in (px, py):
                    c[k] = [params[lab][k.split(".", 1)[1]] for lab in c["label"]]
                emit(plots.plot_heatmap(c, px, py, "max_throughput_rps", f"{spec.label}: max throughput"),
                     f"heatmap_{spec.label}_max_throughput".replace(" ", "_"),
                     f"{spec.label}: max throughput over {px.split('.')[-1]} x {py.split('.')[-1]}")
    return made, notes


def _default_variant(d: pd.DataFrame, policy: str) -> str:
    """The label whose given parameters all equal the policy's defaults, else the first."""
    labels = list(dict.fromkeys(d["label"]))
    defaults = policy_params(policy_class(policy))
    cols = [c for c in d.columns if c.startswith("policy_params.")]
    for lab in labels:
        row = d[d["label"] == lab].iloc[0]
        if all(row[c] == defaults.get(c.split(".", 1)[1]) for c in cols if pd.notna(row[c])):
            return lab
    return labels[0]


def comparison(df: pd.DataFrame, cap: pd.DataFrame | None, x: str | None) -> str:
    """One paragraph: does Token Throttling lower the bubble ratio and raise capacity over Sarathi?"""
    tt = df[df["policy"] == "token_throttling"]
    sa = df[df["policy"] == "sarathi"]
    if tt.empty or sa.empty:
        return "No comparison: the sweep needs both a token_throttling and a sarathi policy."
    lt, ls = _default_variant(tt, "token_throttling"), _default_variant(sa, "sarathi")
    tt, sa = tt[tt["label"] == lt], sa[sa["label"] == ls]
    parts = []
    if x is not None:
        a = tt.groupby(x)["bubble_ratio"].mean()
        b = sa.groupby(x)["bubble_ratio"].mean()
        common = a.index.intersection(b.index)
        if len(common):
            a, b = a[common], b[common]
            lower = int((a < b).sum())
            diff = (a - b).to_numpy()
            verb = "lowers" if a.mean() < b.mean() else "does not lower"
            parts.append(
                f"{lt} {verb} the bubble ratio relative to {ls}: mean {a.mean():.3f} vs {b.mean():.3f} "
                f"({_pct(a.mean(), b.mean())}) over the {len(common)} loads both ran, lower at {lower} of them "
                f"(difference per load from {diff.min():+.3f} to {diff.max():+.3f}).")
            for metric, name in (("ttft_p50", "P50 TTFT"), ("tpot_p99", "P99 TPOT")):
                ta = tt.groupby(x)[metric].mean()[common]
                tb = sa.groupby(x)[metric].mean()[common]
                lo_ = int((ta < tb).sum())
                ratio = float(np.nanmedian(ta.to_numpy() / tb.to_numpy()))
                parts.append(f"Its {name} is lower at {lo_} of {len(common)} loads (median ratio {ratio:.2f}x).")
    if cap is not None and len(cap):
        ct, cs = cap[cap["label"] == lt], cap[cap["label"] == ls]
        if len(ct) and len(cs) and "max_throughput_rps" in cap and cap["capacity"].isna().all():
            ct, cs = ct.iloc[0], cs.iloc[0]
            parts.append(f"Max throughput (all requests at t=0): {ct['max_throughput_rps']:.2f} vs "
                         f"{cs['max_throughput_rps']:.2f} req/s ({_pct(ct['max_throughput_rps'], cs['max_throughput_rps'])}).")
        elif len(ct) and len(cs):
            ct, cs = ct.iloc[0], cs.iloc[0]
            slo = ", ".join(f"{k.split('.', 1)[1]} <= {v:g} s" for k, v in ct.items()
                            if str(k).startswith("slo.") and pd.notna(v))

            def cap_s(r: Any) -> str:
                b = r.get("bound")
                b = "" if (b is None or (isinstance(b, float) and math.isnan(b))) else str(b)
                pre = ">= " if b == "search range (hi)" else "< " if b.startswith("below lo") else ""
                v = r["lo"] if b.startswith("below lo") else r["capacity"]
                return f"{pre}{v:g}"
            unit = " req/s" if ct["key"] == "workload.arrival.rate" else f" ({ct['key']})"
            verb = "raises" if ct["capacity"] > cs["capacity"] else ("matches" if ct["capacity"] == cs["capacity"]
                                                                     else "lowers")
            parts.append(f"Under the SLO ({slo}) it {verb} capacity: {cap_s(ct)} vs {cap_s(cs)}{unit} "
                         f"({_pct(ct['capacity'], cs['capacity'])}, search tolerance {ct['tol']:g}).")
            if "max_throughput_rps" in cap:
                parts.append(f"Max throughput (all requests at t=0): {ct['max_throughput_rps']:.2f} vs "
                             f"{cs['max_throughput_rps']:.2f} req/s ({_pct(ct['max_throughput_rps'], cs['max_throughput_rps'])}).")
            others = cap[~cap["label"].isin([lt, ls])].drop_duplicates("label")
            if len(others):
                parts.append("Others: " + "; ".join(f"{r['label']} capacity {cap_s(r)}" +
                                                    (f", max throughput {r['max_throughput_rps']:.2f} req/s"
                                                     if "max_throughput_rps" in cap else "")
                                                    for _, r in others.iterrows()) + ".")
    return " ".join(parts) if parts else "No comparison: no common loads and no capacity results."


def summary_table(df: pd.DataFrame, x: str | None) -> str:
    xh = "rate" if x is None else {"workload.arrival.rate": "rate (req/s)"}.get(x, x)
    head = ["policy", xh, "throughput (req/s)", "output (tok/s)", "TTFT P50 (s)", "TTFT P99 (s)",
            "TPOT P50 (ms)", "TPOT P99 (ms)", "bubble ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    d = df.copy()
    if x is not None:
        d["_x"] = pd.to_numeric(d[x], errors="coerce")
        d = d.sort_values(["_x"], kind="stable")
        d = pd.concat([g for _, g in d.groupby("series", sort=False)])
    for _, r in d.iterrows():
        lines.append("| " + " | ".join([
            str(r["series"]), fmt_value(r[x]) if x is not None else "-", _f(r["throughput_rps"]),
            _f(r["output_tps"], 0), _f(r["ttft_p50"]), _f(r["ttft_p99"]), _f(r["tpot_p50"], 0, 1e3),
            _f(r["tpot_p99"], 0, 1e3), _f(r["bubble_ratio"], 3)]) + " |")
    return "\n".join(lines)


def tolerance(c: Any) -> str:
    """A CapacitySpec's stopping rule in words: '0.05', '0.01 x the rate', or both."""
    parts = ([f"{c.tol:g}"] if c.tol else []) + ([f"{c.rel_tol:.3g} x the rate"] if c.rel_tol else [])
    return " or ".join(parts) + (", whichever is larger" if len(parts) > 1 else "")


def capacity_table(cap: pd.DataFrame, exp: Experiment) -> str:
    c = exp.capacity
    unit = "req/s" if c.key == "workload.arrival.rate" else f"{c.key}"
    head = ["policy", f"capacity ({unit})", "offered at capacity (req/s)", "probes"]
    mt = "max_throughput_rps" in cap
    if mt:
        head += ["max throughput (req/s)", "max output (tok/s)", "bubble at max"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in cap.iterrows():
        bound = r.get("bound")
        bound = "" if not isinstance(bound, str) or not bound else f" (bound: {bound})"
        row = [str(r["series"]), "-" if pd.isna(r["capacity"]) else f"{r['capacity']:g}{bound}",
               _f(r["capacity_rps"]), str(int(r["probes"]))]
        if mt:
            row += [_f(r["max_throughput_rps"]), _f(r["max_output_tps"], 0), _f(r["max_bubble_ratio"], 3)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def make_report(out: str | Path, exp: Experiment, plot_dir: str | Path | None = None) -> Path:
    """Regenerate OUT/plots/* and OUT/report.md from OUT/results.csv (+ capacity.csv, runs/)."""
    out = Path(out)
    df = _read(out / "results")
    if df is None:
        raise FileNotFoundError(f"{out}: no results.csv (run `pipetwin sweep` first)")
    cap = _read(out / "capacity")
    plot_dir = Path(plot_dir) if plot_dir is not None else out / "plots"
    made, notes = make_plots(out, exp, df, cap, plot_dir)

    base = exp.base
    w = base.get("workload", {})
    lines = [f"# {exp.name}", ""]
    if exp.description:
        lines += [exp.description.strip(), ""]
    lines += [f"- profile: `{base.get('profile', 'qwen2.5-32b_a100-80gb_pp4')}`",
              f"- workload: `{_short(w) if w else 'default (Azure-conversation-shaped synthetic)'}`",
              f"- runs: {len(df)} ({', '.join(dict.fromkeys(df['label']))} x "
              f"{', '.join(exp.swept) or 'no swept keys'})",
              f"- config: `{exp.source or 'sweep.yaml'}`; tables: `results.csv`"
              + (", `capacity.csv`, `capacity_runs.csv`" if cap is not None else "")]
    meta_path = out / "sweep_meta.json"
    if meta_path.is_file():
        import json
        m = json.loads(meta_path.read_text())
        lines.append(f"- code version `{m['code_version']}`; {m['computed']} simulations run, {m['cached']} "
                     f"from cache, {m['wall_s']:.1f} s on {m['workers']} worker(s)")
    lines.append("")
    lines += ["## Comparison", "", comparison(df, cap, exp.report.x), ""]
    lines += ["## Summary per policy and load", "", summary_table(df, exp.report.x), ""]
    if cap is not None and exp.capacity is not None:
        c = exp.capacity
        slo = ", ".join(f"{k} <= {v:g} s" for k, v in c.slo.items())
        how = (f"Capacity: the highest `{c.key}` whose run meets every SLO ({slo}; no request "
               f"rejected or unfinished) and is sustainable (over the second half of its arrivals its queue "
               f"grows by at most {c.sustain:.0%} of the arrival rate){', at an offered rate no higher than the max throughput' if c.max_throughput else ''}, "
               f"by bisection over [{c.lo:g}, {c.hi:g}] to within {tolerance(c)}. The column says which "
               "condition bound each search. " if c.slo else "No SLO given: no capacity search. ")
        lines += ["## Capacity", "", how + "Max throughput: every request arrives at t=0.",
                  "", capacity_table(cap, exp), ""]
    lines += ["## Plots", ""]
    for caption, path in made:
        rel = path.relative_to(out) if path.is_relative_to(out) else path
        lines += [f"### {caption}", "", f"![{caption}]({rel.as_posix()})", ""]
    for n in notes:
        lines += [f"- {n}"]
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def _short(w: dict) -> str:
    import json
    return json.dumps(w, separators=(", ", ": "))
