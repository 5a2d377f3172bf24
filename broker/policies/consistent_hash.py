"""Consistent hashing: requests with the same key go to the same worker while it stays eligible.

Each worker owns ``VIRTUAL_NODES`` points on a 64-bit hash ring, hashed from its ``key``; a
request goes to the owner of the first point clockwise from the hash of its key. When a worker
leaves, only the keys that hashed to its points move (to the next points clockwise, spread over
the remaining workers) and they come back when it returns, since its points are derived from its
key alone; a new worker takes about 1/(n+1) of the keys, from everyone evenly.

"Leaves" includes being full or draining: the broker removes a worker from the policy while it
has no free credit, so its keys spill to the next worker clockwise until it has room again. That
is bounded-load-like behaviour (a hot key cannot queue behind a saturated worker; it is served
by a neighbour meanwhile) without a separate load bound, at the price of affinity during
saturation. Requests without a key (``None``) go to a uniformly random eligible worker.

Hashes are BLAKE2b, not ``hash()``: Python salts ``hash()`` of bytes per process, and a ring must
map a key to the same worker across broker restarts and on every broker of a fleet.

A removed worker is parked rather than taken off the ring at once: its points stay, and picks walk
past them to the next eligible worker, which gives exactly the result of removing it; adding it
back just unparks it. Only when parked workers outnumber eligible ones by ``PARK_RATIO`` (plus
slack) do the longest-parked lose their points, which bounds both the walk and the memory held
for workers that are gone for good. A new worker whose points are held by a parked one (the same
instance back on a new connection has the same key) takes them over.

Ring layout: points are spread over 2**bits buckets by their top bits, each bucket a sorted list
kept around ``BUCKET_LOAD`` points, so a lookup is one bucket index plus a bisect in a short list,
and placing or evicting a worker is ``VIRTUAL_NODES`` short-list insertions or deletions instead
of shifting one sorted list of up to n * ``VIRTUAL_NODES`` points (1.6 million at 10,000
workers). Buckets are re-split as the ring grows or shrinks (O(points), amortised).

Costs: ``pick`` and ``changed`` O(1) expected; ``remove`` and re-``add`` of a parked worker O(1)
(amortised, counting evictions); placing a worker not on the ring O(``VIRTUAL_NODES``).

Worker keys are assumed unique among eligible workers (they are instance names). Should two
eligible ones share a key, the later gets no points and only keyless requests; two different
keys hashing to the same 64-bit point (odds ~1e-7 at 10,000 workers) cost the later a point.
"""

from __future__ import annotations

import hashlib
import random
import struct
from bisect import bisect_left, insort
from collections.abc import Iterator

from zrouter.broker.policies._indexed import IndexedSet
from zrouter.broker.policies.base import Endpoint, Policy

__all__ = ["PARK_RATIO", "PARK_SLACK", "VIRTUAL_NODES", "ConsistentHash", "ring_hash"]

# Points per worker. A worker's share of the keys varies by about 1/sqrt(VIRTUAL_NODES) around
# 1/n: 160 (ketama's choice) gives ~8%, while a ring of 10,000 workers stays at 1.6M points.
VIRTUAL_NODES = 160

# A worker taken out (full, draining, gone: the interface does not say which) keeps its points,
# skipped by picks, while parked workers number at most PARK_RATIO per eligible one plus
# PARK_SLACK; beyond that the longest-parked lose their points. Keeping them makes the broker's
# constant full/has-credit churn O(1) instead of VIRTUAL_NODES ring edits each way; the bound
# keeps a pick's walk past parked points short (about PARK_RATIO + 1 points on average) and the
# points of workers that are gone for good from piling up.
PARK_RATIO = 3
PARK_SLACK = 64

# A 64-byte BLAKE2b digest holds eight 64-bit points: an eighth of the hashing on every add.
_POINTS_PER_DIGEST = 8
_UNPACK_POINTS = struct.Struct(">8Q").unpack

# Average points per ring bucket: short enough that bisect and list shifts in a bucket are cheap,
# long enough that empty buckets (skipped when walking clockwise) are rare.
BUCKET_LOAD = 16

_HASH_BITS = 64


def ring_hash(data: bytes) -> int:
    """A stable 64-bit hash of a request key: the same in every process and on every host."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _worker_points(key: bytes) -> list[int]:
    points: list[int] = []
    for i in range(-(-VIRTUAL_NODES // _POINTS_PER_DIGEST)):
        # "#" then digits: a suffix the digits alone cannot fake, so distinct keys never share input.
        points.extend(_UNPACK_POINTS(hashlib.blake2b(key + b"#%d" % i, digest_size=64).digest()))
    return points[:VIRTUAL_NODES]


class _Ring:
    """Sorted 64-bit points split into 2**bits buckets by their top bits."""

    __slots__ = ("_bits", "_buckets", "_shift", "_size")

    def __init__(self) -> None:
        self._bits = 0
        self._shift = _HASH_BITS
        self._buckets: list[list[int]] = [[]]
        self._size = 0

    def insert(self, point: int) -> None:
        insort(self._buckets[point >> self._shift], point)
        self._size += 1
        if self._size > BUCKET_LOAD * len(self._buckets):
            self._rebucket(self._bits + 1)

    def delete(self, point: int) -> None:
        bucket = self._buckets[point >> self._shift]
        del bucket[bisect_left(bucket, point)]
        self._size -= 1
        # Shrink at a quarter of the target load, not half, so a size hovering near a
        # threshold cannot make every other insert or delete re-split the ring.
        if self._bits and self._size * 4 < BUCKET_LOAD * len(self._buckets):
            self._rebucket(self._bits - 1)

    def clockwise(self, h: int) -> Iterator[int]:
        """Every point once, from the first at or after ``h`` round to the last before it."""
        buckets = self._buckets
        index = h >> self._shift
        bucket = buckets[index]
        i = bisect_left(bucket, h)
        yield from bucket[i:]
        n = len(buckets)
        for step in range(1, n):
            yield from buckets[(index + step) % n]
        yield from bucket[:i]

    def _rebucket(self, bits: int) -> None:
        shift = _HASH_BITS - bits
        buckets: list[list[int]] = [[] for _ in range(1 << bits)]
        for bucket in self._buckets:  # buckets in order, each sorted: appends stay sorted
            for point in bucket:
                buckets[point >> shift].append(point)
        self._bits, self._shift, self._buckets = bits, shift, buckets


class ConsistentHash(Policy):
    name = "consistent-hash"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._ring = _Ring()
        self._owner: dict[int, Endpoint] = {}
        self._points: dict[Endpoint, list[int]] = {}  # every worker on the ring, eligible or parked
        self._members: IndexedSet[Endpoint] = IndexedSet()  # the eligible ones
        self._parked: dict[Endpoint, None] = {}  # on the ring but ineligible, longest-parked first

    def add(self, ep: Endpoint) -> None:
        self._members.add(ep)
        if ep in self._parked:
            del self._parked[ep]
            return
        owned: list[int] = []
        for point in _worker_points(ep.key):
            holder = self._owner.get(point)
            if holder is not None and holder in self._parked:
                # The same worker instance back on a new connection (same key, so same points),
                # or a real 64-bit collision: the parked worker yields its place.
                self._evict(holder)
                holder = None
            if holder is None:
                self._owner[point] = ep
                self._ring.insert(point)
                owned.append(point)
        self._points[ep] = owned

    def remove(self, ep: Endpoint) -> None:
        self._members.remove(ep)
        self._parked[ep] = None
        limit = PARK_RATIO * len(self._members) + PARK_SLACK
        while len(self._parked) > limit:
            self._evict(next(iter(self._parked)))

    def changed(self, ep: Endpoint) -> None:
        # Load-blind, but a call for a non-member is a broker bug worth surfacing.
        if ep not in self._members:
            raise KeyError(ep)

    def pick(self, key: bytes | None = None) -> Endpoint | None:
        members = self._members
        if not members:
            return None
        if key is not None:
            owner = self._owner
            for point in self._ring.clockwise(ring_hash(key)):
                ep = owner[point]
                if ep in members:
                    return ep
        # Keyless; or (duplicate worker keys only) no eligible worker holds a point.
        return members.choice(self.rng)

    def __len__(self) -> int:
        return len(self._members)

    def _evict(self, ep: Endpoint) -> None:
        del self._parked[ep]
        for point in self._points.pop(ep):
            del self._owner[point]
            self._ring.delete(point)
