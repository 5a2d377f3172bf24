"""Least outstanding: the eligible worker with the fewest requests in flight, ties at random.

Workers are filed in buckets by outstanding count (``MinBuckets``): O(1) per pick and per
``changed``, plus an occasional O(log k) heap operation over the k distinct counts.

Ties are broken at random rather than by position so that, at low load when everyone sits at 0,
work still spreads over all workers instead of hammering the first one.
"""

from __future__ import annotations

import random

from zrouter import _speedups
from zrouter.broker.policies import _buckets
from zrouter.broker.policies._buckets import MinBuckets
from zrouter.broker.policies.base import Endpoint, Policy

__all__ = ["LeastOutstanding"]


class LeastOutstanding(Policy):
    name = "least-outstanding"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._buckets: MinBuckets[Endpoint] = MinBuckets()
        if _speedups.native() and type(self._buckets) is not _buckets.PyMinBuckets:
            # The compiled path: the same four calls over the same buckets and rng, without a
            # Python frame each (zrouter/_native/sets.pyx, LeastOutstandingCore).
            core = _speedups.load_native("sets").LeastOutstandingCore(self._buckets, self.rng)
            self.add, self.remove, self.changed, self.pick = (  # type: ignore[method-assign]
                core.add, core.remove, core.changed, core.pick)

    def add(self, ep: Endpoint) -> None:
        self._buckets.add(ep, ep.outstanding)

    def remove(self, ep: Endpoint) -> None:
        self._buckets.remove(ep)

    def changed(self, ep: Endpoint) -> None:
        self._buckets.update(ep, ep.outstanding)

    def pick(self, key: bytes | None = None) -> Endpoint | None:
        return self._buckets.choice_min(self.rng)

    def __len__(self) -> int:
        return len(self._buckets)
