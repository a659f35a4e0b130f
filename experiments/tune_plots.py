"""Plots of a tune: optimization history, parameter importance, and the objective over the
two most important parameters (matplotlib object API, as experiments/plots.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from experiments.plots import Figure, save
from experiments.tune_config import TuneSpec


def plot_history(table: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ok = table[(table["state"] == "COMPLETE") & table["feasible"]].sort_values("trial")
    bad = table[(table["state"] == "COMPLETE") & ~table["feasible"]]
    ax.scatter(ok["trial"], ok["objective"], s=14, color="tab:blue", label="trial")
    if len(bad):
        ax.scatter(bad["trial"], np.full(len(bad), ok["objective"].min() if len(ok) else 0.0), s=14,
                   marker="x", color="tab:gray", label="infeasible (not run)")
    ax.step(ok["trial"], ok["objective"].cummax(), where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective")
    ax.set_title("Optimization history")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def plot_importance(importance: dict[str, float]) -> Figure:
    fig = Figure(figsize=(6, 0.5 + 0.45 * max(1, len(importance))))
    ax = fig.add_subplot()
    names = list(importance)[::-1]
    ax.barh(names, [importance[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (PED-ANOVA)")
    ax.set_title("Parameter importance")
    ax.grid(alpha=0.3, axis="x")
    return fig


def plot_top2(table: pd.DataFrame, spec: TuneSpec, names: list[str]) -> Figure:
    fig = Figure(figsize=(6.5, 5))
    ax = fig.add_subplot()
    ok = table[(table["state"] == "COMPLETE") & table["feasible"]]
    x, y = ok[f"params.{names[0]}"], ok[f"params.{names[1]}"]
    sc = ax.scatter(_axis(x), _axis(y), c=ok["objective"], cmap="viridis", s=30, edgecolors="k", linewidths=0.3)
    best = ok.sort_values(["objective", "trial"], ascending=[False, True]).head(1)
    if len(best):
        ax.scatter(_axis(best[f"params.{names[0]}"]), _axis(best[f"params.{names[1]}"]), s=160,
                   facecolors="none", edgecolors="tab:red", linewidths=1.5, label="best")
        ax.legend(loc="best", fontsize=8)
    fig.colorbar(sc, ax=ax, label="objective")
    specs = {p.name: p for p in spec.params}
    for setter, n, col in ((ax.set_xscale, names[0], x), (ax.set_yscale, names[1], y)):
        if specs[n].log:
            setter("log")
        if specs[n].type == "categorical":
            cats = list(dict.fromkeys(col.astype(str)))
            (ax.set_xticks if setter == ax.set_xscale else ax.set_yticks)(range(len(cats)), cats)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title(f"Objective over {names[0]} and {names[1]}")
    ax.grid(alpha=0.3)
    return fig


def _axis(col: pd.Series) -> Any:
    """Numbers as they are; categories as their index in order of appearance."""
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        return col.to_numpy(float)
    cats = list(dict.fromkeys(col.astype(str)))
    return np.array([cats.index(v) for v in col.astype(str)], float)


def make_tune_plots(folder: Path, table: pd.DataFrame, spec: TuneSpec, importance: dict[str, float]) -> list[Path]:
    paths = save(plot_history(table), folder / "history")
    if importance:
        paths += save(plot_importance(importance), folder / "importance")
    order = list(importance) or [p.name for p in spec.params]
    if len(order) >= 2:
        paths += save(plot_top2(table, spec, order[:2]), folder / "top2")
    return paths
