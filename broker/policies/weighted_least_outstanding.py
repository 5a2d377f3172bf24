"""Weighted least outstanding: the eligible worker with the lowest (outstanding + 1) / weight.

The +1 counts the request being placed: with plain outstanding / weight every idle worker would
score 0 whatever its weight, so at low load weights would not matter at all; with +1 an idle
worker of weight 3 scores 1/3 and beats an idle one of weight 1 (score 1), and under load each
worker's share of in-flight work approaches its share of the total weight.

Workers are filed in buckets by score under a lazily cleaned min-heap of scores
(``MinBuckets``): O(1) per pick and per ``changed`` plus an occasional O(log k) heap operation
over the k distinct scores (at most distinct weights x distinct counts). Workers with equal
scores share a bucket, so ties are broken by a fresh uniform draw on every pick.
"""

from __future__ import annotations

import random

from zrouter.broker.policies._buckets import MinBuckets
from zrouter.broker.policies.base import Endpoint, Policy

__all__ = ["WeightedLeastOutstanding", "score"]


def score(ep: Endpoint) -> float:
    """Lower is better; see the module docstring for the +1."""
    return (ep.outstanding + 1) / ep.weight


class WeightedLeastOutstanding(Policy):
    name = "weighted-least-outstanding"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._buckets: MinBuckets[Endpoint] = MinBuckets()

    def add(self, ep: Endpoint) -> None:
        self._buckets.add(ep, score(ep))

    def remove(self, ep: Endpoint) -> None:
        self._buckets.remove(ep)

    def changed(self, ep: Endpoint) -> None:
        self._buckets.update(ep, score(ep))

    def pick(self, key: bytes | None = None) -> Endpoint | None:
        return self._buckets.choice_min(self.rng)

    def __len__(self) -> int:
        return len(self._buckets)
