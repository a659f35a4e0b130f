"""How stages talk: process groups, metadata messages, activations, sampled tokens.

Three channels, each its own process group so that no two of them ever share a gloo
pair (and so a receiving thread on stage 0 never races the main thread's sends):
  data    the default group (nccl when every stage has its own GPU, else gloo):
          activations (hidden, residual) stage s -> s + 1, shapes known from metadata.
  ctrl    gloo, CPU: stage 0 -> every stage, one pickled `StepMeta` (or a control
          message) per micro-batch, as a length tensor then a uint8 payload; stages ->
          stage 0 for start-up (KV sizing) and trace collection.
  tokens  gloo, CPU: last stage -> stage 0, one int64 tensor [1 + samples] per
          micro-batch (batch id, then the sampled ids in item order).
Plain p2p send/recv of CPU tensors on gloo groups works the same under gloo and nccl
worlds (send_object_list would put metadata on the GPU under nccl, and blocks).
gloo's irecv().is_completed() never turns true before wait(), so stage 0 receives
tokens on a thread (`TokenReceiver`) and polls a Python queue instead.
"""
from __future__ import annotations

import datetime
import pickle
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from runtime.sampling import SamplingParams


@dataclass(slots=True)
class StepMeta:
    """What every stage needs to run one micro-batch (built by stage 0's scheduler)."""
    batch_id: int
    starts: list[int]                 # per item: first position computed
    lens: list[int]                   # per item: tokens computed
    pages: list[list[int]]            # per item: page ids covering start + len
    samples: list[bool]               # per item: does the last stage sample
    prefill_tokens: int               # for the trace rows (items carry no prefill flag)
    decode_tokens: int
    sample_ids: list[int]             # per sampling item: request id (sampler streams)
    sample_params: list[SamplingParams] | None = None  # per sampling item; None = all greedy
    release: tuple[int, ...] = ()     # finished request ids the sampler may forget

    @property
    def num_tokens(self) -> int:
        return sum(self.lens)

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)


@dataclass(slots=True)
class Groups:
    rank: int
    world: int
    data: Any      # ProcessGroup for activations
    ctrl: Any      # gloo ProcessGroup for metadata / control
    tokens: Any    # gloo ProcessGroup for sampled tokens


def init_groups(backend: str, timeout_s: float, device: torch.device | None = None) -> Groups:
    """env:// rendezvous (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE), then the two gloo
    side groups. Every rank must call this in the same order."""
    timeout = datetime.timedelta(seconds=timeout_s)
    kw: dict[str, Any] = {}
    if backend == "nccl" and device is not None:
        kw["device_id"] = device  # binds the communicator to this rank's GPU
    dist.init_process_group(backend, init_method="env://", timeout=timeout, **kw)
    ctrl = dist.new_group(backend="gloo", timeout=timeout)
    tokens = dist.new_group(backend="gloo", timeout=timeout)
    return Groups(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, ctrl, tokens)


def destroy_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class SendQueue:
    """Keeps in-flight async sends (and the tensors they read) alive. Sends older than
    `keep` launches are waited for: by then their receiver has consumed them (the window
    holds at most pp micro-batches), so the wait is free and errors still surface."""

    __slots__ = ("_launches", "_current", "keep")

    def __init__(self, keep: int) -> None:
        self._launches: deque[list[tuple[Any, torch.Tensor]]] = deque()
        self._current: list[tuple[Any, torch.Tensor]] = []
        self.keep = keep

    def add(self, work: Any, tensor: torch.Tensor) -> None:
        self._current.append((work, tensor))

    def close_launch(self) -> None:
        self._launches.append(self._current)
        self._current = []
        while len(self._launches) > self.keep:
            for work, _ in self._launches.popleft():
                work.wait()

    def drain(self) -> None:
        self.close_launch()
        while self._launches:
            for work, _ in self._launches.popleft():
                work.wait()


def _pack(obj: Any) -> tuple[torch.Tensor, torch.Tensor]:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return torch.tensor([len(data)], dtype=torch.long), torch.frombuffer(bytearray(data), dtype=torch.uint8)


def isend_obj(obj: Any, dsts: list[int], group: Any, sends: SendQueue) -> None:
    """Pickle once, send to every rank in `dsts` without blocking."""
    size, payload = _pack(obj)
    for dst in dsts:
        sends.add(dist.isend(size, dst, group=group), size)
        sends.add(dist.isend(payload, dst, group=group), payload)


def send_obj(obj: Any, dst: int, group: Any) -> None:
    size, payload = _pack(obj)
    dist.send(size, dst, group=group)
    dist.send(payload, dst, group=group)


def recv_obj(src: int, group: Any) -> Any:
    size = torch.empty(1, dtype=torch.long)
    dist.recv(size, src, group=group)
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(payload, src, group=group)
    return pickle.loads(payload.numpy().tobytes())


class TokenReceiver:
    """Stage 0's view of the last stage: a thread posts one blocking recv per launched
    micro-batch, in launch order (the pipeline is FIFO), and queues what arrives, so the
    scheduler loop never blocks on the last stage unless it chooses to wait."""

    def __init__(self, src: int, group: Any) -> None:
        self.src, self.group = src, group
        self._expect: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pipetwin-token-recv", daemon=True)
        self._thread.start()

    def expect(self, batch_id: int, num_samples: int) -> None:
        self._expect.put((batch_id, num_samples))

    def _run(self) -> None:
        while True:
            item = self._expect.get()
            if item is None:
                return
            batch_id, n = item
            buf = torch.empty(n + 1, dtype=torch.long)
            try:
                dist.recv(buf, self.src, group=self.group)
            except BaseException as e:  # noqa: BLE001 - handed to the scheduler thread
                self._done.put(e)
                return
            ids = buf.tolist()
            if ids[0] != batch_id:
                self._done.put(RuntimeError(f"tokens out of order: expected micro-batch {batch_id}, "
                                            f"stage {self.src} sent {ids[0]}"))
                return
            self._done.put((batch_id, ids[1:]))

    def get(self, timeout: float | None) -> tuple[int, list[int]] | None:
        """Next (batch id, sampled ids); None if nothing came within `timeout` seconds
        (0 = do not wait, None = wait as long as it takes)."""
        try:
            if timeout is not None and timeout <= 0:
                item = self._done.get_nowait()
            else:
                item = self._done.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise RuntimeError(f"receiving sampled tokens from stage {self.src} failed: {item}") from item
        return item

    def close(self) -> None:
        self._expect.put(None)
