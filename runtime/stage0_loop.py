"""Stage 0's scheduler cycle, written once (runtime.driver feeds it a generate job or
online commands): take new work, hand returned micro-batches to the core scheduler,
launch the next batch it decides (`step_meta`: its metadata for every stage, and the
token ids stage 0 embeds), and wait without spinning only when nothing can be launched."""
from __future__ import annotations

import time
from array import array
from typing import Any, Mapping, Sequence

from core.batch import MicroBatch
from core.scheduler import Scheduler
from runtime.comm import StepMeta
from runtime.sampling import SamplingParams


def page_list() -> array:
    """An empty page-id list as the runtime's requests keep it (the scheduler appends to
    it): array('i'), so a step's lists join into one int32 buffer by memcpy
    (runtime.batch_meta) and pickle as bytes for the other stages. Converting Python int
    lists cost ~13 ns a page id, 0.23 ms a step at 256 decode rows of ~1,000-token contexts
    (benchmarks/host_step.py)."""
    return array("i")


def step_meta(batch: MicroBatch, params: Sequence[SamplingParams] | Mapping[int, SamplingParams], greedy: bool,
              release: list[int], page_size: int) -> tuple[StepMeta, list[int]]:
    """The metadata every stage gets, and the packed token ids stage 0 embeds.

    Page lists are the requests' own when they hold exactly the pages this pass reads (the
    usual case), else a copy of those: the metadata is read at launch (built here, pickled
    for the other stages) before the scheduler runs again, and a request's list only ever
    grows, or is replaced when its pages are freed, so the pages it covers stay valid."""
    ps = page_size
    decodes = batch.decodes   # decodes first, then chunks: token order; one token each, all sample
    starts: list[int] = []
    pages: list = []
    ids: list[int] = []
    for r in decodes:   # the hot path (every row of a decode step): no item objects
        start = r.num_scheduled - 1
        starts.append(start)
        p = r.prompt_len
        ids.append(r.output_ids[start - p] if start >= p else r.prompt_ids[start])
        held, need = r.pages, start // ps + 1
        pages.append(held if len(held) == need else held[:need])
    lens, samples = [1] * len(decodes), [True] * len(decodes)
    sample_ids = [r.id for r in decodes]
    for it in batch.chunks:
        r, start, n = it.request, it.start, it.num_tokens
        end, p = start + n, r.prompt_len
        starts.append(start)
        lens.append(n)
        samples.append(it.samples)
        if it.samples:
            sample_ids.append(r.id)
        held, need = r.pages, -(-end // ps)
        pages.append(held if len(held) == need else held[:need])
        if start >= p:         # a decode-like item (or a recompute past the prompt)
            ids.extend(r.output_ids[start - p:end - p])
        else:                  # prompt, maybe running on into generated tokens (recompute)
            ids.extend(r.prompt_ids[start:end])
            if end > p:
                ids.extend(r.output_ids[:end - p])
    return StepMeta(
        batch_id=batch.id,
        starts=starts,
        lens=lens,
        pages=pages,
        samples=samples,
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
