"""Sampling settings (`SamplingParams`, the one class the API, the pipeline messages and
the sampler share) and token sampling on the last stage: greedy, temperature, top-k, top-p.

Each request draws from its own torch.Generator, seeded from the request's seed (or the
sampler seed and request id), so a request's tokens do not depend on which other
requests share its micro-batches.
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
_SEED_RANGE = 2**64         # torch.Generator.manual_seed takes [-2**63, 2**64); negatives wrap the same way


FAILED = -1   # the token of a row that cannot be sampled (non-finite logits): its request fails alone


class Sampler:
    """Safe on the edges of its parameters: a temperature below TEMPERATURE_FLOOR samples
    greedily, top_k beyond the vocabulary is off, the top token survives any top_p, seeds
    are taken modulo 2**64 (the generator's range). A row whose logits are not finite (NaN,
    or no finite maximum) gets the token FAILED instead of garbage or an exception that
    would stop the stage: stage 0 ends that request with an error, the others go on."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._gens: dict[int, torch.Generator] = {}

    def _generator(self, request_id: int, params: SamplingParams,
                   device: torch.device) -> torch.Generator:
        g = self._gens.get(request_id)
        if g is None:
            seed = params.seed if params.seed is not None else self.seed * 1_000_003 + request_id
            g = self._gens[request_id] = torch.Generator(device=device).manual_seed(seed % _SEED_RANGE)
        return g

    def release(self, request_id: int) -> None:
        """Forget a finished request's generator."""
        self._gens.pop(request_id, None)

    def sample(self, logits: torch.Tensor, request_ids: Sequence[int],
               params: Sequence[SamplingParams] | SamplingParams = GREEDY) -> list[int]:
        """logits [S, vocab] (the last stage's output); one token per row."""
        n = logits.shape[0]
        if isinstance(params, SamplingParams):
            params = [params] * n
        if len(request_ids) != n or len(params) != n:
            raise ValueError(f"{n} logit rows but {len(request_ids)} request ids and "
                             f"{len(params)} sampling params")
        out = self.greedy(logits)
        rows = [i for i, p in enumerate(params)
                if not p.greedy and p.temperature >= TEMPERATURE_FLOOR and out[i] != FAILED]
        if not rows:
            return out
        vocab = logits.shape[1]
        idx = torch.tensor(rows, device=logits.device)
        sub = logits.index_select(0, idx).float()
        temp = torch.tensor([params[i].temperature for i in rows], device=logits.device)
        top_k = torch.tensor([min(params[i].top_k, vocab) or vocab for i in rows], device=logits.device)
        top_p = torch.tensor([params[i].top_p for i in rows], device=logits.device)
        scaled = sub / temp[:, None]
        # finite logits can still overflow once divided by a small temperature; on CUDA,
        # multinomial over such a row is a device-side assert that ends the process, not
        # the RuntimeError it is on CPU, so those rows are failed here
        finite = torch.isfinite(scaled.amax(dim=-1)).tolist()
        probs, order = filtered_probs(scaled, top_k, top_p)
        for j, i in enumerate(rows):
            if not finite[j]:
                out[i] = FAILED
                continue
            g = self._generator(request_ids[i], params[i], logits.device)
            try:
                pick = torch.multinomial(probs[j], 1, generator=g)
            except RuntimeError:   # no valid distribution left (inf/NaN after scaling)
                out[i] = FAILED
                continue
            out[i] = int(order[j, pick])
        return out

    @staticmethod
    def greedy(logits: torch.Tensor) -> list[int]:
        """The argmax of each row; FAILED where the row's maximum is not finite (max
        propagates NaN, so one NaN logit is enough)."""
        top, ids = logits.max(dim=-1)
        # one device-to-host copy (a GPU sync) per step, not a second for the failed rows
        return torch.where(torch.isfinite(top), ids, FAILED).tolist()


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
