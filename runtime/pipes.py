"""Stage 0's pipes: where the driver launches a micro-batch and gets its sampled tokens.

`LocalPipe` runs the one stage in-process (pp = 1); `DistPipe` sends metadata to every
stage, computes stage 0 here, passes activations on and receives sampled tokens from the
last stage on a thread.
"""
from __future__ import annotations

import time
from collections import deque

import torch

from runtime.comm import Groups, SendQueue, StepMeta, TokenReceiver, destroy_groups_quietly, isend_obj, recv_obj
from runtime.worker import StageRunner


class LocalPipe:
    """pp = 1: the one stage computes and samples at launch; results wait in a deque."""

    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner
        self._done: deque[tuple[int, list[int]]] = deque()

    def launch(self, m: StepMeta, ids: list[int]) -> float:
        """Run the batch; returns the perf_counter time its result was handed off."""
        r = self.runner
        r.check_fault(m.batch_id)
        x = torch.tensor(ids, dtype=torch.long, device=r.device)
        logits = r.forward(x, r.build_meta(m))
        self._done.append((m.batch_id, r.sample(logits, m)))
        return time.perf_counter()

    def poll(self, timeout: float | None) -> tuple[int, list[int]] | None:
        return self._done.popleft() if self._done else None

    def collect(self) -> list[tuple]:
        self.runner.reset()
        return []

    def stream_rows(self) -> None:
        pass  # online serving: stage 0 records its own rows

    def close(self) -> None:
        pass


class DistPipe:
    """pp > 1 on stage 0: metadata to every stage at launch, stage 0's layers here,
    activations to stage 1, sampled tokens back from the last stage on a thread."""

    def __init__(self, runner: StageRunner, g: Groups) -> None:
        self.runner, self.g = runner, g
        self.others = list(range(1, g.world))
        self.sends = SendQueue(keep=g.world + 1)
        self.receiver = TokenReceiver(g.world - 1, g.tokens)
        self._closed = False

    def launch(self, m: StepMeta, ids: list[int]) -> float:
        r = self.runner
        isend_obj(("batch", m), self.others, self.g.ctrl, self.sends)  # stages prepare early
        self.receiver.expect(m.batch_id, m.num_samples)
        r.check_fault(m.batch_id)
        x = torch.tensor(ids, dtype=torch.long, device=r.device)
        hidden, residual = r.forward(x, r.build_meta(m))
        x = r.to_send(torch.stack((hidden, residual)))  # one message, not two: see runtime.comm
        r.sync()  # on GPU: the busy interval ends when the kernels are done
        end = time.perf_counter()  # before posting the send, as the other stages (runtime.worker)
        self.sends.add(torch.distributed.isend(x, 1, group=self.g.next), x)
        self.sends.close_launch()
        return end

    def poll(self, timeout: float | None) -> tuple[int, list[int]] | None:
        return self.receiver.get(timeout)

    def stream_rows(self) -> None:
        """Online serving: the other stages push their busy rows to the frontend."""
        isend_obj(("stream_rows", None), self.others, self.g.ctrl, self.sends)

    def collect(self) -> list[tuple]:
        """Every stage's busy rows of this generate call (epoch seconds)."""
        isend_obj(("collect", None), self.others, self.g.ctrl, self.sends)
        rows: list[tuple] = []
        for s in self.others:
            rows.extend(recv_obj(s, self.g.reply))
        self.sends.drain()
        self.runner.reset()
        return rows

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            isend_obj(("stop", None), self.others, self.g.ctrl, self.sends)
            self.sends.drain()
            self.receiver.close()
        finally:
            destroy_groups_quietly()
