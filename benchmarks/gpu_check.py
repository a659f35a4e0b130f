"""One-command GPU check of the runtime (issue 14): one printed table, one results folder.

Sections (each a few rows of the table; --sections picks some):
  equality  greedy tokens vs Hugging Face transformers on the same device, tiny random
            Llama and Qwen2: LocalPipeline pp 1-3 (incl. a half-layer split), the engine
            (`LLM`, pp=1) with each policy, and pp=2 on one GPU (functional mode)
  kernel    the attention backend (triton where it loads) vs the torch reference on random
            paged caches, Llama-3-8B heads (32 query / 8 KV, head dim 128) in the run dtype:
            decode rows with varied contexts, a prefill chunk with earlier context
  steps     an 8-layer Llama-3-8B-shaped stage (embedding and LM head included: one stage
            of pp=4 plus both ends), dummy weights: decode steps of 1, 8, 32, 128 and 256
            rows with Azure-conversation-shaped contexts (CUDA graphs), and a mixed step of a
            1024-token prefill chunk + 64 decodes, each against profiles/analytical.py's
            roofline for the same shape on an H200 (goal <= 1.5x); then the sampler over
            256 rows of the model's vocabulary (greedy, temperature, top-p) and stage 0's
            host work per decode step (benchmarks/host_step.py on this machine's CPU)
  serve     `pipetwin profile` of that model -> `pipetwin sim` capacity at rate inf ->
            `pipetwin bench` at rate inf (goal: bench output tok/s >= 90% of sim's)
  validate  `pipetwin validate`, pp=1, three policies, loads 0.5x and 0.9x of the
            capacity the serve section's table gives its workload (simulated, all requests
            at t=0) and inf, calibrated
Device telemetry (runtime/telemetry.py, NVML) is sampled throughout and summarised in the
table; without NVML those rows are absent.

On the H200 (about 8 minutes):
    python benchmarks/gpu_check.py --out results/gpu_check
Quick CPU run of what a CPU can run (tiny shapes, no roofline verdicts; the test suite
runs this, tests/test_gpu_check.py):
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --device cpu --quick \\
        --sections equality,kernel,steps --out /tmp/gpu_check

The GPU machine has torch, pandas, matplotlib, transformers, safetensors, pytest and
nvidia-ml-py but not simpy (which `sim` and `validate` need) and nothing can be
downloaded there. Carry simpy as a wheel (it is pure Python), from the repository root:
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: -d .whl simpy==4.1.2
and on the GPU machine, before the check (with `.whl` carried along):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \\
        && export PYTHONPATH=/tmp/site:$PYTHONPATH
triton comes with the CUDA build of torch there; this repository is used in place
(`PYTHONPATH=.`), no install needed.
"""
from __future__ import annotations

import argparse
import csv
import faulthandler
import gc
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from runtime.attention import BACKENDS  # noqa: E402

POLICIES = ("token_throttling", "sarathi", "vllm")
SECTIONS = ("equality", "kernel", "steps", "serve", "validate")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GOAL_ROOFLINE = 1.5
STACK_DUMP_S = 150   # stacks while a section runs longer (serve and validate: the CLI wait)
# modules a section needs beyond torch: one that is missing skips the section at once with
# a row saying so, instead of failing after minutes (serve profiles for ~90 s before `sim`)
NEEDS = {"equality": ("transformers", "safetensors"), "serve": ("simpy", "pandas", "yaml"),
         "validate": ("simpy", "pandas", "matplotlib", "yaml"),
         "steps": ("pandas", "yaml")}   # the roofline comes from profiles/, which imports both
LLAMA3_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=8, num_attention_heads=32,
                 num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                 max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                 torch_dtype="bfloat16")
TINY = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, vocab_size=256,
            max_position_embeddings=2048, torch_dtype="float32")


@dataclass
class Row:
    section: str
    case: str
    value: str
    goal: str = ""
    status: str = ""       # ok | MISS | skipped | error | info


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[Row] = []
        self.kept: list[Row] = []   # --append: the rows of sections this run does not redo
        from runtime.attention import resolve_backend
        self.backend = resolve_backend(args.attention_backend, self.device)

    def add(self, *a: Any, **kw: Any) -> None:
        row = Row(*a, **kw)
        self.rows.append(row)
        print(f"  {row.section:<9} {row.case:<44} {row.value:<28} {row.goal:<10} {row.status}",
              flush=True)
        self.write()   # every row at once: a run stopped at its time limit keeps what it had

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- equality ------------------------------------------------------------------------
    def equality(self) -> None:
        import transformers

        from runtime.llm import LLM, SamplingParams
        from runtime.local import LocalPipeline
        prompts = [[5, 17, 99, 3, 200, 41, 7], [1, 2, 3], [250, 9, 14, 88, 120, 66, 31, 12, 190], [42]]
        new = 6
        common = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=256, max_position_embeddings=128,
                      initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        families = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
        for fam, (cfg_cls, model_cls) in families.items():
            torch.manual_seed(0)
            hf = model_cls(cfg_cls(**common, tie_word_embeddings=fam == "llama")).eval()
            path = self.out / "models" / fam
            hf.save_pretrained(path, safe_serialization=True)
            hf = hf.to(self.device)
            want = []
            for p in prompts:
                ids = torch.tensor([p], device=self.device)
                g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                do_sample=False, pad_token_id=0)
                want.append(g[0, len(p):].tolist())
            for pp, split in ((1, None), (2, None), (3, "1,2,1"), (2, "1.5,2.5")):
                case = f"{fam} LocalPipeline pp={pp}" + (f" split {split}" if split else "")
                self.guard("equality", case, lambda: self._local(
                    LocalPipeline, path, pp, split, prompts, new, want))
            for policy in POLICIES:   # the three the twin validates
                self.guard("equality", f"{fam} LLM pp=1 {policy}", lambda: self._llm(
                    LLM, SamplingParams, path, 1, policy, prompts, new, want))
            if self.device.type == "cuda" and fam == "llama":
                self.guard("equality", f"{fam} LLM pp=2 on one GPU (functional)", lambda: self._llm(
                    LLM, SamplingParams, path, 2, "token_throttling", prompts, new, want))

    def _local(self, cls, path, pp, split, prompts, new, want) -> tuple[str, str, str]:
        from core.batch import BatchItem, MicroBatch
        from core.kv_cache import PageAllocator
        from core.request import Request
        pipe = cls(path, pp=pp, split=split, device=self.device)
        alloc = PageAllocator(64, pipe.page_size)
        reqs = [Request(i, len(p), new, prompt_ids=list(p)) for i, p in enumerate(prompts)]
        for step in range(64):
            live = [r for r in reqs if len(r.output_ids) < new]
            if not live:
                break
            batch = MicroBatch(step, 0.0)
            for r in live:
                n = min(4, r.num_tokens - r.num_computed)
                r.pages += alloc.allocate(alloc.extra_pages(len(r.pages), r.num_computed + n))
                done = r.num_computed + n == r.num_tokens
                batch.add(BatchItem(r, r.num_computed, n, r.num_computed < r.prompt_len, done))
            out = pipe.run(batch)
            for it in batch.items:
                it.request.num_computed += it.num_tokens
            for r, row in zip([it.request for it in batch.items if it.samples], out):
                r.output_ids.append(int(row.argmax()))
                r.token_times.append(float(step))  # what Scheduler.complete records: the count
        got = [r.output_ids for r in reqs]
        return self._verdict(got, want)

    def _llm(self, llm_cls, sp_cls, path, pp, policy, prompts, new, want) -> tuple[str, str, str]:
        with llm_cls(str(path), pp=pp, policy=policy, device=str(self.device)) as llm:
            outs = llm.generate(prompts, sp_cls(max_tokens=new, ignore_eos=True))
        return self._verdict([list(o.token_ids) for o in outs], want)

    @staticmethod
    def _verdict(got, want) -> tuple[str, str, str]:
        same = sum(g == w for g, w in zip(got, want))
        return f"{same}/{len(want)} prompts equal", "all", "ok" if same == len(want) else "MISS"

    def guard(self, section: str, case: str, fn: Callable[[], tuple[str, str, str]]) -> None:
        """One row from fn's (value, goal, status); an exception becomes an error row."""
        try:
            value, goal, status = fn()
        except Exception as e:   # a check that cannot run says why, the others go on
            self.failed(section, case, e)
            return
        self.add(section, case, value, goal, status)

    def failed(self, section: str, case: str, e: Exception) -> None:
        """An error row for `e` (being handled), its traceback in OUT/errors.log."""
        with (self.out / "errors.log").open("a") as fh:
            fh.write(f"{section} {case}\n{traceback.format_exc()}\n")
        # one line: CUDA's messages (and a CLI failure's) go on over several, which would
        # break the table's row
        self.add(section, case, f"{type(e).__name__}: {' '.join(str(e).split())[:60]}", "", "error")

    # -- kernel vs reference ------------------------------------------------------------
    def kernel(self) -> None:
        from runtime.attention import BatchMeta, paged_attention
        quick = self.args.quick
        heads, kv_heads, d = (4, 2, 16) if quick else (32, 8, 128)
        page = 16
        rng = np.random.default_rng(0)
        tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[self.dtype]
        cases = [(f"decode {n} rows, varied contexts", [int(c) for c in self.contexts(n, rng)], None)
                 for n in ((1, 8) if quick else (1, 8, 32, 128, 256))]
        cases.append(("prefill chunk 64 after 300" if quick else "prefill chunk 1024 after 2000",
                      None, (300, 64) if quick else (2000, 1024)))
        for name, ctxs, chunk in cases:
            def run(ctxs=ctxs, chunk=chunk) -> tuple[str, str, str]:
                if chunk is not None:
                    starts, lens = [chunk[0]], [chunk[1]]
                else:
                    starts, lens = [c - 1 for c in ctxs], [1] * len(ctxs)
                need = [-(-(s + n) // page) for s, n in zip(starts, lens)]
                perm = rng.permutation(sum(need) + 1)
                pages, i = [], 0
                for k in need:
                    pages.append(perm[i:i + k].tolist())
                    i += k
                g = torch.Generator(device="cpu").manual_seed(1)
                shape = (sum(need) + 1, page, kv_heads, d)
                kc = torch.randn(shape, generator=g).to(self.device, self.dtype)
                vc = torch.randn(shape, generator=g).to(self.device, self.dtype)
                t = sum(lens)
                q, k, v = (torch.randn(t, h, d, generator=g).to(self.device, self.dtype)
                           for h in (heads, kv_heads, kv_heads))
                samples = [True] * len(lens)
                ref_meta = BatchMeta.build(starts, lens, pages, samples, page, self.device)
                ref = paged_attention(q.float(), k.float(), v.float(), kc.float(), vc.float(), ref_meta)
                meta = BatchMeta.build(starts, lens, pages, samples, page, self.device,
                                       backend=self.backend)
                out = paged_attention(q, k, v, kc.clone(), vc.clone(), meta)
                err = (out.float() - ref).abs().max().item()
                return (f"{self.backend}: max abs diff {err:.1e}", f"<= {tol:.0e}",
                        "ok" if err <= tol else "MISS")
            self.guard("kernel", name, run)

    def contexts(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Decode contexts shaped like the Azure conversation trace (prompt + part of the
        output; a tenth of the lengths with --quick)."""
        from core.distributions import LogNormal
        from core.workloads import AZURE_CONV_OUTPUT_CV, AZURE_CONV_PROMPT_CV
        k = 10 if self.args.quick else 1
        p = LogNormal(1155 / k, AZURE_CONV_PROMPT_CV, min=4, max=6000 // k).sample(n, rng)
        o = LogNormal(211 / k, AZURE_CONV_OUTPUT_CV, min=1, max=1500 // k).sample(n, rng)
        return np.asarray([int(a) + int(b * rng.uniform()) + 1 for a, b in zip(p, o)])

    # -- stage steps vs roofline ----------------------------------------------------------
    def steps(self) -> None:
        # Long on purpose: one model and cache set up once, then every measured step shape
        # (decode rows, the mixed step) against its roofline, in the order of the table.
        from profiles import specs
        from profiles.analytical import stage_latency
        from runtime.config import ModelConfig
        from runtime.cuda_graphs import GraphRunner
        from runtime.model import StageModel
        quick = self.args.quick
        cfg_d = dict(TINY if quick else LLAMA3_8B)
        cfg = ModelConfig.from_hf(cfg_d)
        torch.manual_seed(0)
        model = StageModel(cfg, 0, 1, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        page = 16
        rng = np.random.default_rng(0)
        rows_list = (1, 8) if quick else (1, 8, 32, 128, 256)
        mixed = (32, 4) if quick else (1024, 64)
        ctx_sets = {n: self.contexts(n, rng) for n in rows_list}
        dec_ctx = self.contexts(mixed[1], rng)
        total_pages = sum(int(-(-c.max() // page)) * len(c) for c in ctx_sets.values()) \
            + int(-(-dec_ctx.max() // page)) * mixed[1] + mixed[0] // page + 8
        total_pages = min(total_pages, 60000)
        kv = model.make_kv_cache(total_pages, page)
        max_ctx = int(max(c.max() for c in ctx_sets.values()))
        # on CPU (no capture) the decode steps still take the graphs' static-buffer path
        runner = GraphRunner(model, kv, page, self.backend, self.device,
                             enforce_eager=self.args.enforce_eager, max_rows=max(rows_list),
                             max_context=max(max_ctx, int(dec_ctx.max())) + 1)
        gpu = specs.GPUS["h200"]
        roof_cfg = dict(cfg_d, head_dim=cfg.head_dim)
        reps = 3 if quick else 20

        def pages_for(ctxs: np.ndarray) -> list[list[int]]:
            free = rng.permutation(total_pages).tolist()
            out, i = [], 0
            for c in ctxs:
                k = -(-int(c) // page)
                out.append(free[i:i + k])
                i += k
            return out

        def time_step(starts, lens, pages) -> float:
            samples = [True] * len(lens)
            ids = torch.randint(0, cfg.vocab_size, (sum(lens),), device=self.device)

            def once():
                meta = runner.build_meta(starts, lens, pages, samples)
                return runner.forward(ids, meta)
            once()
            once()
            self.sync()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                once()
                self.sync()
                ts.append(time.perf_counter() - t0)
            spreads.append((sum(lens), np.percentile(ts, 90) / np.percentile(ts, 10) - 1))
            return statistics.median(ts)

        def verdict(t: float, roof: float) -> tuple[str, str]:
            if self.device.type != "cuda":
                return f"{t * 1e3:.2f} ms (no roofline on cpu)", "info"
            r = t / roof
            return f"{t * 1e3:.2f} ms = {r:.2f}x roofline", "ok" if r <= GOAL_ROOFLINE else "MISS"

        layers = cfg.num_layers
        spreads: list[tuple[int, float]] = []    # (tokens, p90 / p10 - 1) of each step's repeats
        for n in rows_list:
            ctxs = ctx_sets[n]

            def run(n=n, ctxs=ctxs) -> tuple[str, str, str]:
                t = time_step([int(c) - 1 for c in ctxs], [1] * n, pages_for(ctxs))
                roof = stage_latency(roof_cfg, gpu, layers, True, True, 0, n, 0, float(ctxs.sum()))
                value, status = verdict(t, roof)
                return value, f"<= {GOAL_ROOFLINE}x", status
            self.guard("steps", f"decode {n} rows (ctx mean {ctxs.mean():.0f}, max {ctxs.max()})", run)

        def run_mixed() -> tuple[str, str, str]:
            p, nd = mixed
            starts = [0] + [int(c) - 1 for c in dec_ctx]
            lens = [p] + [1] * nd
            pages = pages_for(np.concatenate([[p], dec_ctx]))
            t = time_step(starts, lens, pages)
            roof = stage_latency(roof_cfg, gpu, layers, True, True, p, nd, p * p, float(dec_ctx.sum()))
            value, status = verdict(t, roof)
            return value, f"<= {GOAL_ROOFLINE}x", status
        self.guard("steps", f"mixed {mixed[0]} prefill + {mixed[1]} decodes", run_mixed)
        if spreads:
            worst = max(spreads, key=lambda x: x[1])
            ok = "ok" if worst[1] <= 0.10 else ("MISS" if self.device.type == "cuda" else "info")
            self.add("steps", "same step repeated: p90 / p10 - 1, worst",
                     f"{worst[1]:.1%} (a step of {worst[0]} tokens)", "<= 10%", ok)
        self.add("steps", "graph replays / eager steps", f"{runner.replays} / {runner.eager_steps}",
                 "", "info")
        big = max(rows_list)
        self.guard("steps", f"sampling {big} rows, vocab {cfg.vocab_size}: greedy / t 0.8 / + top_p 0.95",
                   lambda: self.sampling_times(big, cfg.vocab_size, reps))
        self.guard("steps", f"host work per decode step, {big} rows (benchmarks/host_step.py)",
                   lambda: self.host_step(big, max(max_ctx, int(dec_ctx.max())) + 1))
        if self.device.type == "cuda" and self.backend == "triton":
            self.guard("steps", "compiled attention variants (kernel, steps)", self.kernel_variants)

    def sampling_times(self, rows: int, vocab: int, reps: int) -> tuple[str, str, str]:
        """Median ms of Sampler.sample over `rows` rows of float32 logits: the whole batch
        at once, one copy to the host (it was a generator, a launch and a sync per row)."""
        from runtime.sampling import Sampler, SamplingParams
        g = torch.Generator(device=self.device).manual_seed(0)
        logits = torch.randn(rows, vocab, generator=g, device=self.device) * 4
        out = []
        for params in (SamplingParams(), SamplingParams(temperature=0.8),
                       SamplingParams(temperature=0.8, top_p=0.95)):
            sampler, ts = Sampler(), []
            for i in range(reps + 2):
                self.sync()
                t0 = time.perf_counter()
                sampler.sample(logits, list(range(rows)), params)   # ends with the host copy
                ts.append(time.perf_counter() - t0)
            out.append(statistics.median(ts[2:]) * 1e3)
        return " / ".join(f"{t:.2f}" for t in out) + " ms", "", "info"

    def host_step(self, rows: int, max_context: int) -> tuple[str, str, str]:
        """Stage 0's CPU work per decode step on the graph path (scheduler, metadata, the
        pinned copy), which a pp = 1 engine adds to each GPU step: this machine's CPU."""
        import importlib.util
        spec = importlib.util.spec_from_file_location("host_step", ROOT / "benchmarks" / "host_step.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        r = mod.measure(rows, 50 if self.args.quick else 200, 1000, max(max_context, 2048), 16, False)
        return f"{r['pp1_total']:.0f} us (pickle for pp > 1: {r['pickle']:.0f} us)", "", "info"

    def kernel_variants(self) -> tuple[str, str, str]:
        """What the driver loaded, against benchmarks/triton_resources.py's offline figures:
        few variants (metadata segments 16-byte aligned) and no spills."""
        from runtime.triton_attention import compiled_variants
        v = compiled_variants()
        if not v or any(x["regs"] is None for x in v):
            return "not readable from this triton's cache", "", "info"
        spills = max(int(x["spills"] or 0) for x in v)
        return (f"{len(v)} variants, {min(x['regs'] for x in v)}-{max(x['regs'] for x in v)} registers, "
                f"n_spills max {spills}", "no spills", "ok" if spills == 0 else "MISS")

    # -- profile -> sim -> bench, validate --------------------------------------------------
    def cli(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`pipetwin ARGV`; its output goes to OUT/logs/<command>.log, and a failure raises
        with the last line it printed (a one-shot GPU run must say why, not only the exit code)."""
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        log = self.out / "logs" / f"{argv[0]}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        res = subprocess.run([sys.executable, "-m", "cli", *argv], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=timeout)
        log.write_text(f"$ pipetwin {' '.join(argv)}\n{res.stdout}\n--- stderr ---\n{res.stderr}")
        if res.returncode != 0:
            lines = [ln for ln in res.stderr.splitlines() if ln.strip()] or ["(no output)"]
            raise RuntimeError(f"{lines[-1].strip()} (pipetwin {argv[0]} exit {res.returncode}, "
                               f"see {log})\n" + "\n".join(lines[-40:]))
        return res

    def model_arg(self) -> str:
        cfg = dict(TINY if self.args.quick else LLAMA3_8B, torch_dtype=self.args.dtype)
        path = self.out / "stage_model" / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg))
        return f"dummy:{path}"

    def serve(self) -> None:
        model = self.model_arg()
        dev = ["--device", self.args.device, "--dtype", self.args.dtype]
        table = self.out / "profile"
        sim_out, bench_out = self.out / "sim_inf", self.out / "bench_inf"
        n = "16" if self.args.quick else "400"
        state: dict[str, float] = {}

        def profile() -> tuple[str, str, str]:
            self.cli("profile", "--model", model, *dev, "--time-budget",
                     "20" if self.args.quick else "90", "--out", str(table), "--force", "--no-progress")
            return f"table {table.name}", "", "ok"

        def sim() -> tuple[str, str, str]:
            self.cli("sim", "--profile", str(table), "--rate", "inf", "--num-requests", n,
                     "--out", str(sim_out))
            s = json.loads((sim_out / "summary.json").read_text())
            state["sim"] = s["output_tps"]
            return f"{s['output_tps']:.0f} output tok/s, {s['throughput_rps']:.2f} req/s", "", "info"

        def bench() -> tuple[str, str, str]:
            self.cli("bench", "--model", model, *dev, "--rate", "inf", "--num-requests", n,
                     "--out", str(bench_out))
            s = json.loads((bench_out / "summary.json").read_text())
            ratio = s["output_tps"] / state["sim"]
            return (f"{s['output_tps']:.0f} output tok/s = {ratio:.0%} of sim", ">= 90%",
                    "ok" if ratio >= 0.9 else "MISS")
        for name, fn in (("profile (8-layer stage)", profile), ("sim at rate inf", sim),
                         ("bench at rate inf", bench)):
            self.guard("serve", name, fn)

    def validate_workload(self) -> dict[str, Any]:
        quick = self.args.quick
        return {"num_requests": 16 if quick else 120,
                "arrival": {"kind": "gamma", "burstiness": 1.0},
                "prompt_len": {"kind": "lognormal", "mean": 100 if quick else 600, "spread": 0.96, "max": 4096},
                "output_len": {"kind": "lognormal", "mean": 16 if quick else 128, "spread": 0.77, "max": 512}}

    def validate(self) -> None:
        table, workload = self.out / "profile", self.validate_workload()
        state: dict[str, float] = {}

        def capacity() -> tuple[str, str, str]:
            # The loads are fractions of what the table says the engine serves of THIS
            # workload: the serve section's capacity is of the default workload (prompts
            # ~1,150, outputs ~210 tokens), ~2x the work a request here, and in --quick ~15x,
            # which put "0.9x" at a mostly idle engine (measured on CPU: 2% of capacity).
            if not table.is_dir():
                raise RuntimeError(f"needs the profile table the serve section measures ({table})")
            from sim import SimConfig, simulate
            at_once = dict(workload, arrival={**workload["arrival"], "rate": "inf"})
            state["cap"] = simulate(SimConfig(profile=str(table), workload=at_once)).summary["throughput_rps"]
            return (f"{state['cap']:.2f} req/s ({workload['num_requests']} requests at t=0, Token Throttling)",
                    "", "info")

        def run() -> tuple[str, str, str]:
            if "cap" not in state:
                raise RuntimeError("no simulated capacity to set the loads (the row above)")
            cap = state["cap"]
            spec = {
                "name": "gpu_check_validate", "model": self.model_arg(), "pp": 1,
                "profile": str(table), "device": self.args.device,
                "dtype": self.args.dtype, "page_size": 16, "seed": 0, "workload": workload,
                "loads": [round(0.5 * cap, 3), round(0.9 * cap, 3), "inf"],
                "calibrate": {"seed": 1}, "repeats": 1,
                "policies": [{"name": "token_throttling", "label": "token_throttling"},
                             {"name": "sarathi", "label": "sarathi-512", "params": {"budget": 512}},
                             {"name": "vllm", "label": "vllm"}],
                "out": str(self.out / "validate"),
            }
            import yaml
            path = self.out / "validate.yaml"
            path.write_text(yaml.safe_dump(spec, sort_keys=False))
            self.cli("validate", str(path), timeout=1200)
            return f"report {self.out / 'validate' / 'report.md'}", "goals in report", "info"
        self.guard("validate", "simulated capacity of its workload", capacity)
        self.guard("validate", "pp=1, 3 policies, 0.5x/0.9x/inf", run)
        errors = self.out / "validate" / "errors.csv"
        if errors.is_file():
            self.validate_goals(errors)

    # the CPU twin's goals (issue 14 asks the GPU twin to meet them); limits from validate's
    TWIN_GOALS = ("throughput_err_pct", "ttft_p50_err_pct", "ttft_p99_err_pct", "tpot_p50_err_pct")

    def validate_goals(self, errors: Path) -> None:
        """One row per twin goal from validate's errors.csv: cells within it, and the worst."""
        from twin.validate.config import DEFAULT_GOALS
        cells = list(csv.DictReader(errors.open()))
        for column, limit in ((c, DEFAULT_GOALS[c]) for c in self.TWIN_GOALS):
            def goal(column=column, limit=limit) -> tuple[str, str, str]:
                errs = [(float(c[column]), f"{c['policy']} @ {c['load']}") for c in cells if c.get(column)]
                if not errs:
                    raise RuntimeError(f"{errors} has no {column} values")
                met = sum(abs(e) <= limit for e, _ in errs)
                worst = max(errs, key=lambda x: abs(x[0]))
                return (f"{met}/{len(errs)} cells; worst {worst[0]:+.1f}% ({worst[1]})", f"within ±{limit:g}%",
                        "ok" if met == len(errs) else ("MISS" if self.device.type == "cuda" else "info"))
            self.guard("validate", column.replace("_err_pct", " error"), goal)

    # -- table ----------------------------------------------------------------------------
    def telemetry_rows(self, summary: dict[str, dict[str, Any]]) -> None:
        for gpu, s in summary.items():
            def f(x, unit):
                return "-" if x is None else f"{x:.0f} {unit}"
            self.add("device", f"{gpu} {s['name']}",
                     f"{f(s['memory_used_mib_max'], 'MiB')} peak, {f(s['power_w_max'], 'W')} max",
                     "", "info")
            self.add("device", f"{gpu} SM clock / utilisation",
                     f"{f(s['sm_clock_mhz_mean'], 'MHz')}, {f(s['gpu_util_pct_mean'], '%')}", "", "info")

    def keep_earlier(self, sections: list[str]) -> int:
        """--append: keep OUT/rows.csv's rows of the sections not run now (a check split over
        two calls, e.g. equality,kernel,steps then serve,validate, ends in one table); the
        earlier run's own totals are relabelled so both runs' show. Returns how many."""
        path = self.out / "rows.csv"
        if not path.exists():
            return 0
        for r in csv.DictReader(path.open()):
            if r["section"] in sections:
                continue
            if r["section"] in ("total", "device"):
                r["section"] += " (earlier run)"
            self.kept.append(Row(r["section"], r["case"], r["value"], r["goal"], r["status"]))
        return len(self.kept)

    def write(self) -> str:
        lines = ["| section | case | value | goal | status |", "| --- | --- | --- | --- | --- |"]
        rows = self.kept + self.rows
        lines += [f"| {r.section} | {r.case} | {r.value} | {r.goal} | {r.status} |" for r in rows]
        table = "\n".join(lines) + "\n"
        (self.out / "table.md").write_text(table)
        with (self.out / "rows.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["section", "case", "value", "goal", "status"])
            w.writerows([[r.section, r.case, r.value, r.goal, r.status] for r in rows])
        return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) | cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default on cuda) | float16 | float32 (cpu)")
    ap.add_argument("--attention-backend", default="auto", help="auto | torch | triton | flashinfer")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs in the steps section")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the CPU test)")
    ap.add_argument("--out", default="results/gpu_check", help="results folder")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of other sections already in OUT/rows.csv (a check split over runs)")
    args = ap.parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        ap.error(f"--device must be cuda or cpu, got {args.device!r}")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.dtype not in DTYPES:
        ap.error(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.attention_backend not in BACKENDS:
        ap.error(f"--attention-backend must be one of {', '.join(BACKENDS)}, got {args.attention_backend!r}")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        ap.error(f"--sections: {'unknown ' + ', '.join(bad) if bad else 'none given'} "
                 f"(allowed: {', '.join(SECTIONS)})")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu --quick for the CPU part)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from runtime.telemetry import Sampler, Telemetry
    check = Check(args)
    if args.append:
        print(f"gpu_check: keeping {check.keep_earlier(sections)} rows of other sections from {out}/rows.csv")
    t0 = time.perf_counter()
    print(f"gpu_check: device {args.device}, dtype {args.dtype}, attention {check.backend}, "
          f"sections {','.join(sections)} -> {out}", flush=True)
    # A one-shot run that hangs or is stopped must still say where: every thread's stack goes
    # to OUT/stacks.log each STACK_DUMP_S a section runs, and once more on SIGTERM (`timeout`).
    stacks = (out / "stacks.log").open("a")
    faulthandler.register(signal.SIGTERM, file=stacks, all_threads=True, chain=True)
    with Sampler(Telemetry(), interval_s=0.5) as sampler:
        for name in sections:
            print(f"gpu_check: section {name} at {time.perf_counter() - t0:.0f} s", flush=True)
            missing = [m for m in NEEDS.get(name, ()) if importlib.util.find_spec(m) is None]
            if missing:
                check.add(name, f"needs {', '.join(missing)}", "not importable here: carry it as a wheel "
                          "(docstring)", "", "skipped")
                continue
            faulthandler.dump_traceback_later(STACK_DUMP_S, repeat=True, file=stacks)
            try:
                getattr(check, name)()
            except Exception as e:
                # raised outside the section's rows (its set-up: a model, a cache, an HF
                # reference), or a sticky CUDA error: one error row, and the next sections
                # still run (serve and validate in fresh processes, with a fresh CUDA context)
                check.failed(name, "section stopped early", e)
            finally:
                faulthandler.cancel_dump_traceback_later()
            if check.device.type == "cuda":
                # hand this section's GPU memory back: the CLI runs of serve and validate
                # are other processes, and size their KV cache from the free memory
                try:
                    gc.collect()
                    torch.cuda.empty_cache()
                except Exception as e:   # after a sticky CUDA error (illegal address) this raises too
                    check.failed(name, "GPU memory release after the section", e)
    check.telemetry_rows(sampler.summary())
    (out / "telemetry.json").write_text(json.dumps(sampler.summary(), indent=2) + "\n")
    check.add("total", "wall time", f"{time.perf_counter() - t0:.0f} s", "<= 480 s", "info")
    stacks.close()
    if (out / "stacks.log").stat().st_size == 0:
        (out / "stacks.log").unlink()
    print()
    print(check.write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
