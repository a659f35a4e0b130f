"""Plots of a sweep: each function returns a matplotlib Figure; `save` writes PNG and SVG.

Figures are built with matplotlib's object API (Agg canvas, no pyplot state), so they are
safe to make in any process or thread, and tests can inspect axes, labels and lines.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import matplotlib

matplotlib.use("Agg", force=False)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import rc_context  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from core.metrics import request_latencies  # noqa: E402

STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9.5,
         "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.grid": True, "grid.alpha": 0.3,
         "lines.linewidth": 1.8, "lines.markersize": 6, "svg.fonttype": "none",
         "axes.spines.top": False, "axes.spines.right": False}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")
X_LABELS = {"workload.arrival.rate": "request rate (req/s)",
            "workload.rate_scale": "rate scale (x the trace's rate)",
            "workload.time_scale": "time scale (x the trace's gaps)",
            "offered_rps": "offered load (req/s)"}
METRIC_LABELS = {"bubble_ratio": "bubble ratio (idle share of stage time)",
                 "throughput_rps": "throughput (req/s)", "output_tps": "output throughput (tok/s)",
                 "total_tps": "total throughput (tok/s)", "goodput_rps": "goodput (req/s)",
                 "max_throughput_rps": "max throughput (req/s)", "kv_util_mean": "mean KV utilization",
                 "ttft_p99": "P99 TTFT (s)", "tpot_p99": "P99 TPOT (s)"}


def _styled(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with rc_context(STYLE):
            return fn(*args, **kwargs)
    return wrapper


def _style(i: int) -> dict[str, Any]:
    """Colour, marker and dash all vary, so overlapping lines and greyscale prints stay apart."""
    return {"marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)],
            "color": f"C{i % 10}"}


def _plain_log(ax: Any, axis: str = "y") -> None:
    """Log scale with plain-number tick labels (0.5, 2, 100 rather than 5x10^-1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator
    getattr(ax, f"set_{axis}scale")("log")
    a = ax.yaxis if axis == "y" else ax.xaxis
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    a.set_major_formatter(fmt)
    a.set_minor_locator(LogLocator(subs=(2, 5)))
    a.set_minor_formatter(fmt)


def save(fig: Figure, stem: str | Path, dpi: int = 150) -> list[Path]:
    """Write `stem`.png and `stem`.svg; returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=dpi, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def x_label(x: str) -> str:
    return X_LABELS.get(x, x)


def _series(df: pd.DataFrame, x: str) -> list[tuple[str, pd.DataFrame]]:
    """Rows per series (first-seen order), sorted by x, finite x only."""
    d = df.copy()
    d["_x"] = pd.to_numeric(d[x], errors="coerce")
    d = d[np.isfinite(d["_x"])]
    return [(name, g.sort_values("_x")) for name, g in d.groupby("series", sort=False)]


# ---------------------------------------------------------------- per-rate plots

@_styled
def plot_bubble(df: pd.DataFrame, x: str, title: str = "Pipeline bubble ratio vs load") -> Figure:
    """Bubble ratio vs the x key (request rate), one line per series."""
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, g) in enumerate(_series(df, x)):
        ax.plot(g["_x"], g["bubble_ratio"], label=name, **_style(i))
    ax.set_xlabel(x_label(x))
    ax.set_ylabel(METRIC_LABELS["bubble_ratio"])
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(title="policy")
    return fig


LATENCY_PANELS = (("ttft_p50", "P50 TTFT", "s", 1.0), ("ttft_p99", "P99 TTFT", "s", 1.0),
                  ("tpot_p50", "P50 TPOT", "ms", 1e3), ("tpot_p99", "P99 TPOT", "ms", 1e3))


@_styled
def plot_latency(df: pd.DataFrame, x: str, title: str = "Throughput vs latency") -> Figure:
    """2x2: throughput (req/s) vs TTFT and TPOT at P50 and P99; one line per series, points in
    rising offered load. Log latency axes: overload makes TTFT grow by orders of magnitude."""
    fig = Figure(figsize=(10, 7.2), layout="constrained")
    axes = fig.subplots(2, 2)
    series = _series(df, x)
    for ax, (metric, name, unit, scale) in zip(axes.flat, LATENCY_PANELS):
        for i, (label, g) in enumerate(series):
            ax.plot(g["throughput_rps"], g[metric] * scale, label=label, **_style(i))
        ax.set_xlabel("throughput (req/s)")
        ax.set_ylabel(f"{name} ({unit})")
        _plain_log(ax)
        ax.set_title(name)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4) or 1, title="policy")
    fig.suptitle(title)
    return fig


# ---------------------------------------------------------------- trace plots

def window_bubble(batches: pd.DataFrame, pp: int, start: float, end: float) -> float:
    """Idle share of pp x [start, end) (every instant counts, as the bubbles drawn)."""
    busy = (batches["end"].clip(upper=end) - batches["start"].clip(lower=start)).clip(lower=0).sum()
    return 1.0 - float(busy) / (pp * (end - start)) if end > start else math.nan


@_styled
def plot_timeline(traces: Mapping[str, Any], start: float, duration: float,
                  title: str = "Per-stage timeline") -> Figure:
    """Gantt per policy: one row per stage, one bar per micro-batch coloured by its prefill
    share of tokens; the white gaps are the pipeline bubbles."""
    n = len(traces)
    fig = Figure(figsize=(11, 1.0 + 1.9 * n), layout="constrained")
    axes = np.atleast_1d(fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0])
    cmap = matplotlib.colormaps["viridis"]
    norm = Normalize(0.0, 1.0)
    end = start + duration
    for ax, (label, trace) in zip(axes, traces.items()):
        pp = int(trace.meta.get("pp", trace.batches["stage"].max() + 1))
        b = trace.batches
        b = b[(b["end"] > start) & (b["start"] < end)]
        tokens = (b["prefill_tokens"] + b["decode_tokens"]).clip(lower=1)
        share = (b["prefill_tokens"] / tokens).to_numpy()
        for s in range(pp):
            m = (b["stage"] == s).to_numpy()
            bars = list(zip(b["start"].to_numpy()[m], (b["end"] - b["start"]).to_numpy()[m]))
            ax.broken_barh(bars, (s - 0.4, 0.8), facecolors=cmap(norm(share[m])),
                           edgecolor="black", linewidth=0.3)
        ax.set_yticks(range(pp), [f"stage {s}" for s in range(pp)])
        ax.set_ylim(pp - 0.5, -0.5)
        ax.grid(axis="y", visible=False)
        ax.set_title(f"{label}: bubble ratio in this window {window_bubble(b, pp, start, end):.2f}",
                     loc="left")
    axes[-1].set_xlim(start, end)
    axes[-1].set_xlabel("time (s)")
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=list(axes), label="prefill share of batch tokens", shrink=0.9)
    fig.suptitle(title)
    return fig


def _resample(t: np.ndarray, v: np.ndarray, n: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    """A step function sampled at n even instants (keeps SVGs small)."""
    if t.size <= n:
        return t, v
    grid = np.linspace(t[0], t[-1], n)
    return grid, v[np.clip(np.searchsorted(t, grid, side="right") - 1, 0, t.size - 1)]


@_styled
def plot_kv_queue(traces: Mapping[str, Any], title: str = "KV cache and queue over time",
                  window: tuple[float, float] | None = None) -> Figure:
    """Top: KV utilization (%); bottom: waiting queue length (requests); one line per policy.
    `window` shades the timeline plot's window."""
    fig = Figure(figsize=(10, 6.2), layout="constrained")
    ax_kv, ax_q = fig.subplots(2, 1, sharex=True)
    for i, (label, trace) in enumerate(traces.items()):
        s = trace.samples.sort_values("time", kind="stable")
        t = s["time"].to_numpy(float)
        st = {k: v for k, v in _style(i).items() if k != "marker"}
        st["linewidth"] = 1.4
        ax_kv.plot(*_resample(t, s["kv_util"].to_numpy(float) * 100), drawstyle="steps-post", label=label, **st)
        ax_q.plot(*_resample(t, s["waiting"].to_numpy(float)), drawstyle="steps-post", label=label, **st)
    ax_kv.set_ylabel("KV cache used (%)")
    ax_kv.set_ylim(0, 105)
    ax_q.set_ylabel("waiting requests")
    ax_q.set_xlabel("time (s)")
    ax_q.set_ylim(bottom=0)
    if window is not None:
        for ax in (ax_kv, ax_q):
            ax.axvspan(*window, color="grey", alpha=0.15, lw=0)
    ax_kv.legend(title="policy")
    fig.suptitle(title)
    return fig


@_styled
def plot_cdfs(traces: Mapping[str, Any], title: str = "Latency CDFs") -> Figure:
    """Empirical CDFs of TTFT (s) and TPOT (ms) of finished requests, one line per policy."""
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    ax_ttft, ax_tpot = fig.subplots(1, 2)
    for i, (label, trace) in enumerate(traces.items()):
        lat = request_latencies(trace.requests)
        st = {k: v for k, v in _style(i).items() if k != "marker"}
        for ax, values in ((ax_ttft, lat["ttft"].to_numpy()), (ax_tpot, lat["tpot"].to_numpy() * 1e3)):
            v = np.sort(values[~np.isnan(values)])
            if v.size:
                ax.plot(v, np.arange(1, v.size + 1) / v.size, label=label, **st)
    ax_ttft.set_xlabel("TTFT (s)")
    _plain_log(ax_ttft, "x")
    ax_tpot.set_xlabel("TPOT (ms)")
    for ax, name in ((ax_ttft, "Time to first token"), (ax_tpot, "Time per output token")):
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.set_title(name)
    ax_tpot.legend(title="policy", loc="lower right")
    fig.suptitle(title)
    return fig


@_styled
def plot_heatmap(df: pd.DataFrame, x: str, y: str, metric: str, title: str) -> Figure:
    """Mean of `metric` over rows per (x, y) parameter pair, annotated cells."""
    table = df.pivot_table(index=y, columns=x, values=metric, aggfunc="mean").sort_index().sort_index(axis=1)
    fig = Figure(figsize=(1.6 + 1.1 * max(table.shape[1], 3), 1.6 + 0.8 * max(table.shape[0], 3)),
                 layout="constrained")
    ax = fig.add_subplot()
    data = table.to_numpy(float)
    im = ax.imshow(data, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(table.shape[1]), [f"{v:g}" if isinstance(v, float) else str(v) for v in table.columns])
    ax.set_yticks(range(table.shape[0]), [f"{v:g}" if isinstance(v, float) else str(v) for v in table.index])
    ax.set_xlabel(x.removeprefix("policy_params."))
    ax.set_ylabel(y.removeprefix("policy_params."))
    ax.grid(False)
    finite = data[np.isfinite(data)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for (r, c), v in np.ndenumerate(data):
        if np.isfinite(v):
            ax.text(c, r, f"{v:.3g}", ha="center", va="center", fontsize=9,
                    color="black" if v > mid else "white")
    fig.colorbar(im, ax=ax, label=METRIC_LABELS.get(metric, metric))
    ax.set_title(title)
    return fig
