"""Power of two choices over a latency EWMA, after go-zero's p2c balancer
(zrpc/internal/balancer/p2c/p2c.go), itself after Finagle's "peak EWMA".

A pick draws two distinct eligible workers at random and takes the less loaded, where
load = ewma * (outstanding + 1): expected wait behind what the worker already holds, with the +1
for the request being placed so latency counts even on an idle worker. Comparing just two random
workers avoids the herd behaviour of always taking the global minimum on stale data (every
broker and every request piling onto the same momentarily-best worker) while still steering
work away from slow or busy workers; and it is O(1) regardless of the worker count.

Latency comes from the broker's completion reports (``done``): each worker's time-decayed EWMA
and the service's current estimate, their mean, kept by a ``LatencyTracker`` here rather than on
the broker's worker records.

- A worker with no reply yet is costed at the service's estimate: an average worker, so it gets
  about an average share of the work until its first reply says what it is. go-zero costs it
  optimistically instead, and so did this module (1 ms): in a busy service (24 in flight over 4
  workers, capacity 16 each) a newcomer then looked cheaper than anyone until it held all 16,
  its fair share being 6, and a slow newcomer (300 ms) made all 16 wait. ``COLD_START_EWMA`` is
  used only before the service has any sample, when every worker is costed alike and the
  outstanding counts alone decide. (Slow start, ``--slow-start``, limits a newcomer's credits
  further, for every policy.)
- Force pick: if the loser of the pair has not been picked for ``FORCE_PICK`` seconds, it is
  taken anyway. A worker whose EWMA is stale-high (it was slow once) would otherwise never be
  picked again, and so never get the fresh samples that would show it recovered. Unlike
  go-zero, only an *idle* loser is forced: a worker still holding requests will report fresh
  latency when they finish, and forcing busy slow workers kept them saturated (bench/simulate:
  1,000 workers, 10% of them 1 s a request: p99 4.6 s with go-zero's rule, 1.4 s without).

Unlike go-zero, where a new connection counts as never picked (and so is force-pickable at
once), a worker's pick clock starts when it is added: the broker removes and re-adds a worker
every time it runs out of credit, and that churn must not earn it force picks. A worker's EWMA
outlives such removals; it is dropped when the broker ``forget``s the worker.

Time comes from ``self.clock`` (``time.monotonic`` by default) so tests can drive it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from zrouter.broker.policies._indexed import IndexedSet
from zrouter.broker.policies._latency import DECAY_TIME, LatencyTracker, update_ewma
from zrouter.broker.policies.base import Endpoint, Policy

__all__ = ["COLD_START_EWMA", "DECAY_TIME", "FORCE_PICK", "P2CEwma", "update_ewma"]

# go-zero's forcePick: after this many seconds unpicked, a worker is tried despite its load,
# to refresh an EWMA that may be stale-high.
FORCE_PICK = 1.0

# Latency (s) assumed while the service has no sample at all: every worker is then costed alike,
# and any value > 0 lets the outstanding counts decide.
COLD_START_EWMA = 1e-3


class P2CEwma(Policy):
    name = "p2c-ewma"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self.clock: Callable[[], float] = time.monotonic
        self.latency: LatencyTracker[Endpoint] = LatencyTracker()
        self._members: IndexedSet[Endpoint] = IndexedSet()
        self._picked_at: dict[Endpoint, float] = {}

    def load(self, ep: Endpoint) -> float:
        """Expected wait (s) at ``ep`` for one more request: its latency EWMA (the service's
        estimate before its first reply) times (outstanding + 1). Lower is better."""
        latency = self.latency
        return (latency.ewma(ep) or latency.estimate() or COLD_START_EWMA) * (ep.outstanding + 1)

    def add(self, ep: Endpoint) -> None:
        self._members.add(ep)
        self._picked_at[ep] = self.clock()

    def remove(self, ep: Endpoint) -> None:
        self._members.remove(ep)
        del self._picked_at[ep]

    def changed(self, ep: Endpoint) -> None:
        # Load and latency are read fresh on every pick; only membership needs checking.
        if ep not in self._members:
            raise KeyError(ep)

    def done(self, ep: Endpoint, latency_s: float, now: float) -> None:
        self.latency.observe(ep, latency_s, now)

    def forget(self, ep: Endpoint) -> None:
        if ep in self._members:
            raise ValueError(f"{ep!r} is still eligible: remove it first")
        self.latency.forget(ep)

    def pick(self, key: bytes | None = None) -> Endpoint | None:
        members = self._members
        n = len(members)
        if n == 0:
            return None
        now = self.clock()
        if n == 1:
            chosen = members[0]
        else:
            rng = self.rng
            i = rng.randrange(n)
            j = rng.randrange(n - 1)
            if j >= i:  # distinct from i, still uniform over the other n - 1
                j += 1
            best, other = members[i], members[j]
            load = self.load
            if load(best) > load(other):
                best, other = other, best
            stale = not other.outstanding and now - self._picked_at[other] > FORCE_PICK
            chosen = other if stale else best
        self._picked_at[chosen] = now
        return chosen

    def __len__(self) -> int:
        return len(self._members)
