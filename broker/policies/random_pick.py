"""Uniform random choice among the eligible workers.

Named ``random_pick`` so it does not shadow the standard library's ``random`` for code in this
package. Load-blind, so it needs no ``changed`` bookkeeping; its value is as a baseline and for
workers so uniform that any smarter policy is wasted effort.
"""

from __future__ import annotations

import random

from zrouter.broker.policies._indexed import IndexedSet
from zrouter.broker.policies.base import Endpoint, Policy

__all__ = ["RandomPick"]


class RandomPick(Policy):
    """O(1) add, remove and pick through a list + index map."""

    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._members: IndexedSet[Endpoint] = IndexedSet()

    def add(self, ep: Endpoint) -> None:
        self._members.add(ep)

    def remove(self, ep: Endpoint) -> None:
        self._members.remove(ep)

    def changed(self, ep: Endpoint) -> None:
        # Nothing to update, but a call for a non-member is a broker bug worth surfacing.
        if ep not in self._members:
            raise KeyError(ep)

    def pick(self, key: bytes | None = None) -> Endpoint | None:
        return self._members.choice(self.rng) if self._members else None

    def __len__(self) -> int:
        return len(self._members)
