"""How stages talk: process groups, metadata messages, activations, sampled tokens.

Channels, each its own process group, so that no group is ever used by two threads of
one process (stage 0 receives tokens on a thread; other stages receive on a thread):
  link[s]  ranks {s, s+1}; nccl when every stage has its own GPU, else gloo:
           activations stage s -> s + 1 as ONE tensor [2, T, hidden] (hidden, residual),
           T known from the metadata.
  ctrl     gloo, CPU: stage 0 -> every stage, one framed pickle per message (a
           `StepMeta` per micro-batch, or a control message).
  tokens   gloo, CPU: last stage -> stage 0, one int64 tensor [1 + samples] per
           micro-batch (batch id, then the sampled ids in item order).
  reply    gloo, CPU: stages -> stage 0, start-up (KV sizing) and trace rows.

Why so few, pre-posted messages: gloo p2p is receiver-driven (the bytes move once the
receiver has posted its recv, and every hop needs the transport threads to get a CPU),
so a recv posted late costs ~0.1-2 ms even for 100 bytes on a busy 2-core machine.
Metadata therefore travels as one framed message (a fixed-capacity buffer the receiver
posts ahead of time, with an overflow message only for huge batches), activations as
one tensor, and the receiving side keeps its next recv posted while it computes
(`Inbox` on stages >= 1, `TokenReceiver` on stage 0). Plain p2p of CPU tensors on gloo
groups works the same in gloo and nccl worlds (send_object_list would stage metadata
on the GPU under nccl, and blocks). gloo's irecv().is_completed() never turns true
before wait(), hence threads and Python queues rather than polling works.
"""
from __future__ import annotations

import datetime
import itertools
import pickle
import queue
import socket
import threading
from collections import deque
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from runtime.sampling import SamplingParams

FRAME_BYTES = 256 * 1024   # one ctrl message holds this much; more goes in a second one
_LEN = 8                   # little-endian payload length at the start of a frame


class PageRows(Sequence[memoryview]):
    """Per item page ids, end to end in one int32 buffer: how a StepMeta's pages travel
    to the other stages. Pickling 256 separate arrays cost ~0.5 us each on stage 0, whose
    CPU time a pp > 1 pipeline waits on (benchmarks/host_step.py, "pickle"); the items read
    back as memoryview slices (len, slicing, list() and b"".join work as on the arrays)."""
    __slots__ = ("flat", "counts", "_offsets")

    def __init__(self, flat: bytes, counts: list[int]) -> None:
        self.flat = memoryview(flat).cast("i")
        self.counts = counts
        self._offsets = list(itertools.accumulate(counts, initial=0))
        if self._offsets[-1] != len(self.flat):
            raise ValueError(f"page counts sum to {self._offsets[-1]}, the buffer holds {len(self.flat)} ids")

    @classmethod
    def of(cls, pages: Sequence[Sequence[int]]) -> "PageRows | None":
        """`pages` packed, or None when they are not all 4-byte id buffers (Python lists)."""
        try:
            joined = b"".join(pages)
        except TypeError:
            return None
        counts = [len(p) for p in pages]
        return cls(joined, counts) if len(joined) == 4 * sum(counts) else None

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self.counts)
        if not -n <= i < n:
            raise IndexError(f"item {i} of {n}")
        i %= n
        a = self._offsets[i]
        return self.flat[a:a + self.counts[i]]

    def __iter__(self):
        flat, offs = self.flat, self._offsets
        return (flat[a:b] for a, b in zip(offs, offs[1:]))

    def __reduce__(self):
        return (PageRows, (self.flat.tobytes(), self.counts))


@dataclass(slots=True)
class StepMeta:
    """What every stage needs to run one micro-batch (built by stage 0's scheduler)."""
    batch_id: int
    starts: list[int]                 # per item: first position computed
    lens: list[int]                   # per item: tokens computed
    pages: list[Sequence[int]]        # per item: page ids covering at least start + len (list or array('i'))
    samples: list[bool]               # per item: does the last stage sample
    prefill_tokens: int               # for the trace rows (items carry no prefill flag)
    decode_tokens: int
    sample_ids: list[int]             # per sampling item: request id (sampler streams)
    sample_params: list[SamplingParams] | None = None  # per sampling item; None = all greedy
    release: tuple[int, ...] = ()     # finished request ids the sampler may forget

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)

    def __reduce__(self):
        # the page lists travel as one buffer (PageRows) when they are arrays
        names = [f.name for f in fields(self)]
        vals = [getattr(self, name) for name in names]
        packed = self.pages if isinstance(self.pages, PageRows) else PageRows.of(self.pages)
        if packed is not None:
            vals[names.index("pages")] = packed
        return (StepMeta, tuple(vals))


@dataclass(slots=True)
class Groups:
    rank: int
    world: int
    links: list[Any]   # links[s]: ranks {s, s+1}, activations s -> s+1
    ctrl: Any          # gloo: stage 0 -> all, metadata / control
    tokens: Any        # gloo: last stage -> stage 0
    reply: Any         # gloo: stages -> stage 0, sizing and trace rows

    @property
    def prev(self) -> Any:
        return self.links[self.rank - 1]

    @property
    def next(self) -> Any:
        return self.links[self.rank]


def init_groups(backend: str, timeout_s: float, device: torch.device | None = None) -> Groups:
    """env:// rendezvous (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE), then the side
    groups. Every rank must call this, in the same order."""
    timeout = datetime.timedelta(seconds=timeout_s)
    kw: dict[str, Any] = {}
    if backend == "nccl" and device is not None:
        kw["device_id"] = device  # binds the communicator to this rank's GPU
    dist.init_process_group(backend, init_method="env://", timeout=timeout, **kw)
    world = dist.get_world_size()
    links = [dist.new_group([s, s + 1], backend=backend, timeout=timeout) for s in range(world - 1)]
    ctrl, tokens, reply = (dist.new_group(backend="gloo", timeout=timeout) for _ in range(3))
    return Groups(dist.get_rank(), world, links, ctrl, tokens, reply)


def destroy_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def destroy_groups_quietly() -> None:
    try:
        destroy_groups()
    except Exception:  # noqa: BLE001 - already failing; the original error matters
        pass


def free_port() -> int:
    """A free loopback port for an env:// rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# ---- framed pickles: [8-byte length][payload], FRAME_BYTES per message ----

def _frames(obj: Any) -> list[torch.Tensor]:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    buf = bytearray(len(data).to_bytes(_LEN, "little"))
    buf += data
    whole = torch.frombuffer(buf, dtype=torch.uint8)
    if len(buf) <= FRAME_BYTES:
        return [whole]
    return [whole[:FRAME_BYTES], whole[FRAME_BYTES:]]


def isend_obj(obj: Any, dsts: list[int], group: Any, sends: SendQueue) -> None:
    """Pickle once, send to every rank in `dsts` without blocking."""
    frames = _frames(obj)
    for dst in dsts:
        for f in frames:
            sends.add(dist.isend(f, dst, group=group), f)


def send_obj(obj: Any, dst: int, group: Any) -> None:
    for f in _frames(obj):
        dist.send(f, dst, group=group)


def recv_obj(src: int, group: Any) -> Any:
    # A recv buffer may be larger than the message: gloo fills its head.
    first = torch.empty(FRAME_BYTES, dtype=torch.uint8)
    dist.recv(first, src, group=group)
    n = int.from_bytes(first[:_LEN].numpy().tobytes(), "little")
    if _LEN + n <= FRAME_BYTES:
        return pickle.loads(first[_LEN:_LEN + n].numpy().tobytes())
    rest = torch.empty(_LEN + n - FRAME_BYTES, dtype=torch.uint8)
    dist.recv(rest, src, group=group)
    return pickle.loads(first[_LEN:].numpy().tobytes() + rest.numpy().tobytes())


# ---- receiving threads ----

class _Receiver:
    """A daemon thread running `step` in a loop, handing results over a queue; an
    exception ends the loop and is re-raised by `get` in the consuming thread."""

    def __init__(self, name: str) -> None:
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _loop(self) -> None:
        try:
            while self._step():
                pass
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
            self._done.put(e)

    def _step(self) -> bool:
        raise NotImplementedError

    def _get(self, timeout: float | None, what: str) -> Any:
        try:
            if timeout is not None and timeout <= 0:
                item = self._done.get_nowait()
            else:
                item = self._done.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise RuntimeError(f"{what} failed: {item}") from item
        return item


class TokenReceiver(_Receiver):
    """Stage 0's view of the last stage: one recv posted per launched micro-batch, in
    launch order (the pipeline is FIFO), so the scheduler loop never blocks on the last
    stage unless it chooses to wait."""

    def __init__(self, src: int, group: Any) -> None:
        super().__init__("pipetwin-tokens")
        self.src, self.group = src, group
        self._expect: queue.SimpleQueue = queue.SimpleQueue()
        self._thread.start()

    def expect(self, batch_id: int, num_samples: int) -> None:
        self._expect.put((batch_id, num_samples))

    def _step(self) -> bool:
        item = self._expect.get()
        if item is None:
            return False
        batch_id, n = item
        buf = torch.empty(n + 1, dtype=torch.long)
        dist.recv(buf, self.src, group=self.group)
        ids = buf.tolist()
        if ids[0] != batch_id:
            raise RuntimeError(f"tokens out of order: expected micro-batch {batch_id}, got {ids[0]}")
        self._done.put((batch_id, ids[1:]))
        return True

    def get(self, timeout: float | None) -> tuple[int, list[int]] | None:
        """Next (batch id, sampled ids); None if nothing came within `timeout` seconds
        (0 = do not wait, None = wait as long as it takes)."""
        return self._get(timeout, f"receiving sampled tokens from stage {self.src}")

    def close(self) -> None:
        self._expect.put(None)


class Inbox(_Receiver):
    """Stages >= 1: receives stage 0's messages and, for each micro-batch, prepares
    its attention metadata and (when `recv_acts` is given) receives its activations
    from the previous stage, while the main thread computes the batch before."""

    def __init__(self, group: Any, prepare: Callable[[StepMeta], Any],
                 recv_acts: Callable[[StepMeta], torch.Tensor] | None) -> None:
        super().__init__("pipetwin-inbox")
        self.group, self.prepare, self.recv_acts = group, prepare, recv_acts
        self._thread.start()

    def _step(self) -> bool:
        kind, payload = recv_obj(0, self.group)
        if kind != "batch":
            self._done.put((kind, payload, None, None))
            return kind not in ("stop", "abort")
        prepared = self.prepare(payload)
        acts = self.recv_acts(payload) if self.recv_acts is not None else None
        self._done.put((kind, payload, prepared, acts))
        return True

    def get(self) -> tuple[str, Any, Any, torch.Tensor | None]:
        return self._get(None, "receiving from stage 0 / the previous stage")
