"""A pipeline stage: its model slice, KV cache and sampler, and the loop stages 1..pp-1 run.

Stage 0 is driven by the scheduler loop (runtime.driver); stages 1..pp-1 run `serve`
(runtime.processes starts both): receive a micro-batch's metadata from stage 0, build the attention metadata
while the activations are still on their way, receive them from the previous stage,
compute, then pass activations on (or, on the last stage, sample and send the token ids
to stage 0). Each stage records one busy interval per micro-batch, in epoch seconds
(perf_counter + a per-process offset to time.time()), so stage 0 can place rows from
every process, on any node, on its own time axis.

Fault injection for tests: PIPETWIN_FAULT="stage=S,batch=B[,kind=raise|exit|nan]" makes
stage S raise (or exit with code 13 without a word, like a killed process) when it
reaches micro-batch B; `nan` (on the last stage) poisons micro-batch B's logits only, so
the requests it samples fail and the pipeline goes on.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from runtime.batch_meta import BatchMeta
from runtime.comm import Groups, Inbox, SendQueue, StepMeta, recv_obj, send_obj
from runtime.cuda_graphs import GraphRunner, GraphStep
from runtime.engine_config import EngineConfig
from runtime.kv_cache import NO_KV_LIMIT, KVCache, kv_bytes_per_page
from runtime.model import StageModel
from runtime.sampling import Sampler
from runtime.weights import load_stage

FAULT_ENV = "PIPETWIN_FAULT"


@dataclass(slots=True, frozen=True)
class Fault:
    stage: int
    batch: int
    kind: str = "raise"   # "raise": an exception; "exit": os._exit(13), no report; "nan": NaN logits once

    @classmethod
    def from_env(cls) -> "Fault | None":
        text = os.environ.get(FAULT_ENV, "").strip()
        if not text:
            return None
        try:
            kv = dict(part.split("=", 1) for part in text.split(","))
            fault = cls(int(kv["stage"]), int(kv["batch"]), kv.get("kind", "raise"))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{FAULT_ENV}={text!r}: expected 'stage=S,batch=B[,kind=raise|exit|nan]' ({e})") from None
        if fault.kind not in ("raise", "exit", "nan"):
            raise ValueError(f"{FAULT_ENV}: kind must be 'raise', 'exit' or 'nan', got {fault.kind!r}")
        return fault

    def poisons(self, stage: int, batch_id: int) -> bool:
        return self.kind == "nan" and stage == self.stage and batch_id == self.batch

    def check(self, stage: int, batch_id: int) -> None:
        if self.kind != "nan" and stage == self.stage and batch_id >= self.batch:
            if self.kind == "exit":
                os._exit(13)
            raise RuntimeError(f"injected fault ({FAULT_ENV}) at stage {stage}, micro-batch {batch_id}")


def epoch_offset() -> float:
    """time.time() - time.perf_counter(), best of a few reads (smallest bracket)."""
    best = None
    for _ in range(5):
        a = time.perf_counter()
        w = time.time()
        b = time.perf_counter()
        if best is None or b - a < best[0]:
            best = (b - a, w - (a + b) / 2)
    return best[1]


class StageRunner:
    """One stage's model slice, KV cache and (last stage) sampler. Used in-process by the
    driver for stage 0 and by `serve` in the other stage processes."""

    def __init__(self, opts: EngineConfig, stage: int) -> None:
        self.opts = opts
        self.stage, self.pp = stage, opts.pp
        self.device = torch.device(opts.stage_device(stage))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model: StageModel = load_stage(
            opts.model_path, stage, opts.pp, list(opts.layer_split), opts.load_format,
            opts.torch_dtype, self.device, opts.model_cfg, opts.seed)
        self.is_first, self.is_last = self.model.is_first, self.model.is_last
        self.cache: KVCache | None = None
        self.graphs: GraphRunner | None = None
        # one GPU shared by every stage (functional mode): activations cross via host memory
        self.host_comm = opts.backend == "gloo" and self.device.type == "cuda"
        self.sampler = Sampler(opts.seed)
        self.rows: list[tuple] = []           # (batch_id, stage, start, end, prefill, decode, nreq)
        self.offset = epoch_offset()
        self.fault = Fault.from_env()

    # ---- KV sizing ----
    def bytes_per_page(self) -> int:
        cfg = self.model.cfg
        # layers whose attention is here, not len(layers): an MLP half holds no KV
        return kv_bytes_per_page(self.opts.page_size, self.model.num_kv_layers, cfg.num_kv_heads,
                                 cfg.head_dim, self.model.dtype)

    def pages_that_fit(self) -> tuple[int, str]:
        """Pages this stage can hold, and how that was decided (for error messages)."""
        o = self.opts
        if o.num_pages is not None:
            return o.num_pages, "num_pages"
        per = self.bytes_per_page()
        if per == 0:
            return NO_KV_LIMIT, "no attention on this stage (only an MLP half), so no KV"
        if o.kv_cache_gib is not None:
            budget, how = o.kv_cache_gib * 2**30, f"kv_cache_gib={o.kv_cache_gib:g}"
        elif self.device.type == "cuda":
            # memory this process freed (an earlier engine's KV cache) stays reserved by
            # torch's caching allocator and counts as used in mem_get_info: release it
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            # leave (1 - utilization) of the whole GPU, and what is already used, alone
            budget = free - (1 - o.gpu_memory_utilization) * total
            how = (f"gpu_memory_utilization={o.gpu_memory_utilization:g} "
                   f"({free / 2**30:.2f} of {total / 2**30:.2f} GiB free after weights)")
            if o.shared_gpu:   # every stage sizes before any allocates: split the budget
                budget /= o.pp
                how += f", shared by {o.pp} stages"
        else:
            budget, how = 2**30, "the CPU default of 1 GiB per stage"
        return max(0, int(budget // per)), f"{how}, {per} bytes per page"

    def allocate(self, num_pages: int) -> None:
        o = self.opts
        self.cache = self.model.make_kv_cache(num_pages, o.page_size)
        # decode steps replay CUDA graphs (kernel backend on CUDA unless enforce_eager);
        # graphs cover contexts up to the model's positions, rows up to 256
        self.graphs = GraphRunner(self.model, self.cache, o.page_size, o.attention_backend,
                                  self.device, enforce_eager=o.enforce_eager or None,
                                  max_rows=256, max_context=o.model_cfg.max_position_embeddings)
        if self.graphs.use_graphs:
            # Every bucket now, while this is the process's only thread: captured lazily on
            # the compute thread of a stage >= 1, a graph would be invalidated ("operation not
            # permitted when stream is capturing") by the Inbox thread uploading a prefill's
            # metadata at the same time (pinned and device allocations, copies).
            cfg, dev = self.model.cfg, self.device
            example = (torch.zeros(1, dtype=torch.long, device=dev) if self.is_first else
                       tuple(torch.zeros(1, cfg.hidden_size, dtype=self.model.dtype, device=dev)
                             for _ in range(2)))
            self.graphs.capture_all(example)

    # ---- compute ----
    def now(self) -> float:
        return time.perf_counter() + self.offset

    def build_meta(self, m: StepMeta) -> BatchMeta | GraphStep:
        if self.device.type == "cuda" and torch.cuda.current_device() != self.device.index:
            # set_device is per thread: the Inbox thread of a stage on cuda:1 starts on
            # cuda:0, where its pinned uploads would open a second CUDA context
            torch.cuda.set_device(self.device)
        return self.graphs.build_meta(m.starts, m.lens, m.pages, m.samples)

    def forward(self, inputs: Any, meta: BatchMeta | GraphStep) -> Any:
        return self.graphs.forward(inputs, meta)

    def to_send(self, x: torch.Tensor) -> torch.Tensor:
        """Activations as sent: through host memory when stages share one GPU (gloo)."""
        return x.cpu() if self.host_comm else x

    def received(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device) if self.host_comm else x

    def sample(self, logits: torch.Tensor, m: StepMeta) -> list[int]:
        for rid in m.release:
            self.sampler.release(rid)
        if not m.sample_ids:
            return []
        if self.fault is not None and self.fault.poisons(self.stage, m.batch_id):
            logits = torch.full_like(logits, float("nan"))
        if m.sample_params is None:
            return self.sampler.greedy(logits)
        return self.sampler.sample(logits, m.sample_ids, m.sample_params)

    def record(self, m: StepMeta, start: float, end: float) -> None:
        self.rows.append((m.batch_id, self.stage, start, end, m.prefill_tokens, m.decode_tokens, len(m.lens)))

    def check_fault(self, batch_id: int) -> None:
        if self.fault is not None:
            self.fault.check(self.stage, batch_id)

    def reset(self) -> None:
        """End of a generate call: fresh sampler streams (request ids restart at 0)."""
        self.sampler = Sampler(self.opts.seed)
        self.rows = []

    def sync(self) -> None:
        if self.device.type == "cuda":  # busy intervals must end when the GPU is done
            torch.cuda.synchronize(self.device)


def serve(runner: StageRunner, g: Groups, events: Any = None) -> None:
    """Loop of stages 1..pp-1 until stage 0 says stop. The `Inbox` thread keeps the next
    metadata and activation receives posted while this thread computes (CPU; with nccl
    the activations are received here, on the compute thread's stream)."""
    s, last = runner.stage, runner.is_last
    hidden_size, dtype, device = runner.model.cfg.hidden_size, runner.model.dtype, runner.device

    host = device.type == "cpu" or runner.host_comm    # gloo: the receive lands in host memory

    def recv_acts(m: StepMeta) -> torch.Tensor:
        buf = torch.empty(2, m.num_tokens, hidden_size, dtype=dtype, device="cpu" if host else device)
        dist.recv(buf, s - 1, group=g.prev)
        return buf

    inbox = Inbox(g.ctrl, runner.build_meta, recv_acts if host else None)
    sends = SendQueue(keep=runner.pp + 1)
    stream_rows, last_push = False, 0.0   # online serving: rows go to the frontend now and then
    while True:
        kind, m, meta, acts = inbox.get()
        if kind == "batch":
            if acts is None:
                acts = recv_acts(m)
            acts = runner.received(acts)
            start = runner.now()
            runner.check_fault(m.batch_id)
            out = runner.forward((acts[0], acts[1]), meta)
            # The busy interval ends when the result is ready, before the send is posted: on a
            # shared CPU the process can be descheduled right after posting it (seen: the
            # token reached stage 0 ~3 ms before this stage got to read its clock).
            if last:
                ids = runner.sample(out, m)  # .tolist() waits for the GPU
                msg = torch.tensor([m.batch_id, *ids], dtype=torch.long)
                end = runner.now()
                sends.add(dist.isend(msg, 0, group=g.tokens), msg)
            else:
                x = runner.to_send(torch.stack(out))  # one message, not two: see runtime.comm
                runner.sync()
                end = runner.now()
                sends.add(dist.isend(x, s + 1, group=g.next), x)
            runner.record(m, start, end)
            sends.close_launch()
            if stream_rows and start - last_push > 0.5:
                events.put(("rows", runner.rows))
                runner.rows, last_push = [], start
        elif kind == "stream_rows":
            stream_rows = events is not None
        elif kind == "collect":
            sends.drain()
            send_obj(runner.rows, 0, g.reply)
            runner.reset()
        elif kind == "stop":
            sends.drain()
            return
        else:
            raise RuntimeError(f"stage {s}: unknown control message {kind!r}")


def negotiate_pages(runner: StageRunner, g: Groups) -> int:
    """Every stage sizes its KV cache; the minimum is used so one page table fits all."""
    fit, how = runner.pages_that_fit()
    if g.rank != 0:
        send_obj(("fit", (fit, how)), 0, g.reply)
        kind, n = recv_obj(0, g.ctrl)
        return n if kind == "kv" else 0
    fits = [(fit, how)] + [recv_obj(s, g.reply)[1] for s in range(1, g.world)]
    n = min(f for f, _ in fits)
    for s in range(1, g.world):
        send_obj(("kv", n) if n >= 1 else ("abort", 0), s, g.ctrl)
    if n < 1:
        worst = min(range(g.world), key=lambda s: fits[s][0])
        raise ValueError(f"KV cache: stage {worst} fits no page of {runner.opts.page_size} tokens "
                         f"({fits[worst][1]}); give num_pages or more KV memory")
    return n
