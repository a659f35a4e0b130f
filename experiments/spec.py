"""A sweep's parsed parts: the experiment, its policy entries, capacity search and report
settings, and one resolved run (experiments/config.py reads them, experiments/expand.py
resolves the runs)."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from experiments.config_keys import fmt_value

PLOTS = ("bubble", "latency", "timeline", "kv_queue", "cdf", "heatmap")


@dataclass
class PolicySpec:
    name: str
    label: str
    params: dict[str, Any]
    grid: dict[str, list]

    def variants(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, params) per point of the policy's own parameter grid."""
        if not self.grid:
            return [(self.label, dict(self.params))]
        out = []
        for combo in itertools.product(*self.grid.values()):
            point = dict(zip(self.grid, combo))
            label = f"{self.label} " + ",".join(f"{k}={fmt_value(v)}" for k, v in point.items())
            out.append((label, {**self.params, **point}))
        return out


@dataclass
class CapacitySpec:
    key: str
    lo: float
    hi: float
    tol: float
    slo: dict[str, float]
    max_throughput: bool = True
    sustain: float = 0.05
    rel_tol: float = 0.0   # also stop within this fraction of the rate (find_capacity)

    def probes(self) -> int:
        """Most simulations one bisection needs (both ends + halvings); 0 without an SLO."""
        step = max(self.tol, self.rel_tol * self.lo)
        return 2 + max(0, math.ceil(math.log2((self.hi - self.lo) / step))) if self.slo else 0


@dataclass
class ReportSpec:
    plots: tuple[str, ...] = PLOTS
    x: str | None = None
    timeline_rate: Any = None
    timeline_start: float | None = None
    timeline_duration: float = 2.0
    heatmap_metric: str = "bubble_ratio"
    heatmap_rate: Any = None


@dataclass
class Run:
    index: int
    config: dict[str, Any]        # resolved SimConfig.to_dict()
    settings: dict[str, Any]      # swept dotted key -> value (grid and zip)
    policy: str
    label: str
    params: dict[str, Any]        # policy params as given (entry params + its grid point)
    series: str                   # label + the swept settings other than the x key
    x: Any = None                 # value of the report's x key (None when not swept)
    artefacts: bool = False       # keep the trace (runs/<hash>/)


@dataclass
class Experiment:
    name: str
    description: str
    base: dict[str, Any]
    grid: dict[str, list]
    zips: list[dict[str, list]]
    policies: list[PolicySpec]
    capacity: CapacitySpec | None
    report: ReportSpec
    artefacts: bool
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def swept(self) -> list[str]:
        return [*self.grid, *(k for z in self.zips for k in z)]

    def count(self) -> int:
        points = math.prod(len(v) for v in self.grid.values()) * math.prod(
            len(next(iter(z.values()))) for z in self.zips)
        return points * sum(len(p.variants()) for p in self.policies)
