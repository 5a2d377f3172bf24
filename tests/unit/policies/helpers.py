"""What the policy test modules share: a fake endpoint, and the broker's call protocol driven
without a broker (fixed-seed ``random.Random`` everywhere, time simulated, no sockets, no sleeps).

After ``pick`` the endpoint's ``outstanding`` goes up and ``changed`` follows (or ``remove`` when
it is full); a completion reports its latency (``done``), lowers ``outstanding`` and calls
``changed`` (or ``add`` when it had been full). Worker speeds never matter to a policy except
through ``done``.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Sequence
from dataclasses import dataclass

from zrouter.broker.policies import POLICIES, Policy, make_policy

__all__ = [
    "ALL",
    "SEED",
    "FakeEndpoint",
    "dispatch_and_complete",
    "endpoints",
    "pick",
    "policy_with",
    "run_under_load",
    "shares",
]

ALL = sorted(POLICIES)
SEED = 20240611


@dataclass(eq=False)  # eq=False keeps identity hashing, like the broker's WorkerState
class FakeEndpoint:
    key: bytes
    outstanding: int = 0
    weight: float = 1.0

    def __repr__(self) -> str:
        return self.key.decode()


def endpoints(n: int, weights: Sequence[float] | None = None) -> list[FakeEndpoint]:
    return [FakeEndpoint(b"w%d" % i, weight=weights[i] if weights else 1.0) for i in range(n)]


def policy_with(name: str, eps: Sequence[FakeEndpoint], seed: int = SEED) -> Policy:
    p = make_policy(name, random.Random(seed))
    for ep in eps:
        p.add(ep)
    return p


def pick(p: Policy, key: bytes | None = None) -> FakeEndpoint:
    ep = p.pick(key)
    assert isinstance(ep, FakeEndpoint)
    return ep


def dispatch_and_complete(p: Policy, key: bytes | None = None) -> FakeEndpoint:
    """One request that finishes before the next arrives (zero standing load)."""
    ep = pick(p, key)
    ep.outstanding += 1
    p.changed(ep)
    ep.outstanding -= 1
    p.changed(ep)
    return ep


def shares(counts: collections.Counter[FakeEndpoint], eps: Sequence[FakeEndpoint]) -> list[float]:
    total = sum(counts.values())
    return [counts[ep] / total for ep in eps]


def run_under_load(p: Policy, eps: Sequence[FakeEndpoint], concurrency: int, n: int) -> list[float]:
    """Keep ``concurrency`` requests in flight; each step one random in-flight request completes
    (equal service times) and a new one is dispatched."""
    rng = random.Random(SEED + 1)
    inflight: list[FakeEndpoint] = []
    counts: collections.Counter[FakeEndpoint] = collections.Counter()
    for _ in range(n):
        if len(inflight) >= concurrency:
            done = inflight.pop(rng.randrange(len(inflight)))
            done.outstanding -= 1
            p.changed(done)
        ep = pick(p)
        ep.outstanding += 1
        p.changed(ep)
        inflight.append(ep)
        counts[ep] += 1
    return shares(counts, eps)

