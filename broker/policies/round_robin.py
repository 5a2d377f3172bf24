"""Round-robin: each eligible worker in turn, in a stable order.

The workers sit on a circular doubly linked list (two dicts: next and prev) with a cursor on the
one to serve next, so pick, add and remove are all O(1). A newly added worker is linked in just
before the cursor, i.e. at the end of the current pass: it waits for the workers already queued
rather than jumping ahead of them. This is also where a worker lands when it comes back after
being full, which keeps a worker that keeps filling up from getting more than its turn. Removing
the worker under the cursor moves the cursor to its successor, so nobody is skipped or served
twice in a pass.
"""

from __future__ import annotations

import random

from zrouter.broker.policies.base import Endpoint, Policy

__all__ = ["RoundRobin"]


class RoundRobin(Policy):
    name = "round-robin"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._next: dict[Endpoint, Endpoint] = {}
        self._prev: dict[Endpoint, Endpoint] = {}
        self._cursor: Endpoint | None = None

    def add(self, ep: Endpoint) -> None:
        if ep in self._next:
            raise ValueError(f"{ep!r} is already present")
        cursor = self._cursor
        if cursor is None:
            self._next[ep] = self._prev[ep] = self._cursor = ep
            return
        before = self._prev[cursor]
        self._next[before] = ep
        self._prev[ep] = before
        self._next[ep] = cursor
        self._prev[cursor] = ep

    def remove(self, ep: Endpoint) -> None:
        after = self._next.pop(ep)
        before = self._prev.pop(ep)
        if after is ep:  # it was the only one
            self._cursor = None
            return
        self._next[before] = after
        self._prev[after] = before
        if self._cursor is ep:
            self._cursor = after

    def changed(self, ep: Endpoint) -> None:
        # Load-blind, but a call for a non-member is a broker bug worth surfacing.
        if ep not in self._next:
            raise KeyError(ep)

    def pick(self, key: bytes | None = None) -> Endpoint | None:
        ep = self._cursor
        if ep is not None:
            self._cursor = self._next[ep]
        return ep

    def __len__(self) -> int:
        return len(self._next)
