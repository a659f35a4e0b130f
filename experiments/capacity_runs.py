"""The capacity searches of a sweep (or a tune's trial) on a Runner: per series, the
max-throughput run, then bisection on the capacity key; capacity.csv and capacity_runs.csv.
experiments/capacity.py says what a probe must meet."""
from __future__ import annotations

import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import pandas as pd

from core.workloads import Workload
from experiments.capacity import binding_condition, find_capacity, probe_failures
from experiments.config_keys import fmt_value
from experiments.expand import capacity_groups, max_throughput_config, probe_config
from experiments.spec import Experiment, Run
from experiments.tables import write_table
from experiments.task_runner import Runner, Task
from sim import SimConfig

def offered_rps(config: dict[str, Any]) -> float:
    """A run's offered rate as `execute` reports it, from its workload alone (no simulation)."""

    arrivals = [r.arrival for r in Workload.from_dict(SimConfig.from_dict(config).workload_spec()).requests()]
    span = max(arrivals) - min(arrivals) if len(arrivals) > 1 else 0.0
    return (len(arrivals) - 1) / span if span > 0 else math.inf


def search_capacity(name: str, run: Run, cap: Any, runner: Runner,
                    on_run: Callable[[], None] = lambda: None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One series' capacity record and its probe rows: the max-throughput run first (when
    asked), then bisection on `cap.key` (experiments/capacity.py says what a probe must meet;
    a probe offering more than the max throughput fails without being simulated).
    `on_run` is called after each simulation (progress bars)."""
    rec: dict[str, Any] = {"series": name, "label": run.label, "policy": run.policy, "key": cap.key}
    probes: list[dict[str, Any]] = []
    max_rps = None
    mt: dict[str, Any] = {}
    if cap.max_throughput:
        row = runner.run_one(Task(max_throughput_config(run), name=f"max throughput {name}"))
        on_run()
        max_rps = row["throughput_rps"]
        mt = {"max_throughput_rps": max_rps, "max_output_tps": row["output_tps"],
              "max_total_tps": row["total_tps"], "max_bubble_ratio": row["bubble_ratio"],
              "max_ttft_p99": row["ttft_p99"], "max_tpot_p99": row["tpot_p99"]}
    evaluated: list[tuple[float, dict[str, list[str]]]] = []

    def meets(rate: float) -> bool:
        task = Task(probe_config(run, cap.key, rate), name=f"capacity probe {name}, {cap.key}={rate:g}")
        if max_rps is not None:
            offered = offered_rps(task.config)
            if offered > max_rps:   # fails whatever the simulation says: not simulated
                fails = probe_failures({"offered_rps": offered}, {}, cap.sustain, max_rps)
                evaluated.append((rate, fails))
                probes.append({"series": name, "label": run.label, "policy": run.policy, cap.key: rate,
                               "meets": False, "failed": "max_throughput", "simulated": False,
                               "failures": fails["max_throughput"][0], "offered_rps": offered,
                               "hash": task.hash})
                on_run()
                return False
        row = runner.run_one(task)
        on_run()
        fails = probe_failures(row, cap.slo, cap.sustain, max_rps)
        evaluated.append((rate, fails))
        probes.append({"series": name, "label": run.label, "policy": run.policy, cap.key: rate,
                       "meets": not fails, "failed": ",".join(fails), "simulated": True,
                       "failures": "; ".join(m for ms in fails.values() for m in ms),
                       **row, "hash": task.hash})
        return not fails

    capacity = find_capacity(meets, cap.lo, cap.hi, cap.tol, cap.rel_tol) if cap.slo else math.nan
    at = [p for p in probes if p[cap.key] == capacity]
    rec.update({"capacity": capacity,
                "capacity_rps": at[0]["offered_rps"] if at else math.nan,
                "bound": binding_condition(evaluated, capacity, cap.lo, cap.hi) if cap.slo else "",
                "lo": cap.lo, "hi": cap.hi, "tol": cap.tol, "rel_tol": cap.rel_tol, "sustain": cap.sustain,
                "probes": len(evaluated), **{f"slo.{k}": v for k, v in cap.slo.items()}, **mt})
    return rec, probes


def run_capacity(exp: Experiment, runs: list[Run], runner: Runner,
                 log: Callable[[str], None] = print) -> pd.DataFrame:
    """Per series: `search_capacity`; writes capacity.csv and capacity_runs.csv."""
    cap = exp.capacity
    assert cap is not None
    from tqdm import tqdm

    groups = capacity_groups(exp, runs)
    probes: dict[str, list[dict[str, Any]]] = {}
    messages: dict[str, str] = {}
    most = cap.probes() + cap.max_throughput   # a bisection often stops earlier
    bar = tqdm(total=len(groups) * most, desc="capacity", unit="run",
               disable=not runner.progress, file=sys.stderr, dynamic_ncols=True)
    bar_lock = threading.Lock()

    def search(name: str, run: Run) -> dict[str, Any]:
        runs = 0

        def tick() -> None:
            nonlocal runs
            runs += 1
            bar.update()

        rec, probes[name] = search_capacity(name, run, cap, runner, tick)
        with bar_lock:   # the bar ends full: a series' unused probes leave its total
            bar.total -= most - runs
            bar.refresh()
        capacity = rec["capacity"]
        unit = "req/s" if cap.key == "workload.arrival.rate" else f"({cap.key})"
        extra = f"; max throughput {rec['max_throughput_rps']:.2f} req/s" if cap.max_throughput else ""
        messages[name] = (f"capacity {name}: {fmt_value(capacity)} {unit}"
                          f"{' (bound by ' + rec['bound'] + ')' if rec['bound'] else ''} after "
                          f"{rec['probes']} probes{extra}" if cap.slo else f"{name}: {extra[2:]}")
        return rec

    try:
        if runner.in_process or len(groups) == 1:
            recs = [search(n, r) for n, r in groups]
        else:
            with ThreadPoolExecutor(max_workers=min(len(groups), runner.workers * 2)) as tp:
                recs = list(tp.map(lambda g: search(*g), groups))
    finally:
        bar.close()
    for name, _ in groups:
        log(messages[name])
    rows = [p for name, _ in groups for p in sorted(probes.get(name, []), key=lambda p: p[cap.key])]
    if rows:
        write_table(pd.DataFrame(rows).drop(columns=["wall_s"], errors="ignore"), runner.out / "capacity_runs")
    df = pd.DataFrame(recs)
    write_table(df, runner.out / "capacity")
    return df
