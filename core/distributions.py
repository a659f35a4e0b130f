"""Arrival processes and length distributions for workloads (core.workloads).

Conventions (vLLM's serving benchmark):
- Arrival times are seconds, non-decreasing, and the FIRST REQUEST ARRIVES AT t=0; the
  n-1 gaps that follow have mean 1/rate. (The real traces start at 0 too.)
- `rate=float("inf")` (or the string "inf" in a config) sends every request at t=0,
  whatever the kind: the usual "max throughput" run.
- gamma gaps have shape `burstiness` and mean 1/rate, so their CV is 1/sqrt(burstiness):
  1 is Poisson, < 1 burstier, > 1 smoother.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from core.validation import check_keys, suggest

ARRIVAL_KINDS = ("poisson", "gamma", "constant", "all_at_once")


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
