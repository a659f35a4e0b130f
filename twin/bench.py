"""`pipetwin bench`: the real runtime (runtime/) on a core workload; the trace is written
as a results folder identical in layout to `pipetwin sim`'s (twin.results), so the
simulator's and the hardware's runs compare file for file.

The workload is the simulator's (twin.workload): the same seed gives the same arrival
times and prompt/output lengths. On the runtime side every request is injected at its
arrival instant (`LLM.generate(arrival_times=...)`), generates exactly its output length
(ignore_eos, max_tokens = output length), and its prompt is random token ids of its
prompt length drawn from a generator seeded by the workload seed.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from core.request import Request
from core.trace import Trace
from runtime.model_specs import display_name
from runtime.telemetry import Sampler, Telemetry, stage_gpus
from twin.workload import prompt_ids


class Bench:
    """The runtime, started once (start-up and a warm-up are not part of any run)."""

    def __init__(self, model: Any, pp: int, policy: str = "token_throttling",
                 policy_params: dict[str, Any] | None = None, *, num_pages: int | None = None,
                 page_size: int = 16, layer_split: Any = None, num_threads: int | None = None,
                 seed: int = 0, device: str = "cpu", dtype: str | None = None,
                 attention_backend: str = "auto", enforce_eager: bool = False) -> None:
        from runtime import LLM, SamplingParams  # why: torch, loaded only when a bench runs

        self.SamplingParams = SamplingParams
        self.name = display_name(model)
        self.pp = pp
        self.llm = LLM(model, pp=pp, policy=policy, policy_params=policy_params, num_pages=num_pages,
                       page_size=page_size, layer_split=layer_split, num_threads=num_threads, seed=seed,
                       device=device, dtype=dtype, attention_backend=attention_backend,
                       enforce_eager=enforce_eager)
        self.llm.generate([[1] * 16] * 2, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up

    @property
    def num_pages(self) -> int:
        return self.llm.num_pages

    @property
    def page_size(self) -> int:
        return self.llm.config.page_size

    def run(self, requests: Sequence[Request], policy: str, policy_params: dict[str, Any] | None = None,
            seed: int = 0, stage_time_model: Any = None) -> Trace:
        """Replay `requests` (their lengths and arrival times) under `policy`; the runtime's
        trace. `stage_time_model`: what a policy that plans in seconds prices batches with."""
        llm = self.llm
        llm.set_policy(policy, policy_params, stage_time_model)
        prompts = prompt_ids(requests, llm.model_config.vocab_size, seed)
        params = [self.SamplingParams(max_tokens=r.max_output, ignore_eos=True) for r in requests]
        arrivals = [float(r.arrival) for r in requests]
        sampler = gpu_sampler(llm.config)
        t0 = time.perf_counter()
        with sampler:
            outs = llm.generate(prompts, params, arrival_times=arrivals)
        wall = time.perf_counter() - t0
        bad = [o.request_id for o, r in zip(outs, requests) if len(o.token_ids) != r.max_output]
        if bad:
            raise RuntimeError(f"requests {bad[:5]} did not generate their fixed output length")
        trace = llm.trace()
        trace.meta.update(num_pages=self.num_pages, page_size=self.page_size, seed=seed,
                          model=self.name,
                          wall_s=wall, source="runtime")
        if sampler.summary():       # GPU telemetry per stage device (NVML); absent on CPU
            trace.meta["telemetry"] = sampler.summary()
        return trace

    def shutdown(self) -> None:
        self.llm.shutdown()

    def __enter__(self) -> "Bench":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def gpu_sampler(opts: Any) -> Any:
    """runtime.telemetry.Sampler over the stages' GPUs (runtime.EngineConfig `opts`); on
    CPU one over no device, which records nothing."""
    return Sampler(Telemetry(cuda_indices=stage_gpus(opts)), interval_s=0.5)
