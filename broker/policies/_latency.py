"""Latency as the broker reports it through ``Policy.done``: a time-decayed EWMA per endpoint and
their mean, the service's current estimate; shared by the policies that cost workers by latency.

The estimate is what an endpoint with no reply yet is assumed to answer in: an average worker of
its service, rather than an optimistic constant that makes every newcomer look like the fastest
worker there is. It is the plain mean of the endpoints' EWMAs, each endpoint counting once
however many requests it answers, because a new worker is a typical *worker*, not a typical
request (a mean over requests leans towards the fast workers, who answer most of them). The
median would shrug off one very slow worker; the mean costs O(1) per sample instead of O(log n)
and errs on the side of caution (a slow outlier makes newcomers look slower, so they are sent
less before their first reply, never more).
"""

from __future__ import annotations

import math
from typing import Generic, TypeVar

__all__ = ["DECAY_TIME", "LatencyTracker", "update_ewma"]

T = TypeVar("T")

# Seconds for an old latency sample's weight to fall to 1/e; Finagle's and go-zero's default:
# long enough to ride out single outliers, short enough to notice a worker slowing down in ~10 s.
DECAY_TIME = 10.0

# Samples between exact re-sums of the running total, beyond one per endpoint: adding and
# subtracting floats for ever would let the total drift from the EWMAs it sums.
RESUM_SLACK = 64


def update_ewma(old: float, rtt: float, elapsed: float, tau: float = DECAY_TIME) -> float:
    """go-zero's time-decayed EWMA: the new sample ``rtt`` (s) weighs more the longer it has been
    (``elapsed`` s) since the previous one, so a burst of samples does not swamp the history and
    one sample after a long quiet spell mostly replaces it. The first sample (``old == 0``) is
    taken as is. A negative ``elapsed`` (clock skew) counts as 0."""
    if old == 0.0:
        return rtt
    beta = math.exp(-max(elapsed, 0.0) / tau)
    return old * beta + rtt * (1.0 - beta)


class LatencyTracker(Generic[T]):
    """EWMAs (s) by endpoint, and their mean. ``observe`` and ``forget`` are O(1) amortised."""

    __slots__ = ("_at", "_ewma", "_sum", "_updates", "tau")

    def __init__(self, tau: float = DECAY_TIME) -> None:
        self.tau = tau
        self._ewma: dict[T, float] = {}
        self._at: dict[T, float] = {}  # time of each endpoint's latest sample
        self._sum = 0.0
        self._updates = 0

    def __len__(self) -> int:
        return len(self._ewma)

    def observe(self, ep: T, latency_s: float, now: float) -> float:
        """Fold one reply's latency into ``ep``'s EWMA; returns the new EWMA."""
        old = self._ewma.get(ep, 0.0)
        new = update_ewma(old, latency_s, now - self._at.get(ep, now), self.tau)
        self._ewma[ep] = new
        self._at[ep] = now
        self._sum += new - old
        self._updates += 1
        if self._updates > len(self._ewma) + RESUM_SLACK:
            self._resum()
        return new

    def ewma(self, ep: T) -> float:
        """``ep``'s EWMA (s); 0.0 until its first reply."""
        return self._ewma.get(ep, 0.0)

    def estimate(self) -> float:
        """The mean EWMA (s) over the endpoints with a sample; 0.0 before the first one."""
        n = len(self._ewma)
        return self._sum / n if n else 0.0

    def forget(self, ep: T) -> None:
        old = self._ewma.pop(ep, None)
        if old is not None:
            del self._at[ep]
            self._sum -= old
            if not self._ewma:
                self._sum = 0.0
            self._updates += 1

    def _resum(self) -> None:
        self._sum = math.fsum(self._ewma.values())
        self._updates = 0
