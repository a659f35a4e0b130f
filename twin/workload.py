"""The requests a twin run replays: a core workload spec's requests (the simulator's, same
seed, same arrival times and lengths) and seeded random prompt token ids for them."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from core.request import Request
from core.workloads import Workload


def workload_requests(workload: dict[str, Any], seed: int) -> list[Request]:
    """Fresh requests (ids 0..n-1 in arrival order) of a workload spec."""
    return Workload.from_dict({**workload, "seed": seed}).requests()


def prompt_ids(requests: Sequence[Request], vocab: int, seed: int) -> list[list[int]]:
    """Random token ids of each request's prompt length, seeded (the same per seed)."""
    rng = np.random.default_rng([seed, 0x7E57])
    return [rng.integers(0, vocab, r.prompt_len).tolist() for r in requests]
