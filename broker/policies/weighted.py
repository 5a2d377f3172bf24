"""Weighted round-robin, smooth, exactly as nginx does it.

nginx (``ngx_http_upstream_get_peer``): on every pick, each peer's ``current_weight`` grows by its
effective weight; the peer with the largest ``current_weight`` wins (the earliest one on a tie)
and gives back the total of all weights. Weights 5, 1, 1 thus give a a b a c a a rather than
a a a a a b c: heavy workers get their share spread out, not in bursts. Over any W consecutive
picks (W = total weight, integer weights) each worker gets exactly its weight.

Cost. nginx scans every peer on every pick: O(n), about 1.4 ms per pick at 10,000 workers in
CPython 3.11. This module returns the same picks more cheaply. After r picks a worker's
current weight is ``r * w + b`` for a per-worker offset ``b`` that only changes when the worker
itself is picked, added or re-weighted. Workers of equal weight therefore keep their relative
order as r grows, so each weight class is a heap keyed by ``b`` (earliest first on ties), and a
pick compares only the top of each class: O(G + log n) for G distinct weights. Brokers usually
see a handful of weights (declared ones, plus the values Consul health warnings lower them to),
so G is small; when every worker has its own weight this degrades to nginx's O(n), at about
1.7 times its constant (bench/policy_pick.py shows both cases).

Considered and rejected: EDF / virtual-time scheduling as in Envoy (O(log n) always). It keeps
the long-run proportions but not nginx's interleaving (5, 1, 1 gives a a a a then a tie between
a, b and c), and nginx's interleaving is the point of this policy.

Membership changes, which nginx (a fixed peer list) does not have. The broker takes a worker out
of the policy whenever it has no free credit and puts it back when a reply frees one, which at
low capacity is after nearly every pick. nginx skips such a peer (``max_conns`` reached, or down)
and leaves its ``current_weight`` alone, so that is what ``remove`` does here: the worker is
parked with its current weight and its place in the order, is not counted in the total while
out, and ``add`` resumes it exactly where it was. Forgetting the running weight instead (and
re-adding at 0, last in order) was a steady bias: with weights 3:1 at capacity 1, one request at
a time, the heavy worker got 66.7% instead of 75%, with 2:1 50% instead of 67%. Only a worker
never seen, or one ``forget`` dropped (the broker calls it when the worker is gone for good),
starts at current weight 0, last in order, like a peer in a freshly loaded nginx config; parked
workers therefore cost memory only while the broker itself knows them. A weight change keeps the
worker's current weight, as nginx does when it adjusts ``effective_weight``; a parked worker whose
weight changed resumes with its new weight.

While a worker is out, the others take its turns and it does not make them up later (nginx's
choice too: a burst at the worker that just filled up would hurt most where it is busiest). So
once the credits fill up, shares follow credits and worker speeds rather than weights: with
workers as fast as their weights say they hold at every capacity and load (tests/unit/policies/
test_weighted.py); a share larger than a worker's share of the credits is out of reach for any
policy that never holds a request back while a worker has a free credit.
"""

from __future__ import annotations

import itertools
import random

from zrouter.broker.policies._lazy_heap import LazyHeap
from zrouter.broker.policies.base import Endpoint, Policy

__all__ = ["REBASE_AFTER", "Weighted"]

# Fold r back into the offsets this often: r * w and b grow without bound while their sum stays
# small, and floats lose the sum's precision as they grow. O(n) once per this many picks.
REBASE_AFTER = 1 << 20


class _Member:
    __slots__ = ("offset", "order", "weight")

    def __init__(self, weight: float, offset: float, order: int) -> None:
        self.weight = weight
        self.offset = offset  # b: current weight = rounds * weight + offset
        self.order = order  # nginx's list position: the earlier worker wins a tie


class Weighted(Policy):
    name = "weighted"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._members: dict[Endpoint, _Member] = {}
        # One heap per distinct weight, keyed by (-offset, order): its top is that class's leader.
        self._classes: dict[float, LazyHeap[Endpoint]] = {}
        # Workers taken out (full, draining, unhealthy): (current weight, order) to resume with.
        self._parked: dict[Endpoint, tuple[float, int]] = {}
        self._rounds = 0  # picks since the last rebase
        self._total = 0.0
        self._order = itertools.count()

    def add(self, ep: Endpoint) -> None:
        if ep in self._members:
            raise ValueError(f"{ep!r} is already present")
        weight = ep.weight
        parked = self._parked.pop(ep, None)
        current, order = parked if parked is not None else (0.0, next(self._order))
        m = self._members[ep] = _Member(weight, current - self._rounds * weight, order)
        self._total += weight
        self._file(ep, m)

    def remove(self, ep: Endpoint) -> None:
        m = self._members.pop(ep)
        self._parked[ep] = (self._rounds * m.weight + m.offset, m.order)
        self._total -= m.weight
        self._unfile(ep, m.weight)
        if not self._members:
            self._total = 0.0  # shed the rounding error the running sum has collected

    def forget(self, ep: Endpoint) -> None:
        if ep in self._members:
            raise ValueError(f"{ep!r} is still eligible: remove it first")
        self._parked.pop(ep, None)

    def changed(self, ep: Endpoint) -> None:
        m = self._members[ep]
        weight = ep.weight
        if weight == m.weight:
            return  # the usual case: only the load changed, which this policy ignores
        self._unfile(ep, m.weight)
        current = self._rounds * m.weight + m.offset
        self._total += weight - m.weight
        m.weight = weight
        m.offset = current - self._rounds * weight
        self._file(ep, m)

    def pick(self, key: bytes | None = None) -> Endpoint | None:
        if not self._members:
            return None
        if self._rounds >= REBASE_AFTER:
            self._rebase()
        rounds = self._rounds + 1
        best: Endpoint | None = None
        best_current = 0.0
        best_order = 0
        for weight, heap in self._classes.items():
            top = heap.peek()
            assert top is not None  # empty classes are deleted
            neg_offset, order, ep = top
            current = rounds * weight - neg_offset
            if best is None or current > best_current or (current == best_current and order < best_order):
                best, best_current, best_order = ep, current, int(order)
        assert best is not None
        m = self._members[best]
        m.offset -= self._total
        self._classes[m.weight].set(best, -m.offset, m.order)
        self._rounds = rounds
        return best

    def __len__(self) -> int:
        return len(self._members)

    def _file(self, ep: Endpoint, m: _Member) -> None:
        heap = self._classes.get(m.weight)
        if heap is None:
            heap = self._classes[m.weight] = LazyHeap()
        heap.set(ep, -m.offset, m.order)

    def _unfile(self, ep: Endpoint, weight: float) -> None:
        heap = self._classes[weight]
        heap.discard(ep)
        if not heap:
            del self._classes[weight]

    def _rebase(self) -> None:
        """Restart r at 0 without changing any current weight."""
        rounds = self._rounds
        self._rounds = 0
        self._classes = {}
        for ep, m in self._members.items():
            m.offset += rounds * m.weight
            self._file(ep, m)
        self._total = sum(m.weight for m in self._members.values())  # drop the running sum's drift
