"""Sampling settings (`SamplingParams`, the one class the API, the pipeline messages and
the sampler share) and token sampling on the last stage: greedy, temperature, top-k, top-p.

Each request's draws are a pure function of its seed (or the sampler seed and request
id), its draw count and the token ids (see `Sampler`), so a request's tokens do not
depend on which other requests share its micro-batches.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch


def is_int(x: Any) -> bool:
    """An int, not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """Per-request generation settings (vLLM names; greedy by default). The same object
    travels to the last stage, whose `Sampler` reads temperature, top_k, top_p and seed."""
    max_tokens: int = 16
    temperature: float = 0.0       # 0 = greedy
    top_p: float = 1.0             # 1 = off
    top_k: int = 0                 # 0 = off
    seed: int | None = None        # None: derived from the sampler seed and the request id
    ignore_eos: bool = False       # True: always generate max_tokens
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        def bad(field: str, want: str, value: Any) -> ValueError:
            return ValueError(f"SamplingParams.{field} must be {want}, got {value!r}")

        if not (is_int(self.max_tokens) and self.max_tokens >= 1):
            raise bad("max_tokens", "an int >= 1", self.max_tokens)
        if not (isinstance(self.temperature, numbers.Real) and not isinstance(self.temperature, bool)
                and math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", "a finite number >= 0", self.temperature)
        if not (isinstance(self.top_p, numbers.Real) and not isinstance(self.top_p, bool) and 0 < self.top_p <= 1):
            raise bad("top_p", "a number in (0, 1]", self.top_p)
        if not (is_int(self.top_k) and self.top_k >= 0):
            raise bad("top_k", "an int >= 0 (0 = off)", self.top_k)
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "an int or None", self.seed)
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "True or False", self.ignore_eos)
        ids = self.stop_token_ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not all(is_int(t) and t >= 0 for t in ids):
            raise bad("stop_token_ids", "a list of token ids (ints >= 0)", ids)
        # plain Python numbers: the sampler builds float tensors from them
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


GREEDY = SamplingParams()


TEMPERATURE_FLOOR = 1e-5    # below it sampling is greedy (vLLM's _SAMPLING_EPS): logits / t overflow
_SEED_RANGE = 2**64         # seeds are taken modulo 2**64 (negatives wrap): the hash key is 64 bits


FAILED = -1   # the token of a row that cannot be sampled (non-finite logits): its request fails alone


class Sampler:
    """Safe on the edges of its parameters: a temperature below TEMPERATURE_FLOOR samples
    greedily, top_k beyond the vocabulary is off, the top token survives any top_p, seeds
    are taken modulo 2**64. A row whose logits are not finite (NaN, or no finite maximum)
    gets the token FAILED instead of garbage or an exception that would stop the stage:
    stage 0 ends that request with an error, the others go on.

    Every row of a micro-batch is sampled at once, by inverse CDF over its (filtered)
    probabilities, and the tokens cross to the host in one copy. Each row's uniform is a
    counter-based hash of (the request's seed, its draw count), not a generator's stream:
    a request's tokens do not depend on which other requests share its micro-batches. A
    torch.Generator per request cost a multinomial launch and a device sync per row
    (estimated ~3-5 ms a step at 256 sampled rows on a GPU, against ~1-3 ms of model
    time); hashing a uniform per token instead (Gumbel-max) would read and write [rows,
    vocab] int64 a dozen times (~2 ms at 256 rows of a 128k vocabulary, by bandwidth)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._draws: dict[int, int] = {}   # request id -> tokens sampled so far (non-greedy)

    def release(self, request_id: int) -> None:
        """Forget a finished request's draw count."""
        self._draws.pop(request_id, None)

    def sample(self, logits: torch.Tensor, request_ids: Sequence[int],
               params: Sequence[SamplingParams] | SamplingParams = GREEDY) -> list[int]:
        """logits [S, vocab] (the last stage's output); one token per row."""
        n = logits.shape[0]
        if isinstance(params, SamplingParams):
            params = [params] * n
        if len(request_ids) != n or len(params) != n:
            raise ValueError(f"{n} logit rows but {len(request_ids)} request ids and "
                             f"{len(params)} sampling params")
        top, ids = logits.max(dim=-1)
        ok = torch.isfinite(top)
        rows = [i for i, p in enumerate(params) if not p.greedy and p.temperature >= TEMPERATURE_FLOOR]
        if rows:
            dev, vocab = logits.device, logits.shape[1]
            chosen = [params[i] for i in rows]
            seeds, draws = [], []
            for i, p in zip(rows, chosen):
                rid = request_ids[i]
                seed = p.seed if p.seed is not None else self.seed * 1_000_003 + rid
                seeds.append(_signed64(seed % _SEED_RANGE))
                draws.append(self._draws.get(rid, 0))
                self._draws[rid] = draws[-1] + 1
            # The rows' settings and uniforms (hashed on the host) cross to the device in one
            # copy: a copy from pageable memory waits for the stream, and a tensor each cost
            # five such waits a step. Row indices and top-k are exact in float64; temperature
            # and top-p round to float32 as a tensor of Python floats would.
            u = row_uniforms(torch.tensor(seeds), torch.tensor(draws))
            table = torch.tensor([rows, [min(p.top_k, vocab) or vocab for p in chosen],
                                  [p.temperature for p in chosen], [p.top_p for p in chosen]],
                                 dtype=torch.float64)
            table = torch.cat((table, u[None])).to(dev)
            idx, temp, u = table[0].long(), table[2].float(), table[4]
            scaled = logits.index_select(0, idx).float() / temp[:, None]
            if any(0 < p.top_k < vocab or p.top_p < 1 for p in chosen):
                probs, order = filtered_probs(scaled, table[1].long(), table[3].float())   # sorted by logit
            else:
                probs, order = scaled.softmax(dim=-1), None
            # inverse CDF: the first token whose cumulative probability reaches u x total
            # (> 0, so never a zero-probability token; rounded up to total, the last one kept)
            cdf = probs.cumsum(dim=-1)
            total = cdf[:, -1:]
            pick = torch.searchsorted(cdf, (u[:, None] * total).to(cdf.dtype))
            pick = pick.clamp_(max=vocab - 1).squeeze(1)
            picked = pick if order is None else order.gather(1, pick[:, None]).squeeze(1)
            # finite logits can still overflow once divided by a small temperature; such a
            # row (or one with no probability left) fails alone
            fine = torch.isfinite(scaled.amax(dim=-1)) & torch.isfinite(total[:, 0]) & (total[:, 0] > 0)
            ids = ids.index_put((idx,), picked)
            ok = ok.index_put((idx,), ok[idx] & fine)
        # one device-to-host copy (a GPU sync) per step
        return torch.where(ok, ids, FAILED).tolist()

    @staticmethod
    def greedy(logits: torch.Tensor) -> list[int]:
        """The argmax of each row; FAILED where the row's maximum is not finite (max
        propagates NaN, so one NaN logit is enough)."""
        top, ids = logits.max(dim=-1)
        # one device-to-host copy (a GPU sync) per step, not a second for the failed rows
        return torch.where(torch.isfinite(top), ids, FAILED).tolist()


# splitmix64 (Steele, Lea and Flood 2014): its increment and finalizer constants, as the
# signed int64 values torch holds; multiplies wrap modulo 2**64, shifts are made logical
# by masking off the sign bits an arithmetic shift copies in.
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _signed64(x: int) -> int:
    return x - 2**64 if x >= 2**63 else x


def _mix64_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer, in place on an int64 tensor."""
    z ^= (z >> 30) & ((1 << 34) - 1)
    z *= _MIX1
    z ^= (z >> 27) & ((1 << 37) - 1)
    z *= _MIX2
    z ^= (z >> 31) & ((1 << 33) - 1)
    return z


def row_uniforms(seeds: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """One uniform in (0, 1) per row (float64), a pure function of its (seed, draw):
    53 bits of splitmix64(splitmix64(seed ^ splitmix64((draw + 1) x golden)))."""
    key = _mix64_((draws.to(torch.int64) + 1) * _GOLDEN)
    key = _mix64_(_mix64_(key ^ seeds.to(torch.int64)))
    return ((key >> 11) & ((1 << 53) - 1)).to(torch.float64).add_(0.5).mul_(2.0 ** -53)


def filtered_probs(logits: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities over tokens sorted by logit (descending) after top-k and top-p, and
    the sort order mapping back to token ids. The top token always survives."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the ones ranked above it already cover top_p (never the top one:
    # a top_p that rounds to 0 in float32 keeps it)
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((before >= top_p[:, None]) & (rank > 0), 0.0)
    return probs, order
