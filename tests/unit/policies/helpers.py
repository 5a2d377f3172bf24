"""What the policy test modules share: a fake endpoint, and the broker's call protocol driven
without a broker (fixed-seed ``random.Random`` everywhere, time simulated, no sockets, no sleeps).

After ``pick`` the endpoint's ``outstanding`` goes up and ``changed`` follows (or ``remove`` when
it is full); a completion reports its latency (``done``), lowers ``outstanding`` and calls
``changed`` (or ``add`` when it had been full). Worker speeds never matter to a policy except
through ``done``.
"""

from __future__ import annotations

import collections
import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass

from zrouter.broker.policies import POLICIES, Policy, make_policy

__all__ = [
    "ALL",
    "SEED",
    "FakeEndpoint",
    "closed_loop",
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


def closed_loop(
    p: Policy,
    eps: Sequence[FakeEndpoint],
    capacity: int,
    in_flight: int,
    n: int,
    mean_s: Sequence[float],
    seed: int = SEED,
) -> list[float]:
    """Each endpoint's share of ``n`` dispatches with exactly ``in_flight`` requests in the system
    (a closed loop: a reply is followed at once by the next request), as the broker does it:
    each endpoint holds at most ``capacity`` requests and leaves the policy while full, and a
    request that finds no endpoint with a free credit waits in a FIFO until a reply frees one.
    Endpoint i serves its requests in parallel, each taking an exponential time of mean
    ``mean_s[i]`` seconds (simulated time)."""
    rng = random.Random(seed)
    eligible = {ep: True for ep in eps}
    replies: list[tuple[float, int, FakeEndpoint, float]] = []  # (due, seq, endpoint, sent at)
    counts: collections.Counter[FakeEndpoint] = collections.Counter()
    mean = dict(zip(eps, mean_s, strict=True))
    waiting = 0
    sent = 0

    def dispatch(ep: FakeEndpoint, now: float) -> None:
        nonlocal sent
        ep.outstanding += 1
        if ep.outstanding >= capacity:
            p.remove(ep)
            eligible[ep] = False
        else:
            p.changed(ep)
        counts[ep] += 1
        sent += 1
        heapq.heappush(replies, (now + rng.expovariate(1.0 / mean[ep]), sent, ep, now))

    def pump(now: float) -> None:
        nonlocal waiting
        while waiting and sent < n:
            ep = p.pick()
            if ep is None:
                return
            assert isinstance(ep, FakeEndpoint)
            waiting -= 1
            dispatch(ep, now)

    waiting = in_flight
    pump(0.0)
    while sent < n:
        now, _, ep, sent_at = heapq.heappop(replies)
        p.done(ep, now - sent_at, now)
        ep.outstanding -= 1
        if eligible[ep]:
            p.changed(ep)
        else:
            p.add(ep)
            eligible[ep] = True
        waiting += 1
        pump(now)
    return shares(counts, eps)
