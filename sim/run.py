"""simulate(config) -> SimResult: build the workload, the scheduler and the SimPy model, run."""
from __future__ import annotations

import contextlib
import functools
import gc
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pandas as pd
import simpy

from core.metrics import summarize
from core.policies import make_policy
from core.request import Request
from core.scheduler import Scheduler, SchedulerConfig
from core.trace import Trace, TraceRecorder
from core.workloads import Workload
from profiles import LatencyModel, load_profile
from profiles.fit_cache import cached_fit
from profiles.latency_model import SlowestStage
from sim.config import SimConfig
from sim.pipeline import PipelineSim, StageJitter, StageLatency


@dataclass
class SimResult:
    config: SimConfig
    trace: Trace
    summary: dict[str, Any]
    wall_s: float


@functools.lru_cache(maxsize=32)
def fitted_model(profile: str) -> tuple[LatencyModel, int, dict]:
    """Fit once per profile per process (sweeps call this thousands of times), and once per
    table on this machine (profiles/fit_cache.py)."""
    prof = load_profile(profile)
    model, _error = cached_fit(profile, prof)
    return model, prof.pp, prof.meta


@functools.lru_cache(maxsize=32)
def profile_jitter(profile: str) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """The profile's measured jitter (jitter.csv): (batch tokens, per-stage time ratios,
    level: see jitter_level)."""
    prof = load_profile(profile)
    if prof.jitter is None:
        raise ValueError(f"stage_jitter: profile {profile!r} has no jitter.csv (measured stage-time "
                         "variation); in-situ tables have one (profiles/in_situ.py, `pipetwin validate` "
                         "with calibrate)")
    level = jitter_level(prof.stages, fitted_model(profile)[0])
    return prof.jitter["tokens"].to_numpy(), prof.jitter.drop(columns="tokens").to_numpy(float), level


def jitter_level(stages: pd.DataFrame, model: LatencyModel, min_rows: int = 20) -> dict[int, np.ndarray]:
    """Per octave of batch tokens (as StageJitter groups them), each stage's median of
    measured time over the model's time, on the table's own rows. Jitter ratios are
    relative to a shape's median, but the fit (least squares on relative error) comes out
    below the median of noisy rows (on the CPU in-situ tables by ~1% overall, more at some
    sizes); this brings it there. Octaves where a stage has fewer than `min_rows` rows get
    factor 1 for that stage."""
    predicted = model.predict(stages)
    tokens = (stages["prefill_tokens"] + stages["decode_tokens"]).clip(lower=1).to_numpy()
    rows = pd.DataFrame({"stage": stages["stage"].to_numpy(), "octave": np.floor(np.log2(tokens)).astype(int),
                         "ratio": stages["latency_median"].to_numpy(float) / predicted})
    level: dict[int, np.ndarray] = {}
    for (stage, octave), g in rows.groupby(["stage", "octave"]):
        if len(g) >= min_rows:
            level.setdefault(int(octave), np.ones(model.pp))[int(stage)] = float(g["ratio"].median())
    return level


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the event loop. The loop allocates millions of
    short-lived objects (batches, events, lists) that reference counting frees, and forms no
    cycles that outlive it, so the collector's passes over the ~10^5 live requests and
    arrays only cost time: 0.15 s of 4.4 s on the full Azure conversation trace with
    time_balanced, at the same peak memory (331 MB either way)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def simulate(config: SimConfig, *, latency: StageLatency | None = None, pp: int | None = None,
             requests: list[Request] | None = None,
             jitter: tuple[np.ndarray, np.ndarray] | None = None) -> SimResult:
    """Run one configuration. `latency`/`pp` replace the profile (tests, custom models),
    `jitter` its jitter.csv as (batch tokens, per-stage ratios[, level]) (with stage_jitter);
    `requests` replaces the workload spec (they are consumed: pass fresh ones each run)."""
    wall0 = time.perf_counter()
    meta: dict[str, Any] = {}
    if latency is None:
        latency, pp, prof_meta = fitted_model(config.profile)
        meta.update(profile=config.profile, profile_source=prof_meta.get("source"),
                    device=prof_meta.get("device"), model=prof_meta.get("model", {}).get("name"))
        if latency.error is not None:
            meta["latency_fit_mape"] = latency.error.mape
    elif pp is None:
        raise ValueError("simulate(latency=...) needs pp=")
    if config.pp is not None and config.pp != pp:
        raise ValueError(f"pp is {config.pp} but profile {config.profile!r} has pp={pp}")
    num_pages = config.num_pages
    if num_pages is None:
        if latency is not None and "profile" not in meta:
            raise ValueError("num_pages is required when no profile gives the KV capacity")
        num_pages = load_profile(config.profile).kv_pages(config.page_size, config.memory_fraction)
        if num_pages < 1:
            raise ValueError(f"profile {config.profile!r} leaves no KV pages at memory_fraction="
                             f"{config.memory_fraction}")
    if requests is None:
        requests = Workload.from_dict(config.workload_spec()).requests()

    recorder = TraceRecorder()
    policy = make_policy(config.policy, config.policy_params)
    # The policy may price batches (time_balanced does): by default with the model that times
    # them here, or with the one of `stage_time_profile`.
    pricing = SlowestStage(latency, pp) if config.stage_time_profile is None \
        else SlowestStage(fitted_model(config.stage_time_profile)[0])
    scheduler = Scheduler(SchedulerConfig(pp, num_pages, config.page_size, page_ids=False), policy, recorder,
                          stage_time_model=pricing)
    env = simpy.Environment()
    stage_jitter = None
    if config.stage_jitter:
        tokens, ratios, *level = jitter if jitter is not None else profile_jitter(config.profile)
        stage_jitter = StageJitter(tokens, ratios, config.jitter_seed, level=level[0] if level else None)
    model = PipelineSim(env, scheduler, latency, recorder, config.stage_model,
                        driver_on_stage0=config.driver_on_stage0, jitter=stage_jitter)
    model.start(requests)
    with collector_paused():
        env.run(until=config.time_limit)

    meta.update(pp=pp, policy=config.policy, policy_params=dict(config.policy_params), seed=config.seed,
                num_pages=num_pages, page_size=config.page_size, sim_time=env.now,
                time_limit=config.time_limit, forced_batches=scheduler.forced_batches,
                driver_on_stage0=config.driver_on_stage0,
                stage_jitter=config.stage_jitter, jitter_seed=config.jitter_seed,
                source="sim")
    trace = recorder.build(scheduler.requests if config.time_limit is None else requests, meta)
    if config.time_limit is not None:
        _cut_at(trace, config.time_limit)
    summary = summarize(trace, slo=config.slo)
    summary["wall_s"] = time.perf_counter() - wall0
    return SimResult(config, trace, summary, summary["wall_s"])


def _cut_at(trace: Trace, limit: float) -> None:
    """Stage work dispatched before the limit but running past it is clipped to the limit."""
    b = trace.batches
    b = b[b["start"] < limit].copy()
    b["end"] = b["end"].clip(upper=limit)
    trace.batches = b.reset_index(drop=True)
