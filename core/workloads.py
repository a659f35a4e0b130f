"""Workloads: arrival processes, length distributions, a trace reader, and `Workload`.

Conventions (vLLM's serving benchmark):
- Arrival times are seconds, non-decreasing, and the FIRST REQUEST ARRIVES AT t=0; the
  n-1 gaps that follow have mean 1/rate. (The real traces start at 0 too.)
- `rate=float("inf")` (or the string "inf" in a config) sends every request at t=0,
  whatever the kind: the usual "max throughput" run.
- gamma gaps have shape `burstiness` and mean 1/rate, so their CV is 1/sqrt(burstiness):
  1 is Poisson, < 1 burstier, > 1 smoother.

Randomness: `Workload.requests()` draws arrivals, prompt lengths and output lengths from
three independent streams spawned from `seed`, so changing one distribution leaves the
other two unchanged.

Trace files (CSV, columns `arrived_at, num_prefill_tokens, num_decode_tokens`, extra
columns ignored): the first kept row is re-based to t=0. A `num_decode_tokens` of 0 is
raised to 1 (a request always generates at least one token); the count is kept in
`Trace.clipped_outputs` and reported with `warnings.warn`, never silently. (Neither
Azure 2023 trace has any: their smallest outputs are 7 and 6 tokens.)
"""
from __future__ import annotations

import csv
import math
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from core.request import Request
from core.validation import check_keys, suggest

ARRIVAL_KINDS = ("poisson", "gamma", "constant", "all_at_once")
TRACE_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")

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


# ---------------------------------------------------------------- validation helpers

def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int(name: str, value: Any, low: int) -> int:
    if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _real(name: str, value: Any, *, low: float, strict: bool) -> float:
    """A finite real number > low (strict) or >= low."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if strict else value < low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")
    return float(value)


def _rate(name: str, value: Any) -> float:
    """A rate: a number > 0, or inf (float or the string 'inf')."""
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity"):
        return math.inf
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    if not ok or value <= 0:
        raise ValueError(f"{name} must be > 0 or 'inf', got {value!r}")
    return float(value)


def _check_n(n: Any) -> int:
    return _int("n", n, 0)


# ---------------------------------------------------------------- arrival processes

def gamma_arrivals(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """n arrival times: 0, then gamma gaps of shape `burstiness` and mean 1/rate."""
    n, rate = _check_n(n), _rate("rate", rate)
    burstiness = _real("burstiness", burstiness, low=0, strict=True)
    if math.isinf(rate) or n == 0:
        return np.zeros(n)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return np.concatenate(([0.0], np.cumsum(gaps)))


def poisson_arrivals(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """n arrival times: 0, then exponential gaps of mean 1/rate (gamma with shape 1:
    the same generator state gives the same times as `gamma_arrivals(n, rate, 1, rng)`)."""
    return gamma_arrivals(n, rate, 1.0, rng)


def constant_arrivals(n: int, rate: float) -> np.ndarray:
    """n arrival times 0, 1/rate, 2/rate, ..."""
    n, rate = _check_n(n), _rate("rate", rate)
    return np.zeros(n) if math.isinf(rate) else np.arange(n) / rate


def all_at_once(n: int) -> np.ndarray:
    """n arrival times, all 0."""
    return np.zeros(_check_n(n))


@dataclass(frozen=True, slots=True)
class Arrival:
    """An arrival process. `rate` is requests/s or inf; `burstiness` is gamma's shape."""
    kind: str = "gamma"
    rate: float = math.inf
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ARRIVAL_KINDS:
            raise ValueError(f"arrival.kind must be one of {', '.join(ARRIVAL_KINDS)}, "
                             f"got {self.kind!r}{suggest(self.kind, ARRIVAL_KINDS)}")
        object.__setattr__(self, "rate", _rate("arrival.rate", self.rate))
        b = _real("arrival.burstiness", self.burstiness, low=0, strict=True)
        object.__setattr__(self, "burstiness", b)
        if self.kind != "gamma" and b != 1.0:
            raise ValueError(f"arrival.burstiness applies only to kind 'gamma', "
                             f"got burstiness {b:g} with kind {self.kind!r}")
        if self.kind == "all_at_once" and not math.isinf(self.rate):
            raise ValueError(f"arrival.rate must be 'inf' for kind 'all_at_once', got {self.rate:g}")

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n non-decreasing arrival times (float64 seconds), the first at 0."""
        if self.kind == "gamma":
            return gamma_arrivals(n, self.rate, self.burstiness, rng)
        if self.kind == "poisson":
            return poisson_arrivals(n, self.rate, rng)
        if self.kind == "constant":
            return constant_arrivals(n, self.rate)
        return all_at_once(n)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "rate": "inf" if math.isinf(self.rate) else self.rate}
        if self.kind == "gamma":
            d["burstiness"] = self.burstiness
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Arrival:
        """{"kind": "gamma" (default) | "poisson" | "constant" | "all_at_once",
        "rate": float | "inf" (default inf), "burstiness": float (default 1, gamma only)}"""
        check_keys(d, ("kind", "rate", "burstiness"), "arrival")
        return cls(**d)


# ---------------------------------------------------------------- length distributions

@dataclass(frozen=True, slots=True)
class Fixed:
    """Every length equals `value`."""
    value: int
    kind: ClassVar[str] = "fixed"

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _int("fixed.value", self.value, 1))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.full(_check_n(n), self.value, dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}


@dataclass(frozen=True, slots=True)
class Uniform:
    """Integers uniform on [low, high], both included."""
    low: int
    high: int
    kind: ClassVar[str] = "uniform"

    def __post_init__(self) -> None:
        low = _int("uniform.low", self.low, 1)
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", _int("uniform.high", self.high, low))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(self.low, self.high, size=_check_n(n), endpoint=True, dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "low": self.low, "high": self.high}


@dataclass(frozen=True, slots=True)
class LogNormal:
    """Lognormal lengths with the given `mean` and `spread` (coefficient of variation,
    std/mean), rounded to integers and clipped to [min, max]. mean and spread describe the
    continuous distribution before rounding and clipping; with the clip far in the tail
    (as in `default_workload`) they move the sampled mean by under 1%. spread 0 = fixed."""
    mean: float
    spread: float
    min: int = 1
    max: int | None = None
    kind: ClassVar[str] = "lognormal"

    def __post_init__(self) -> None:
        mean = _real("lognormal.mean", self.mean, low=1, strict=False)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "spread", _real("lognormal.spread", self.spread, low=0, strict=False))
        lo = _int("lognormal.min", self.min, 1)
        object.__setattr__(self, "min", lo)
        if self.max is not None:
            object.__setattr__(self, "max", _int("lognormal.max", self.max, lo))
        hi = math.inf if self.max is None else self.max
        if not lo <= mean <= hi:
            raise ValueError(f"lognormal.mean must be within [min, max] = [{lo}, {self.max}], got {mean:g}")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        sigma2 = math.log1p(self.spread ** 2)
        mu = math.log(self.mean) - sigma2 / 2
        x = rng.lognormal(mu, math.sqrt(sigma2), size=_check_n(n))
        hi = 2 ** 62 if self.max is None else self.max
        return np.clip(np.rint(x), self.min, hi).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "mean": self.mean, "spread": self.spread, "min": self.min}
        if self.max is not None:
            d["max"] = self.max
        return d


@dataclass(frozen=True, slots=True)
class Empirical:
    """Lengths drawn with replacement from `values` (e.g. a trace column)."""
    values: tuple[int, ...]
    kind: ClassVar[str] = "empirical"

    def __post_init__(self) -> None:
        if isinstance(self.values, (str, bytes)) or not isinstance(self.values, (Sequence, np.ndarray)):
            raise ValueError(f"empirical.values must be a non-empty list of integers >= 1, "
                             f"got {type(self.values).__name__}")
        if len(self.values) == 0:
            raise ValueError("empirical.values must be a non-empty list of integers >= 1, got []")
        values = tuple(_int(f"empirical.values[{i}]", v, 1) for i, v in enumerate(self.values))
        object.__setattr__(self, "values", values)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(np.asarray(self.values, dtype=np.int64), size=_check_n(n), replace=True)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "values": list(self.values)}


LengthDist = Fixed | Uniform | LogNormal | Empirical
LENGTH_KINDS: dict[str, type] = {c.kind: c for c in (Fixed, Uniform, LogNormal, Empirical)}
_LENGTH_KEYS = {"fixed": ("value",), "uniform": ("low", "high"),
                "lognormal": ("mean", "spread", "min", "max"), "empirical": ("values",)}
_LENGTH_REQUIRED = {"fixed": ("value",), "uniform": ("low", "high"),
                    "lognormal": ("mean", "spread"), "empirical": ("values",)}


def length_from_dict(d: Mapping[str, Any], where: str = "length") -> LengthDist:
    """{"kind": "fixed", "value": N} | {"kind": "uniform", "low": A, "high": B}
    | {"kind": "lognormal", "mean": M, "spread": CV, "min": 1, "max": None}
    | {"kind": "empirical", "values": [...]}. Errors are prefixed with `where`."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a mapping with a 'kind', got {type(d).__name__}")
    kind = d.get("kind")
    if kind not in LENGTH_KINDS:
        raise ValueError(f"{where}.kind must be one of {', '.join(LENGTH_KINDS)}, "
                         f"got {kind!r}{suggest(kind, list(LENGTH_KINDS)) if kind is not None else ''}")
    check_keys(d, ("kind", *_LENGTH_KEYS[kind]), f"{where} (kind {kind!r})")
    for key in _LENGTH_REQUIRED[kind]:
        if key not in d:
            raise ValueError(f"{where}.{key} is required for kind {kind!r}")
    try:
        return LENGTH_KINDS[kind](**{k: v for k, v in d.items() if k != "kind"})
    except ValueError as e:  # "lognormal.mean must ..." -> "prompt_len.mean must ..."
        msg = str(e)
        raise ValueError(where + msg[len(kind):] if msg.startswith(kind + ".") else f"{where}: {msg}") from None


# ---------------------------------------------------------------- trace reader

@dataclass(frozen=True, slots=True, eq=False)
class Trace:
    """Rows of a trace file, arrivals re-based to 0 and scaled. Arrays are read-only."""
    path: str
    arrivals: np.ndarray        # float64 seconds, non-decreasing, arrivals[0] == 0
    prompt_lens: np.ndarray     # int64 >= 1
    output_lens: np.ndarray     # int64 >= 1
    clipped_outputs: int = 0    # rows whose num_decode_tokens was 0, raised to 1

    def __len__(self) -> int:
        return len(self.arrivals)


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        f = float(text)  # "374.0" is fine; "3.5", "nan", "abc" are not
        if not f.is_integer():
            raise
        return int(f)


def read_trace(path: str | os.PathLike[str], *, time_scale: float = 1.0, start: int = 0,
               limit: int | None = None, rate_scale: float | None = None) -> Trace:
    """Read rows [start, start+limit) of a trace CSV. Arrival times are re-based so the
    first kept row arrives at 0, then multiplied by `time_scale` (0.5 = twice as fast) or
    divided by `rate_scale` (2.0 = twice the rate); give one or the other.

    Rows up to the last kept one are validated, and errors name the file, the 1-based
    line number and the column. Times must be finite, >= 0 and non-decreasing (equal is
    fine); prompt lengths >= 1; output lengths >= 0, with 0 raised to 1 and counted."""
    path = os.fspath(path)
    time_scale = _real("time_scale", time_scale, low=0, strict=True)
    if rate_scale is not None:
        rate_scale = _real("rate_scale", rate_scale, low=0, strict=True)
        if time_scale != 1.0:
            raise ValueError(f"give time_scale or rate_scale, not both "
                             f"(got time_scale={time_scale:g}, rate_scale={rate_scale:g})")
    start = _int("start", start, 0)
    if limit is not None:
        limit = _int("limit", limit, 1)
    stop = math.inf if limit is None else start + limit

    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    clipped = 0
    num_rows = 0
    prev = 0.0
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file; expected a header with columns {', '.join(TRACE_COLUMNS)}")
        header = [h.strip() for h in header]
        for col in TRACE_COLUMNS:
            if col not in header:
                raise ValueError(f"{path}, line {reader.line_num}, column {col!r}: missing column "
                                 f"(header has: {', '.join(header)}){suggest(col, header)}")
        idx = [header.index(col) for col in TRACE_COLUMNS]
        for row in reader:
            if not row:  # blank line
                continue
            if num_rows >= stop:
                break
            line = reader.line_num
            cells = []
            for col, i in zip(TRACE_COLUMNS, idx):
                if i >= len(row) or not row[i].strip():
                    raise ValueError(f"{path}, line {line}, column {col!r}: missing value")
                cells.append(row[i])
            where = f"{path}, line {line}, column"
            try:
                t = float(cells[0])
            except ValueError:
                raise ValueError(f"{where} 'arrived_at': not a number: {cells[0]!r}") from None
            if not math.isfinite(t):
                raise ValueError(f"{where} 'arrived_at': time must be finite, got {cells[0]!r}")
            if t < 0:
                raise ValueError(f"{where} 'arrived_at': time must be >= 0, got {t:g}")
            if t < prev:
                raise ValueError(f"{where} 'arrived_at': time {t:g} is earlier than the previous "
                                 f"row's {prev:g} (times must be non-decreasing)")
            prev = t
            lens = []
            for col, text in zip(TRACE_COLUMNS[1:], cells[1:]):
                try:
                    lens.append(_parse_int(text))
                except ValueError:
                    raise ValueError(f"{where} {col!r}: not an integer: {text!r}") from None
            p, d = lens
            if p < 1:
                raise ValueError(f"{where} 'num_prefill_tokens': must be >= 1, got {p}")
            if d < 0:
                raise ValueError(f"{where} 'num_decode_tokens': must be >= 0, got {d}")
            if num_rows >= start:
                if d == 0:
                    clipped += 1
                    d = 1
                times.append(t)
                prompts.append(p)
                outputs.append(d)
            num_rows += 1

    if not times:
        if num_rows == 0:
            raise ValueError(f"{path}: no data rows")
        raise ValueError(f"start must be < the number of data rows in {path} ({num_rows}), got {start}")
    arrivals = np.asarray(times, dtype=np.float64)
    arrivals -= arrivals[0]
    if rate_scale is not None:
        arrivals /= rate_scale
    elif time_scale != 1.0:
        arrivals *= time_scale
    if clipped:
        warnings.warn(f"{path}: {clipped} of {len(times)} kept rows have num_decode_tokens = 0; "
                      f"raised to 1 (a request generates at least one token)", stacklevel=2)
    arrays = [arrivals, np.asarray(prompts, dtype=np.int64), np.asarray(outputs, dtype=np.int64)]
    for a in arrays:
        a.flags.writeable = False
    return Trace(path, *arrays, clipped_outputs=clipped)


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
