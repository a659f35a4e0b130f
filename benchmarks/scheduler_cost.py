"""Scheduling cost: next_batch + complete with a long queue, per policy.

    python benchmarks/scheduler_cost.py [--waiting 10000 100000] [--running 1000] [--pp 4]

A scheduler state of `running` decoding requests and `waiting` queued prompts; then
`--decisions` micro-batches are formed and completed (pipeline FIFO). Prints decisions/s,
tokens per decision and the cost per token, for each queue length: if the cost were
O(queue length), the 100k-waiting row would be ~10x slower than the 10k row.
"""
from __future__ import annotations

import argparse
import time
from collections import deque

from core.policies import make_policy
from core.request import Request
from core.scheduler import Scheduler, SchedulerConfig

POLICIES = {
    "token_throttling": {},
    "sarathi": {"budget": 2048},
    "vllm": {"max_num_seqs": 2048},
    "sarathi-64": {"budget": 64},   # small batches: the per-decision overhead alone
}


def build(policy: str, params: dict, waiting: int, running: int, pp: int) -> Scheduler:
    # Reach the state with a roomy budget, then hand it to the policy under test (a small
    # Sarathi budget would starve the setup's prefills behind its decodes).
    s = Scheduler(SchedulerConfig(pp=pp, num_pages=500_000, page_size=16), make_policy("sarathi", {"budget": 4096}))
    for i in range(running):  # started requests: a 1-token prompt each, prefilled below
        s.add(Request(i, 1, 100_000))
    t = 0.0
    while s.num_ready < running:  # prefill them (outside the timed part)
        q = deque()
        while (b := s.next_batch(t)) is not None:
            q.append(b)
        while q:
            s.complete(q.popleft(), t)
    for i in range(waiting):
        s.add(Request(running + i, 1000, 100))
    s.policy = make_policy(policy.split("-")[0], params)
    s.policy.bind(s)
    return s


def measure(s: Scheduler, decisions: int) -> tuple[float, float]:
    q: deque = deque()
    tokens, done, now = 0, 0, 0.0
    t0 = time.perf_counter()
    while done < decisions:
        while (b := s.next_batch(now)) is not None:
            q.append(b)
            tokens += b.num_tokens
            done += 1
        now += 0.01
        s.complete(q.popleft(), now)
    elapsed = time.perf_counter() - t0
    return done / elapsed, tokens / done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--waiting", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--running", type=int, default=1000)
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--decisions", type=int, default=2000)
    args = ap.parse_args()
    print(f"{'policy':18} {'waiting':>8} {'running':>8} {'decisions/s':>12} {'tokens/batch':>13} {'us/token':>9}")
    for policy, params in POLICIES.items():
        for waiting in args.waiting:
            s = build(policy, params, waiting, args.running, args.pp)
            rate, per_batch = measure(s, args.decisions)
            print(f"{policy:18} {waiting:>8} {args.running:>8} {rate:>12,.0f} {per_batch:>13.1f} "
                  f"{1e6 / (rate * per_batch):>9.2f}")


if __name__ == "__main__":
    main()
