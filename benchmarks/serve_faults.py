"""Serving through a stage failure (issue 18's soak): `pipetwin serve --on-engine-failure
restart` under open-loop load above its capacity, with one stage process killed part-way.

Every request must either finish with its full length or get exactly one clean error (an
HTTP 503 or one SSE error event with a short reason: no traceback, path, pid or port);
none may hang (the whole run has a drain limit); memory (VmRSS of the server and all its
descendants, read from /proc) should stay flat; and the server must come back on its own.

Workload: the serving one of docs/benchmarks.md (lognormal prompts mean 200, outputs mean
64, Poisson arrivals, `ignore_eos`), `rate x minutes x 60` requests sent by
twin.bench_serve's load generator. The rate is `--load` x the capacity measured
first on the same server (96 requests of the workload at once, another seed: finished
requests / wall time), since a shared machine's capacity varies (unloaded: ~7.5 req/s,
docs/benchmarks.md, Serving); `--rate` sets it directly instead.

    .venv/bin/python benchmarks/serve_faults.py --minutes 10 --load 1.2 --kill-at 0.5 \\
        --json results/serve_faults.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LEAKS = re.compile(r"Traceback|File \"|\.py\b|/\w+/|\bpid\b|\bport\b", re.I)
WORKLOAD = {"arrival": {"kind": "gamma", "burstiness": 1.0},
            "prompt_len": {"kind": "lognormal", "mean": 200, "spread": 0.96, "max": 1024},
            "output_len": {"kind": "lognormal", "mean": 64, "spread": 0.77, "max": 256}}


def descendants(pid: int) -> list[int]:
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def rss_mib(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text())
            total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total / 1024


def stage_pids(server_pid: int) -> list[int]:
    out = []
    for p in descendants(server_pid):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"multiprocessing.spawn" in cmd:
            out.append(p)
    return sorted(out)


async def health_status(client, url: str) -> int:
    try:
        return (await client.get(url + "/health", timeout=5)).status_code
    except Exception:  # noqa: BLE001 - an unreachable server is a down server
        return 0


async def watch(url: str, server_pid: int, t0: float, kill_after: float, stop: asyncio.Event,
                log: dict) -> None:
    """Memory every 5 s; at `kill_after` s SIGKILL the last stage; time /health going red and back."""
    import httpx

    async with httpx.AsyncClient() as client:
        next_mem = 0.0
        killed_at = red_at = None
        while not stop.is_set():
            now = time.perf_counter() - t0
            if now >= next_mem:
                log["rss"].append((round(now, 1), round(rss_mib([server_pid, *descendants(server_pid)]), 1)))
                next_mem += 5.0
            if killed_at is None and now >= kill_after:
                victim = stage_pids(server_pid)[-1]
                os.kill(victim, signal.SIGKILL)
                killed_at = now
                log["killed"] = {"t": round(now, 2), "pid": victim}
            if killed_at is not None and "back_after_s" not in log:
                st = await health_status(client, url)
                if st != 200 and red_at is None:
                    red_at = time.perf_counter() - t0
                    log["red_after_s"] = round(red_at - killed_at, 3)
                if st == 200 and red_at is not None:
                    log["back_after_s"] = round(time.perf_counter() - t0 - killed_at, 3)
            try:
                await asyncio.wait_for(stop.wait(), 0.1)
            except asyncio.TimeoutError:
                pass


def classify(outcomes) -> dict:
    full = clean = 0
    bad: list[str] = []
    for o in outcomes:
        if o.error is None and o.output_tokens == o.max_output and o.finish_reason == "length":
            full += 1
        elif o.error is not None and (o.error.startswith("HTTP 503") or o.error.startswith("stream error")):
            text = o.error
            if text.startswith("HTTP 503"):
                text = json.loads(text.split(": ", 1)[1])["error"]["message"] if "{" in text else text
            if LEAKS.search(text) or len(text) > 200:
                bad.append(f"{o.request_id}: leaky error {text[:120]!r}")
            else:
                clean += 1
        else:
            bad.append(f"{o.request_id}: {o.error or f'{o.output_tokens}/{o.max_output} tokens, {o.finish_reason}'}")
    return {"full_length": full, "clean_error": clean, "bad": len(bad), "bad_examples": bad[:5]}


def main() -> int:
    # Long on purpose: the soak's timeline (start, measure capacity, load, kill, recover,
    # check) in the order it happens.
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="arrival window (default 10)")
    ap.add_argument("--load", type=float, default=1.2, help="offered rate / measured capacity (default 1.2)")
    ap.add_argument("--rate", type=float, help="requests/s offered (default: --load x the measured capacity)")
    ap.add_argument("--kill-at", type=float, default=0.5, help="fraction of the window when a stage is killed")
    ap.add_argument("--drain-limit", type=float, default=600.0, help="s after the last arrival before a hang is declared")
    ap.add_argument("--model", default="dummy:llama-32m")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--port", type=int, default=8140)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if not (args.minutes > 0 and args.load > 0 and (args.rate is None or args.rate > 0) and 0 < args.kill_at < 1):
        ap.error("--minutes, --load and --rate must be > 0 and --kill-at in (0, 1)")

    from twin.workload import workload_requests
    from twin.bench_serve import run_async

    url = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "cli", "serve", "--model", args.model, "--pp", str(args.pp),
           "--port", str(args.port), "--on-engine-failure", "restart", "--log-level", "warning"]
    server_log = open(Path(args.json).with_suffix(".server.log") if args.json else os.devnull, "w")
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=server_log, stderr=subprocess.STDOUT)
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        capacity = None
        if args.rate is None:
            probe = workload_requests({**WORKLOAD, "num_requests": 96,
                                       "arrival": {**WORKLOAD["arrival"], "rate": "inf"}}, args.seed + 1)
            t = time.perf_counter()
            _, done = asyncio.run(run_async(url, probe, args.seed + 1, stats_every_s=1.0))
            capacity = sum(o.ok for o in done) / (time.perf_counter() - t)
            args.rate = round(args.load * capacity, 2)
            print(f"capacity {capacity:.2f} req/s -> offering {args.rate} req/s", flush=True)
        n = max(1, round(args.rate * args.minutes * 60))
        spec = {**WORKLOAD, "num_requests": n, "arrival": {**WORKLOAD["arrival"], "rate": args.rate}}
        requests = workload_requests(spec, args.seed)
        window = requests[-1].arrival
        log: dict = {"rss": []}

        async def run() -> list:
            stop = asyncio.Event()
            t0 = time.perf_counter()
            watcher = asyncio.ensure_future(watch(url, server.pid, t0, args.kill_at * window, stop, log))
            try:
                _, outcomes = await asyncio.wait_for(run_async(url, requests, args.seed, stats_every_s=1.0),
                                                     window + args.drain_limit)
            except asyncio.TimeoutError:
                log["hung"] = True
                outcomes = []
            log["duration_s"] = round(time.perf_counter() - t0, 1)
            stop.set()
            await watcher
            return outcomes

        outcomes = asyncio.run(run())
        metrics = httpx.get(url + "/metrics").text
        final = {k: float(v) for k, v in re.findall(r"^(pipetwin_(?:engine_\w+|kv_cache_used_pages|"
                                                    r"num_requests_\w+)) (\S+)$", metrics, re.M)}
        rss = log["rss"]
        after = [m for t, m in rss if t >= 60]
        result = {"command": " ".join(sys.argv), "capacity_req_s": capacity and round(capacity, 2),
                  "requests": n, "rate": args.rate, "window_s": round(window, 1),
                  **classify(outcomes), "hung": bool(log.get("hung")), "duration_s": log["duration_s"],
                  "killed": log.get("killed"), "health_red_after_s": log.get("red_after_s"),
                  "health_back_after_s": log.get("back_after_s"), "server_metrics_at_end": final,
                  "rss_mib_60s": after[0] if after else None, "rss_mib_end": rss[-1][1] if rss else None,
                  "rss_mib_min_max_after_60s": [min(after), max(after)] if after else None,
                  "rss_mib_series": rss}
        print(json.dumps({k: v for k, v in result.items() if k != "rss_mib_series"}, indent=1))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1))
        ok = not result["hung"] and result["bad"] == 0 and result["health_back_after_s"] is not None
        return 0 if ok else 1
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()


if __name__ == "__main__":
    raise SystemExit(main())
