"""Micro-benchmark of the dispatch policies, in process: ``python bench/policy_pick.py``.

For every registered policy at 10, 1,000 and 10,000 workers it times the broker's per-request
policy work: ``pick`` then ``outstanding += 1`` and ``changed`` (dispatch), and, for the oldest of
``IN_FLIGHT`` requests, ``done`` (its latency), ``outstanding -= 1`` and ``changed`` (completion). A second table times a
``remove`` + ``add`` pair, which the broker does whenever a worker runs out of credit and gets
one back. Numbers are microseconds per cycle; the whole run takes well under 30 s.
"""

from __future__ import annotations

import collections
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable without installing

from zrouter.broker.policies import POLICIES, Policy, make_policy

__all__ = ["main"]

SIZES = (10, 1_000, 10_000)
# Requests in flight across the service: enough that outstanding counts differ between workers.
IN_FLIGHT = 64
# Time each measurement for about this long (s), so fast policies get many samples and slow ones
# do not stretch the run.
BUDGET = 0.2
# Distinct request keys: enough to hit every part of a 10,000-worker ring.
KEYS = [b"key-%d" % i for i in range(10_000)]
SEED = 1


@dataclass(eq=False)  # identity hashing, like the broker's WorkerState
class Worker:
    key: bytes
    outstanding: int
    weight: float


def build(name: str, n: int, weight: Callable[[int], float]) -> tuple[Policy, list[Worker]]:
    rng = random.Random(SEED)
    policy = make_policy(name, rng)
    eps = [Worker(b"worker-%d" % i, 0, weight(i)) for i in range(n)]
    for ep in eps:
        policy.add(ep)
        policy.done(ep, rng.uniform(0.001, 0.020), 0.0)  # a latency for p2c-ewma to weigh
    return policy, eps


def pick_cycle_us(name: str, n: int, weight: Callable[[int], float]) -> float:
    policy, _ = build(name, n, weight)
    inflight: collections.deque[Worker] = collections.deque()
    keys = KEYS
    cycles = 0
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < BUDGET:
        for _ in range(200):
            ep = policy.pick(keys[cycles % len(keys)])
            assert isinstance(ep, Worker)
            ep.outstanding += 1
            policy.changed(ep)
            inflight.append(ep)
            if len(inflight) > IN_FLIGHT:
                done = inflight.popleft()
                policy.done(done, 0.005, cycles * 1e-4)
                done.outstanding -= 1
                policy.changed(done)
            cycles += 1
        elapsed = time.perf_counter() - start
    return elapsed / cycles * 1e6


def churn_us(name: str, n: int, weight: Callable[[int], float]) -> float:
    policy, eps = build(name, n, weight)
    rng = random.Random(SEED)
    cycles = 0
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < BUDGET:
        for _ in range(20):
            ep = eps[rng.randrange(n)]
            policy.remove(ep)
            policy.add(ep)
            cycles += 1
        elapsed = time.perf_counter() - start
    return elapsed / cycles * 1e6


def three_classes(i: int) -> float:
    return float(1 + i % 3)


def all_distinct(i: int) -> float:
    return 1.0 + i / 1000.0


def table(title: str, measure: Callable[[str, int, Callable[[int], float]], float]) -> None:
    rows: list[tuple[str, Callable[[int], float]]] = [(name, three_classes) for name in sorted(POLICIES)]
    rows.append(("weighted", all_distinct))  # its worst case: no two workers share a weight
    print(f"\n{title}")
    print(f"{'policy':<34}" + "".join(f"{n:>12,}" for n in SIZES))
    for name, weight in rows:
        label = name if weight is three_classes else f"{name} (all weights distinct)"
        cells = "".join(f"{measure(name, n, weight):>12.2f}" for n in SIZES)
        print(f"{label:<34}{cells}", flush=True)


def main() -> None:
    print(f"Python {sys.version.split()[0]}; weights 1/2/3 unless noted; {IN_FLIGHT} requests in flight")
    table("µs per pick + changed cycle (dispatch and completion), by worker count", pick_cycle_us)
    table("µs per remove + add (a worker running out of credit and getting it back)", churn_us)


if __name__ == "__main__":
    main()
