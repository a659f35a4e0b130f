"""Workloads: the requests a run serves, from distributions (core.distributions) or a
trace file (core.trace_file).

Randomness: `Workload.requests()` draws arrivals, prompt lengths and output lengths from
three independent streams spawned from `seed`, so changing one distribution leaves the
other two unchanged.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.request import Request
from core.distributions import Arrival, Empirical, Fixed, LengthDist, LogNormal, Uniform, _int, _real, length_from_dict
from core.trace_file import read_trace
from core.validation import check_keys


# Measured once from /work/shared/data/traces/azure_conv_2023.csv (19,366 rows), as std/mean
# (population std): num_prefill_tokens 1108.8 / 1154.7 = 0.960, num_decode_tokens
# 162.9 / 211.1 = 0.771. After rounding and clipping (8192 / 2048) the sampled lengths have
# mean ~1150 and CV ~0.92 (prompts; the lognormal tail is heavier than the real one) and
# mean ~211, CV ~0.77 (outputs).
AZURE_CONV_PROMPT_MEAN = 1155
AZURE_CONV_PROMPT_CV = 0.960
AZURE_CONV_OUTPUT_MEAN = 211
AZURE_CONV_OUTPUT_CV = 0.771
DEFAULT_MAX_PROMPT = 8192     # the real trace has one prompt above this (max 14,050)
DEFAULT_MAX_OUTPUT = 2048     # the real trace's outputs stop at 1,000


# ---------------------------------------------------------------- workload

_WORKLOAD_KEYS = ("num_requests", "seed", "arrival", "prompt_len", "output_len",
                  "trace", "time_scale", "rate_scale", "start", "limit")


@dataclass(frozen=True, slots=True)
class Workload:
    """A reproducible list of requests.

    Synthetic: `num_requests`, `arrival`, `prompt_len` and `output_len` are required.
    Trace: `trace` (a CSV path) with `time_scale`/`rate_scale`, `start`, `limit` as in
    `read_trace`; `num_requests` is not allowed (use `limit`). Each of `arrival`,
    `prompt_len`, `output_len` given with a trace replaces that part of the trace with
    synthetic values drawn from `seed` (e.g. a rate sweep over real lengths, or fixed
    output lengths); `time_scale`/`rate_scale` cannot go with an `arrival`.
    """
    num_requests: int | None = None
    arrival: Arrival | None = None
    prompt_len: LengthDist | None = None
    output_len: LengthDist | None = None
    seed: int = 0
    trace: str | None = None
    time_scale: float = 1.0
    rate_scale: float | None = None
    start: int = 0
    limit: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", _int("seed", self.seed, 0))
        if self.arrival is not None and not isinstance(self.arrival, Arrival):
            raise ValueError(f"arrival must be an Arrival, got {type(self.arrival).__name__}")
        for name in ("prompt_len", "output_len"):
            dist = getattr(self, name)
            if dist is not None and not isinstance(dist, (Fixed, Uniform, LogNormal, Empirical)):
                raise ValueError(f"{name} must be one of Fixed, Uniform, LogNormal, Empirical, "
                                 f"got {type(dist).__name__}")
        object.__setattr__(self, "time_scale", _real("time_scale", self.time_scale, low=0, strict=True))
        if self.rate_scale is not None:
            object.__setattr__(self, "rate_scale", _real("rate_scale", self.rate_scale, low=0, strict=True))
        object.__setattr__(self, "start", _int("start", self.start, 0))
        if self.limit is not None:
            object.__setattr__(self, "limit", _int("limit", self.limit, 1))

        if self.trace is None:
            object.__setattr__(self, "num_requests", _int("num_requests", self.num_requests, 1))
            for name in ("arrival", "prompt_len", "output_len"):
                if getattr(self, name) is None:
                    raise ValueError(f"{name} is required for a synthetic workload (or give a trace)")
            for name, default in (("time_scale", 1.0), ("rate_scale", None), ("start", 0), ("limit", None)):
                if getattr(self, name) != default:
                    raise ValueError(f"{name} applies only to a trace workload")
            return
        if not isinstance(self.trace, (str, os.PathLike)):
            raise ValueError(f"trace must be a file path, got {type(self.trace).__name__}")
        object.__setattr__(self, "trace", os.fspath(self.trace))
        if self.num_requests is not None:
            raise ValueError("num_requests does not apply to a trace workload; use limit")
        if self.rate_scale is not None and self.time_scale != 1.0:
            raise ValueError("give time_scale or rate_scale, not both")
        if self.arrival is not None and (self.time_scale != 1.0 or self.rate_scale is not None):
            raise ValueError("time_scale/rate_scale scale the trace's arrivals, "
                             "which the arrival section replaces; give one or the other")

    def requests(self) -> list[Request]:
        """Requests with ids 0..n-1 in arrival order; the same seed gives the same list."""
        arrival_rng, prompt_rng, output_rng = (
            np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(3))
        if self.trace is None:
            n = self.num_requests
            arrivals = self.arrival.times(n, arrival_rng)
            prompts = self.prompt_len.sample(n, prompt_rng)
            outputs = self.output_len.sample(n, output_rng)
        else:
            tr = read_trace(self.trace, time_scale=self.time_scale, start=self.start,
                            limit=self.limit, rate_scale=self.rate_scale)
            n = len(tr)
            arrivals = tr.arrivals if self.arrival is None else self.arrival.times(n, arrival_rng)
            prompts = tr.prompt_lens if self.prompt_len is None else self.prompt_len.sample(n, prompt_rng)
            outputs = tr.output_lens if self.output_len is None else self.output_len.sample(n, output_rng)
        return [Request(id=i, prompt_len=p, max_output=o, arrival=a)
                for i, (a, p, o) in enumerate(zip(arrivals.tolist(), prompts.tolist(), outputs.tolist()))]

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (rate inf is the string "inf"); `from_dict` reads it back."""
        d: dict[str, Any] = {}
        if self.trace is None:
            d["num_requests"] = self.num_requests
        else:
            d["trace"] = self.trace
            if self.rate_scale is not None:
                d["rate_scale"] = self.rate_scale
            else:
                d["time_scale"] = self.time_scale
            d["start"] = self.start
            if self.limit is not None:
                d["limit"] = self.limit
        d["seed"] = self.seed
        for name in ("arrival", "prompt_len", "output_len"):
            part = getattr(self, name)
            if part is not None:
                d[name] = part.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Workload:
        """Synthetic: {"num_requests", "seed", "arrival": {...}, "prompt_len": {...},
        "output_len": {...}}. Trace: {"trace": PATH, "time_scale" | "rate_scale", "start",
        "limit", "seed"} plus any of "arrival", "prompt_len", "output_len" as overrides."""
        check_keys(d, _WORKLOAD_KEYS, "workload")
        kw = dict(d)
        if "arrival" in kw:
            kw["arrival"] = Arrival.from_dict(kw["arrival"])
        for name in ("prompt_len", "output_len"):
            if name in kw:
                kw[name] = length_from_dict(kw[name], name)
        return cls(**kw)


def default_workload(rate: float = math.inf, num_requests: int = 1000, seed: int = 0,
                     burstiness: float = 1.0) -> Workload:
    """Synthetic, shaped like the Azure 2023 conversation trace: lognormal prompts (mean
    1,155, CV 0.960, at most 8,192) and outputs (mean 211, CV 0.771, at most 2,048);
    gamma arrivals at `rate` req/s (burstiness 1 = Poisson; the real trace runs at 5.5)."""
    return Workload(
        num_requests=num_requests,
        arrival=Arrival("gamma", rate, burstiness),
        prompt_len=LogNormal(AZURE_CONV_PROMPT_MEAN, AZURE_CONV_PROMPT_CV, max=DEFAULT_MAX_PROMPT),
        output_len=LogNormal(AZURE_CONV_OUTPUT_MEAN, AZURE_CONV_OUTPUT_CV, max=DEFAULT_MAX_OUTPUT),
        seed=seed,
    )
