"""Power of two choices over a latency EWMA, after go-zero's p2c balancer
(zrpc/internal/balancer/p2c/p2c.go), itself after Finagle's "peak EWMA".

A pick draws two distinct eligible workers at random and takes the less loaded, where
load = ewma * (outstanding + 1): expected wait behind what the worker already holds, with the +1
for the request being placed so latency counts even on an idle worker. Comparing just two random
workers avoids the herd behaviour of always taking the global minimum on stale data (every
broker and every request piling onto the same momentarily-best worker) while still steering
work away from slow or busy workers; and it is O(1) regardless of the worker count.

Two go-zero details are kept:

- A worker with no latency sample yet (ewma 0) is costed at ``COLD_START_EWMA`` rather than 0,
  so a new worker wins against most measured ones and gets tried, yet its own outstanding count
  still grows its load, so it is not flooded before its first reply comes back.
- Force pick: if the loser of the pair has not been picked for ``FORCE_PICK`` seconds, it is
  taken anyway. A worker whose EWMA is stale-high (it was slow once) would otherwise never be
  picked again, and so never get the fresh samples that would show it recovered. Unlike
  go-zero, only an *idle* loser is forced: a worker still holding requests will report fresh
  latency when they finish, and forcing busy slow workers kept them saturated (bench/simulate:
  1,000 workers, 10% of them 1 s a request: p99 4.6 s with go-zero's rule, 1.4 s without).

Unlike go-zero, where a new connection counts as never picked (and so is force-pickable at
once), a worker's pick clock starts when it is added: the broker removes and re-adds a worker
every time it runs out of credit, and that churn must not earn it force picks. The cold-start
cost already gets brand-new workers tried.

Time comes from ``self.clock`` (``time.monotonic`` by default) so tests can drive it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

from zrouter.broker.policies._indexed import IndexedSet
from zrouter.broker.policies.base import Endpoint, Policy

__all__ = ["COLD_START_EWMA", "DECAY_TIME", "FORCE_PICK", "P2CEwma", "load", "update_ewma"]

# Seconds for an old latency sample's weight to fall to 1/e; Finagle's and go-zero's default:
# long enough to ride out single outliers, short enough to notice a worker slowing down in ~10 s.
DECAY_TIME = 10.0

# go-zero's forcePick: after this many seconds unpicked, a worker is tried despite its load,
# to refresh an EWMA that may be stale-high.
FORCE_PICK = 1.0

# Latency (s) assumed for a worker with no reply yet: below typical service latencies so new
# workers get tried, not 0 so their outstanding count still weighs in.
COLD_START_EWMA = 1e-3


def update_ewma(old: float, rtt: float, elapsed: float, tau: float = DECAY_TIME) -> float:
    """go-zero's time-decayed EWMA: the new sample ``rtt`` (s) weighs more the longer it has been
    (``elapsed`` s) since the previous one, so a burst of samples does not swamp the history and
    one sample after a long quiet spell mostly replaces it. The first sample (``old == 0``) is
    taken as is. A negative ``elapsed`` (clock skew) counts as 0."""
    if old == 0.0:
        return rtt
    beta = math.exp(-max(elapsed, 0.0) / tau)
    return old * beta + rtt * (1.0 - beta)


def load(ep: Endpoint) -> float:
    """Lower is better; see the module docstring."""
    return (ep.ewma or COLD_START_EWMA) * (ep.outstanding + 1)


class P2CEwma(Policy):
    name = "p2c-ewma"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self.clock: Callable[[], float] = time.monotonic
        self._members: IndexedSet[Endpoint] = IndexedSet()
        self._picked_at: dict[Endpoint, float] = {}

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
            if load(best) > load(other):
                best, other = other, best
            stale = not other.outstanding and now - self._picked_at[other] > FORCE_PICK
            chosen = other if stale else best
        self._picked_at[chosen] = now
        return chosen

    def __len__(self) -> int:
        return len(self._members)
