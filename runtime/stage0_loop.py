"""Stage 0's scheduler cycle, written once (runtime.driver feeds it a generate job or
online commands): take new work, hand returned micro-batches to the core scheduler,
launch the next batch it decides (`step_meta`: its metadata for every stage, and the
token ids stage 0 embeds), and wait without spinning only when nothing can be launched."""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

from core.batch import MicroBatch
from core.scheduler import Scheduler
from runtime.comm import StepMeta
from runtime.sampling import SamplingParams


def step_meta(batch: MicroBatch, params: Sequence[SamplingParams] | Mapping[int, SamplingParams], greedy: bool,
              release: list[int], page_size: int) -> tuple[StepMeta, list[int]]:
    """The metadata every stage gets, and the packed token ids stage 0 embeds."""
    its, ps = batch.items, page_size  # decodes first, then chunks: token order
    sample_ids = [it.request.id for it in its if it.samples]
    ids: list[int] = []
    for it in its:
        r, end = it.request, it.start + it.num_tokens
        p = r.prompt_len
        if it.start >= p:      # a decode (or a recompute past the prompt)
            ids.extend(r.output_ids[it.start - p:end - p])
        else:                  # prompt, maybe running on into generated tokens (recompute)
            ids.extend(r.prompt_ids[it.start:end])
            if end > p:
                ids.extend(r.output_ids[:end - p])
    return StepMeta(
        batch_id=batch.id,
        starts=[it.start for it in its],
        lens=[it.num_tokens for it in its],
        # a copy of just the pages this pass reads: the request's list keeps growing
        pages=[it.request.pages[:-(-it.context_len // ps)] for it in its],
        samples=[it.samples for it in its],
        prefill_tokens=batch.prefill_tokens,
        decode_tokens=batch.decode_tokens,
        sample_ids=sample_ids,
        sample_params=None if greedy else [params[i] for i in sample_ids],
        release=tuple(release),
    ), ids


class Stage0Loop:
    """The scheduler cycle both kinds of work share. Subclasses give `params`/`greedy`
    and say where work comes from (`take_work`, `wait`) and where results go
    (`completed`, `after_completions`, `launched_row`)."""

    params: Sequence[SamplingParams] | Mapping[int, SamplingParams]

    def __init__(self, driver: Any, sched: Scheduler) -> None:   # driver: runtime.driver.Driver
        self.driver, self.pipe, self.sched = driver, driver.pipe, sched
        self.launched: dict[int, MicroBatch] = {}
        self.release: list[int] = []   # finished ids whose sampler state the last stage drops
        self.t0 = time.perf_counter()

    def clock(self) -> float:
        return time.perf_counter() - self.t0

    def run(self) -> None:
        while self.take_work():
            while (got := self.pipe.poll(0)) is not None:
                self.complete(got)
            self.after_completions()
            had_work = self.sched.has_work
            if had_work and self.launch_next():
                continue
            if not self.wait(had_work):
                return

    def launch_next(self) -> bool:
        start = self.clock()
        batch = self.sched.next_batch(start)
        if batch is None:
            return False
        self.launched[batch.id] = batch
        m, ids = step_meta(batch, self.params, self.greedy, self.release, self.driver.opts.page_size)
        self.release = []
        end = self.pipe.launch(m, ids) - self.t0
        self.launched_row(batch, start, end)
        return True

    def complete(self, got: tuple[int, list[int]]) -> None:
        self.completed(self.launched.pop(got[0]), got[1])

    # ---- what differs between a generate job and online serving ----
    @property
    def greedy(self) -> bool:
        raise NotImplementedError

    def take_work(self) -> bool:
        """Bring new requests in; False ends the loop."""
        raise NotImplementedError

    def completed(self, batch: MicroBatch, tokens: list[int]) -> None:
        raise NotImplementedError

    def after_completions(self) -> None:
        pass

    def launched_row(self, batch: MicroBatch, start: float, end: float) -> None:
        raise NotImplementedError

    def wait(self, had_work: bool) -> bool:
        """Nothing was launched: wait for a result or new work; False ends the loop."""
        raise NotImplementedError
