"""The profiler's micro-batch shape grid, ordered most-informative-first, and the running
cost model that skips shapes predicted to overrun the time budget (profiles/measure/profiler.py).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any


# ------------------------------------------------------------------ the shape grid

@dataclass(frozen=True, slots=True)
class Shape:
    """One micro-batch: prefill chunks (start, tokens) and `decodes` decodes whose KV
    length after the token is `decode_ctx` on average: with `decode_spread` > 0 the
    lengths vary as serving's do (lognormal with that coefficient of variation, seeded
    by the shape, scaled so they sum to exactly decodes x decode_ctx: the table's
    feature is the sum)."""
    prefills: tuple[tuple[int, int], ...] = ()
    decodes: int = 0
    decode_ctx: int = 0
    decode_spread: float = 0.0

    def contexts(self) -> list[int]:
        """Each decode row's KV length after its token (each >= 1, summing to the feature)."""
        n, total = self.decodes, self.decodes * self.decode_ctx
        if n <= 1 or self.decode_spread <= 0:
            return [self.decode_ctx] * n
        import numpy as np
        rng = np.random.default_rng(n * 1_000_003 + self.decode_ctx)
        sigma2 = math.log1p(self.decode_spread ** 2)
        x = rng.lognormal(-sigma2 / 2, math.sqrt(sigma2), size=n)
        ctx = np.maximum(1, np.floor(x / x.sum() * total)).astype(np.int64)
        # hand the rounding remainder out (or take the excess back) one token at a time
        order = np.argsort(-x)
        i = 0
        while ctx.sum() != total:
            j = order[i % n]
            if ctx.sum() < total:
                ctx[j] += 1
            elif ctx[j] > 1:
                ctx[j] -= 1
            i += 1
        return [int(c) for c in ctx]

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n in self.prefills)

    @property
    def prefill_attention_work(self) -> int:   # core.batch: chunk x context after it
        return sum(n * (s + n) for s, n in self.prefills)

    @property
    def decode_context(self) -> int:           # core.batch: sum of (start + 1)
        return self.decodes * self.decode_ctx

    def features(self) -> tuple[int, int, int, int]:
        return (self.prefill_tokens, self.decodes, self.prefill_attention_work, self.decode_context)

    def items(self) -> tuple[list[int], list[int], list[bool]]:
        """(starts, lens, samples), decodes first then chunks (the runtime's item order)."""
        starts = [c - 1 for c in self.contexts()] + [s for s, _ in self.prefills]
        lens = [1] * self.decodes + [n for _, n in self.prefills]
        return starts, lens, [True] * len(lens)

    def pages_needed(self, page_size: int) -> int:
        starts, lens, _ = self.items()
        return sum(-(-(s + n) // page_size) for s, n in zip(starts, lens))

    def label(self) -> str:
        p = "+".join(f"p{n}@{s}" for s, n in self.prefills)
        d = f"d{self.decodes}x{self.decode_ctx}" if self.decodes else ""
        if d and self.decodes > 1 and self.decode_spread > 0:
            d += f"~{self.decode_spread:g}"      # varied contexts of that mean
        return "+".join(x for x in (p, d) if x)


@dataclass(frozen=True, slots=True)
class GridSpec:
    prefill_tokens: tuple[int, ...]     # chunk sizes (tokens of one prefill item)
    prefill_starts: tuple[int, ...]     # first position of a chunk (0: a fresh prompt)
    multi_chunk: tuple[tuple[int, int], ...]   # (total tokens, items) at start 0
    decode_tokens: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    decode_spread: float = 0.0          # CV of a row's decode contexts (0: all equal)


# Decode contexts vary like the Azure conversation trace's prompt lengths (CV 0.96,
# core.workloads.AZURE_CONV_PROMPT_CV): a serving step's rows never share one length, and
# on a GPU the attention cost depends on the spread, not only on the sum (issue 14).
VARIED_CONTEXTS_CV = 0.96
GRIDS: dict[str, GridSpec] = {
    "default": GridSpec((16, 64, 128, 256, 512, 1024), (0, 256, 1024), ((256, 4), (1024, 4), (2048, 8)),
                        (1, 4, 16, 32, 64), (64, 256, 1024), VARIED_CONTEXTS_CV),
    "small": GridSpec((16, 64, 128), (0, 64), ((128, 4),), (1, 4, 8), (16, 64), VARIED_CONTEXTS_CV),
}


def _log2p(x: float) -> float:
    return math.log2(1.0 + x)


def grid_shapes(name: str) -> list[Shape]:
    """Every shape of the grid (prefill option x decode option, minus the empty batch),
    most informative first: greedy farthest-point order in a log feature space (prefill
    tokens, decodes, chunk start, decode context, chunk count), from the cheapest shape."""
    import numpy as np

    g = GRIDS[name]
    prefill_opts: list[tuple[tuple[int, int], ...]] = [()]
    prefill_opts += [((s, n),) for n in g.prefill_tokens for s in g.prefill_starts]
    prefill_opts += [tuple((0, total // k) for _ in range(k)) for total, k in g.multi_chunk]
    decode_opts = [(0, 0)] + [(d, c) for d in g.decode_tokens for c in g.decode_contexts]
    shapes = [Shape(p, d, c, g.decode_spread) for p in prefill_opts for d, c in decode_opts if p or d]

    def feat(s: Shape) -> list[float]:
        start = statistics.mean(st for st, _ in s.prefills) if s.prefills else 0
        return [_log2p(s.prefill_tokens), _log2p(s.decodes), _log2p(start),
                _log2p(s.decode_ctx), math.log2(max(1, len(s.prefills)))]

    x = np.array([feat(s) for s in shapes])
    cost = np.array([s.prefill_attention_work + s.decode_context + 64 * (s.prefill_tokens + s.decodes)
                     for s in shapes], dtype=float)
    order = [int(np.argmin(cost))]
    dist = np.linalg.norm(x - x[order[0]], axis=1)
    dist[order[0]] = -1.0
    for _ in range(len(shapes) - 1):
        best = dist.max()
        # ties: the cheaper shape first
        i = int(min(np.flatnonzero(dist >= best - 1e-12), key=lambda j: cost[j]))
        order.append(i)
        dist = np.minimum(dist, np.linalg.norm(x - x[i], axis=1))
        dist[order] = -1.0
    return [shapes[i] for i in order]


class ShapeCostModel:
    """Rough seconds-per-shape predictor from the rows measured so far (to skip shapes
    that would overrun the budget): least squares on (1, tokens, attention work)."""

    def __init__(self) -> None:
        self.x: list[list[float]] = []
        self.y: list[float] = []
        self.coef: Any = None

    def add(self, shape: Shape, seconds: float) -> None:
        self.x.append(self._row(shape))
        self.y.append(seconds)
        if len(self.y) >= 4:
            import numpy as np
            coef = np.linalg.lstsq(np.array(self.x), np.array(self.y), rcond=None)[0]
            self.coef = np.maximum(coef, 0.0)

    @staticmethod
    def _row(s: Shape) -> list[float]:
        return [1.0, float(s.prefill_tokens + s.decodes), float(s.prefill_attention_work + s.decode_context)]

    def predict(self, shape: Shape) -> float | None:
        if self.coef is None:
            return None
        return float(sum(c * v for c, v in zip(self.coef, self._row(shape))))
