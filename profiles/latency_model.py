"""Latency model fitted per stage on a latency table, with its held-out error.

Per stage:  latency ~ c0 + c1*prefill_tokens + c2*decode_tokens
                      + c3*prefill_attention_work + c4*decode_context
                      + c5*max(0, knee_tokens - prefill_tokens - decode_tokens)
                      + c6*max(0, knee_decode - decode_tokens)
                      + c7*[prefill_tokens > 0]
                      + c8*min(prefill_tokens + decode_tokens, knee_small)
Why these features: linear layers (and KV writes, activations) cost per token, and a
prefill token costs what a decode token costs there except on the last stage, where only
decodes (and one row per prefill request) go through the LM head, hence two token
coefficients; prefill attention FLOPs scale with chunk x context (prefill_attention_work);
decode attention is a KV read that scales with the summed context (decode_context).
The hinges are the max(compute, memory) terms: below `knee_tokens` tokens the linear
layers are bound by reading their weights, so time stops falling with fewer tokens;
max(aT, W) = aT + a*max(0, W/a - T) exactly, so a hinge is linear in its coefficient once
its knee is fixed, and knees are found by 1-D searches. `knee_decode` is the same floor
for the LM head on the last stage (its rows are the decodes). c7 is a fixed cost of a
micro-batch that holds a prefill chunk, measured on CPU: in a running pipeline a stage's
forward of a 32-token chunk took 12.3-15.6 ms against 9.6-11.9 ms for the same shape
repeated alone, while decode batches matched (docs/benchmarks.md, "What the errors are
made of"); fitted, it is 3-4 ms on the CPU tables and ~0 on the analytical GPU ones. c8
makes the cost concave in tokens: the first `knee_small` tokens of a micro-batch cost c8
more each (small matrix products run less efficiently than big ones, beyond the weight-read
floor); measured on CPU in situ, small decode batches ran up to 9% over a model without it
and big mixed batches 6-14% under it. All coefficients are non-negative (no feature makes a
batch faster), fitted by NNLS on relative error, because the simulator cares about a 1 ms
decode step as much as a 1 s prefill.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from core.cost_model import search_largest_chunk
from profiles.schema import Profile, ProfileError, load_profile

FEATURES = ("prefill_tokens", "decode_tokens", "prefill_attention_work", "decode_context")
_KNEES = np.concatenate([[0.0], np.geomspace(4, 16384, 49)])


@dataclass(slots=True, frozen=True)
class FitError:
    """Absolute percentage errors as fractions (0.01 = 1%) on rows the fit never saw."""
    stage_mape: tuple[float, ...]
    stage_max_ape: tuple[float, ...]
    mape: float
    max_ape: float
    rows_evaluated: int
    held_out: bool                  # False when holdout=0: in-sample error, say so
    transfer_mape_in_sample: float  # 2-parameter fit on a short table: in-sample only

    def __str__(self) -> str:
        kind = "held-out" if self.held_out else "in-sample"
        stages = " ".join(f"s{i}={m:.2%}" for i, m in enumerate(self.stage_mape))
        return (f"{kind} MAPE {self.mape:.2%} (worst {self.max_ape:.2%}, "
                f"{self.rows_evaluated} rows; {stages}); transfer {self.transfer_mape_in_sample:.2%}")


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int = 100) -> np.ndarray:
    """Lawson-Hanson active set: min ||a x - b|| s.t. x >= 0 (small, dense problems)."""
    m, n = a.shape
    x, active = np.zeros(n), np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(float).eps * np.abs(a).sum(axis=0).max() * max(m, n)
    for _ in range(max_iter):
        w = a.T @ (b - a @ x)
        if active.all() or w[~active].max() <= tol:
            break
        active[np.argmax(np.where(active, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
            if z[active].min() > 0:
                x = z
                break
            # Step toward z until the first coordinate hits zero, then drop it.
            neg = active & (z <= 0)
            alpha = np.min(x[neg] / np.maximum(x[neg] - z[neg], 1e-300))
            x = x + alpha * (z - x)
            active &= x > tol
            x[~active] = 0.0
            if not active.any():
                break
    return x


def _design(df, knee_tokens: float, knee_decode: float, knee_small: float = 0.0) -> np.ndarray:
    dec = df["decode_tokens"].to_numpy(float)
    tokens = df["prefill_tokens"].to_numpy(float) + dec
    cols = [np.ones(len(df))] + [df[f].to_numpy(float) for f in FEATURES]
    has_chunk = (df["prefill_tokens"].to_numpy(float) > 0).astype(float)
    return np.column_stack(cols + [np.maximum(0.0, knee_tokens - tokens),
                                   np.maximum(0.0, knee_decode - dec), has_chunk,
                                   np.minimum(tokens, knee_small)])


def _fit_relative(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """NNLS on relative residuals with unit-scaled columns; returns (coef, sum sq rel err)."""
    a = x / y[:, None]
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    coef = nnls(a / scale, np.ones(len(y))) / scale
    return coef, float(np.sum((x @ coef / y - 1.0) ** 2))


def _search_knee(df, y: np.ndarray, knees: list[float], which: int) -> tuple[float, float]:
    """Best value for knees[which] (grid, then refined between the grid neighbours);
    returns (knee, sse). Ties go to the smallest knee, so data without a memory-bound
    floor (or without small-batch inefficiency) gets knee 0: that term is off."""
    def sse(k: float) -> float:
        trial = list(knees)
        trial[which] = k
        return _fit_relative(_design(df, *trial), y)[1]
    results = [(float(k), sse(k)) for k in _KNEES]
    i = min(range(len(results)), key=lambda j: results[j][1])
    if i > 0:
        hi = _KNEES[min(i + 1, len(_KNEES) - 1)]
        results += [(float(k), sse(k)) for k in np.linspace(_KNEES[i - 1], hi, 25)[1:-1]]
    best = min(r[1] for r in results)
    return min(r for r in results if r[1] <= best * (1 + 1e-6) + 1e-20)


def fit_stage(df) -> tuple[float, ...]:
    """(c0..c6, knee_tokens, knee_decode, c7, c8, knee_small) for one stage's rows. The
    second hinge, on decode tokens, is the LM head's weight-read floor on the last stage
    (logit rows are decodes, not all tokens); coordinate search: tokens knee, decode knee,
    tokens again, small-batch knee, tokens again."""
    y = df["latency_median"].to_numpy(float)
    knees = [0.0, 0.0, 0.0]
    for which in (0, 1, 0, 2, 0):
        knees[which] = _search_knee(df, y, knees, which)[0]
    coef = _fit_relative(_design(df, *knees), y)[0]
    knees = [k if c > 0 else 0.0 for k, c in zip(knees, (coef[5], coef[6], coef[8]))]
    return (tuple(float(c) for c in coef[:7]) + (knees[0], knees[1])
            + (float(coef[7]), float(coef[8]), knees[2]))


def _predict(coefs: tuple[float, ...], df) -> np.ndarray:
    return _design(df, coefs[7], coefs[8], coefs[11]) @ np.array(coefs[:7] + coefs[9:11])


@dataclass(slots=True)
class LatencyModel:
    coefs: tuple[tuple[float, ...], ...]   # per stage: c0..c6, knee_tokens, knee_decode, c7, c8, knee_small
    transfer_base_s: float
    transfer_s_per_byte: float
    sched_overhead: float                  # seconds per micro-batch (CPU scheduling)
    activation_bytes_per_token: int        # hidden x dtype bytes x 2 (hidden + residual)
    name: str = ""
    error: FitError | None = None
    stage_turnaround: tuple[float, ...] = ()   # per stage, busy after a row ends (meta; () = 0)
    sched_overhead_per_item: float = 0.0   # seconds per micro-batch item on top of sched_overhead

    def __post_init__(self) -> None:
        if not self.coefs or any(len(c) != 12 for c in self.coefs):
            raise ValueError("coefs needs one (c0..c6, knee_tokens, knee_decode, c7, c8, knee_small) per stage")
        if min(min(c) for c in self.coefs) < 0 or self.transfer_base_s < 0 \
                or self.transfer_s_per_byte < 0 or self.sched_overhead < 0 or self.sched_overhead_per_item < 0:
            raise ValueError("latency model coefficients must be non-negative")
        self.coefs = tuple(tuple(float(v) for v in c) for c in self.coefs)
        if self.stage_turnaround and (len(self.stage_turnaround) != len(self.coefs)
                                      or min(self.stage_turnaround) < 0):
            raise ValueError(f"stage_turnaround needs {len(self.coefs)} non-negative values, one per stage")
        self.stage_turnaround = tuple(float(v) for v in self.stage_turnaround)

    @property
    def pp(self) -> int:
        return len(self.coefs)

    def stage_time(self, stage: int, prefill_tokens: float, decode_tokens: float,
                   prefill_attention_work: float, decode_context: float) -> float:
        """One stage's predicted time (`stage_times` computes them all: the simulator's and
        the pricing's hot paths call that)."""
        return self.stage_times(prefill_tokens, decode_tokens, prefill_attention_work, decode_context)[stage]

    def stage_times(self, prefill_tokens: float, decode_tokens: float,
                    prefill_attention_work: float, decode_context: float) -> list[float]:
        """Every stage's predicted time, in one call: the simulator times each micro-batch
        on every stage and time_balanced prices candidates on the slowest, so a call per
        stage was a tenth of a trace-scale run (py-spy). Plain float math."""
        tokens = prefill_tokens + decode_tokens
        has_prefill = prefill_tokens > 0
        times = []
        for c0, c1, c2, c3, c4, c5, c6, knee_tokens, knee_decode, c7, c8, knee_small in self.coefs:
            t = (c0 + c1 * prefill_tokens + c2 * decode_tokens
                 + c3 * prefill_attention_work + c4 * decode_context)
            if has_prefill:
                t += c7
            t += c8 * (tokens if tokens < knee_small else knee_small)
            gap = knee_tokens - tokens
            if gap > 0.0:
                t += c5 * gap
            gap = knee_decode - decode_tokens
            if gap > 0.0:
                t += c6 * gap
            times.append(t)
        return times

    def predict(self, rows) -> np.ndarray:
        """stage_time of every row of a table with `stage` and the four feature columns
        (a stages.csv or a trace's batches), vectorised."""
        out = np.zeros(len(rows))
        stage = rows["stage"].to_numpy()
        for s, c in enumerate(self.coefs):
            mask = stage == s
            if mask.any():
                out[mask] = _predict(c, rows[mask])
        return out

    def activation_bytes(self, num_tokens: int) -> int:
        return num_tokens * self.activation_bytes_per_token

    def transfer_time(self, num_bytes: float) -> float:
        if num_bytes <= 0:
            return 0.0
        return self.transfer_base_s + num_bytes * self.transfer_s_per_byte


def _grows_with_prefill(coef: tuple[float, ...]) -> bool:
    """Whether a stage's time strictly rises with every prefill token added to a batch.
    Per token it gains c1, attention (c3 x context, >= 0) and c8 below the small-batch
    knee, and loses c5 below the tokens knee (the weight-read floor): rising needs c1 + c8
    > c5 below both knees and c1 > c5 between them. Strictly, so that rounding cannot make
    a flat stretch look like several crossings of a budget."""
    c1, c5, knee_tokens, c8, knee_small = coef[1], coef[5], coef[7], coef[10], coef[11]
    if not c1 > 0:
        return False
    if c5 == 0 or knee_tokens <= 0:
        return True
    return c1 + c8 > c5 and (knee_tokens <= knee_small or c1 > c5)


def _chunk_root(coef: tuple[float, ...], prefill_tokens: float, decode_tokens: float,
                prefill_attention_work: float, decode_context: float, start: int, budget: float) -> float:
    """The real n at which one stage's time, with a prefill chunk of n tokens starting at
    position `start` added to the batch, reaches `budget`; for a stage whose time rises with
    n (`_grows_with_prefill`). With the chunk in, that time is
        base + (c1 + c3 start) n + c3 n^2 + c8 min(T + n, knee_small) + c5 max(knee_tokens - T - n, 0)
    (T the batch's tokens), a quadratic on each stretch between the two knees: find the
    stretch whose end exceeds the budget and solve there."""
    c0, c1, c2, c3, c4, c5, c6, knee_tokens, knee_decode, c7, c8, knee_small = coef
    tokens = prefill_tokens + decode_tokens
    base = (c0 + c1 * prefill_tokens + c2 * decode_tokens + c3 * prefill_attention_work
            + c4 * decode_context + c7)   # c7: the batch holds a prefill once the chunk is in
    gap = knee_decode - decode_tokens
    if gap > 0.0:
        base += c6 * gap
    small_end, floor_end = knee_small - tokens, knee_tokens - tokens   # n where each knee is passed
    slope = c1 + c3 * start
    lo = 0.0
    for hi in sorted((small_end, floor_end, math.inf)):
        if hi <= lo:
            continue
        b, const = slope, base
        if lo < small_end:
            b, const = b + c8, const + c8 * tokens
        else:
            const += c8 * knee_small
        if lo < floor_end:
            b, const = b - c5, const + c5 * (knee_tokens - tokens)
        if hi == math.inf or (c3 * hi + b) * hi + const > budget:
            rest = budget - const
            # c3 n^2 + b n = rest, in the form that keeps precision when c3 n is small (b > 0 here)
            return 2.0 * rest / (b + math.sqrt(b * b + 4.0 * c3 * rest)) if rest > 0 else 0.0
        lo = hi
    return math.inf  # not reached: the last stretch is unbounded


class SlowestStage:
    """A latency model seen as core.cost_model.StageTimeModel: a batch shape's predicted time
    on its slowest stage. What the simulator and the runtime hand the scheduler, so a policy
    prices batches with the very model (or table) that times them. Any object with
    `stage_time(stage, *features)` works (the simulator's StageLatency)."""
    __slots__ = ("latency", "pp", "monotone", "_stage_times", "_solvable")

    def __init__(self, latency, pp: int | None = None) -> None:
        self.latency = latency
        self.pp = int(pp if pp is not None else latency.pp)
        if self.pp < 1:
            raise ValueError(f"SlowestStage needs pp >= 1, got {self.pp}")
        # core.cost_model.largest_chunk searches faster when the time never falls as a
        # prefill chunk grows
        self.monotone = isinstance(latency, LatencyModel) and all(map(_grows_with_prefill, latency.coefs))
        # every stage in one call where the model offers it (decided once: predict is a hot path)
        self._stage_times = latency.stage_times if isinstance(latency, LatencyModel) and latency.pp == self.pp \
            else None
        self._solvable = self.monotone and self._stage_times is not None

    def is_max_of(self, stage_times) -> bool:
        """Whether `predict(*shape)` is exactly `max(stage_times(*shape))`: then a caller that
        has a batch's stage times (the simulator times every batch) has its price too."""
        return self._stage_times is not None and self._stage_times == stage_times

    @classmethod
    def of_profile(cls, profile: Profile | str) -> "SlowestStage":
        """The fitted model of a latency table (shipped name, folder, or Profile)."""
        return cls(fit(profile)[0])

    def __getstate__(self):   # slots without __dict__: pickled to the runtime's stage 0
        return self.latency, self.pp

    def __setstate__(self, state) -> None:
        self.__init__(*state)

    def largest_chunk(self, prefill_tokens: float, decode_tokens: float, prefill_attention_work: float,
                      decode_context: float, start: int, cap: int, budget: float, floor: int = 0) -> int:
        """core.cost_model.largest_chunk for this model, where every stage's time rises with
        the chunk: solved in closed form (`_chunk_root`) for the stage slowest at the cap,
        then for any other stage still over the budget at that answer, and checked against
        `predict` itself (the answer fits, one token more does not), so rounding in the
        solve can never change an answer; any doubt goes to the search. Why: time_balanced
        asks this for ~60,000 chunks on the Azure conversation trace, and the search needed
        ~6 predictions for a cut chunk, against two stage-time rows, one root and one
        prediction here."""
        if cap <= floor:
            return cap
        if not self._solvable:
            return search_largest_chunk(self, prefill_tokens, decode_tokens, prefill_attention_work,
                                        decode_context, start, cap, budget, floor)
        coefs, stage_times = self.latency.coefs, self._stage_times
        shape = (prefill_tokens, decode_tokens, prefill_attention_work, decode_context)
        n = cap
        for _ in range(self.pp + 1):   # each round settles one stage; the last one checks
            times = stage_times(prefill_tokens + n, decode_tokens, prefill_attention_work + n * (start + n),
                                decode_context)
            worst = max(times)
            if worst <= budget:
                break
            # the slowest stage over the budget at n sets the next candidate; a stage within it
            # at n stays within it for every smaller chunk (its time rises)
            root = _chunk_root(coefs[times.index(worst)], *shape, start, budget)
            n = min(n - 1, int(root))
            if n <= floor:
                n = floor
                break
        else:
            n = -1   # not settled in pp rounds: search
        if n == cap:
            return cap   # the max of these very stage times is what predict gives
        if n >= floor and self.predict(prefill_tokens + n + 1, decode_tokens,
                                       prefill_attention_work + (n + 1) * (start + n + 1), decode_context) > budget:
            return n   # n fits (checked in the loop, or n is the floor) and n + 1 does not
        return search_largest_chunk(self, prefill_tokens, decode_tokens, prefill_attention_work,
                                    decode_context, start, cap, budget, floor)

    def predict(self, prefill_tokens: float, decode_tokens: float,
                prefill_attention_work: float, decode_context: float) -> float:
        if self._stage_times is not None:
            return max(self._stage_times(prefill_tokens, decode_tokens, prefill_attention_work, decode_context))
        stage_time = self.latency.stage_time
        return max([stage_time(s, prefill_tokens, decode_tokens, prefill_attention_work, decode_context)
                    for s in range(self.pp)])


def _fit_transfer(df) -> tuple[float, float, float]:
    if len(df) == 0:   # pp=1 tables may have no transfer rows: nothing is ever sent
        return 0.0, 0.0, 0.0
    x = df["bytes"].to_numpy(float)
    y = df["latency_median"].to_numpy(float)
    if len(np.unique(x)) < 2:
        base, per_byte = float(np.median(y)), 0.0
    else:
        base, per_byte = (float(c) for c in _fit_relative(np.column_stack([np.ones_like(x), x]), y)[0])
    mape = float(np.mean(np.abs((base + per_byte * x) / y - 1.0)))
    return base, per_byte, mape


def fit(profile: Profile | str, holdout: float = 0.2, seed: int = 0) -> tuple[LatencyModel, FitError]:
    """Fit per stage on a random (seeded) `1 - holdout` of each stage's rows and measure
    APE on the rest. The returned model is the one that was evaluated (not refitted on
    all rows), so the reported error is exactly its error on unseen shapes."""
    if not isinstance(profile, Profile):
        profile = load_profile(profile)
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    rng = np.random.default_rng(seed)
    coefs, mapes, worsts, n_eval = [], [], [], 0
    all_ape = []
    for stage in range(profile.pp):
        rows = profile.stages[profile.stages["stage"] == stage].reset_index(drop=True)
        n_test = max(1, round(holdout * len(rows))) if holdout > 0 else 0
        if len(rows) - n_test < 9:   # the linear coefficients; knees are 1-D searches
            raise ProfileError(f"{profile.name}: stage {stage} has {len(rows)} rows, too few "
                               f"to fit 9 coefficients with holdout={holdout}")
        perm = rng.permutation(len(rows))
        test = rows.iloc[perm[:n_test]] if n_test else rows
        c = fit_stage(rows.iloc[perm[n_test:]])
        ape = np.abs(_predict(c, test) / test["latency_median"].to_numpy(float) - 1.0)
        coefs.append(c)
        mapes.append(float(ape.mean()))
        worsts.append(float(ape.max()))
        all_ape.append(ape)
        n_eval += len(test)
    base, per_byte, t_mape = _fit_transfer(profile.transfer)
    ape = np.concatenate(all_ape)
    error = FitError(tuple(mapes), tuple(worsts), float(ape.mean()), float(ape.max()),
                     n_eval, holdout > 0, t_mape)
    cfg = profile.model_config
    model = LatencyModel(tuple(coefs), base, per_byte, float(profile.meta["sched_overhead_s"]),
                         cfg["hidden_size"] * profile.dtype_bytes * 2, profile.name, error,
                         tuple(profile.meta.get("stage_turnaround_s") or ()),
                         float(profile.meta.get("sched_overhead_per_item_s", 0.0)))
    return model, error
