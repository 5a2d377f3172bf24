"""Items filed in buckets by a numeric key, with O(1) uniform choice among those whose key is
smallest; shared by the "least"-style policies.

Each bucket is a list + index map (``IndexedSet``), so moving an item between buckets and choosing
uniformly inside one are O(1). The smallest non-empty key comes from a min-heap of keys that may
hold keys whose bucket has since emptied; those are dropped when they surface at the top. A key
is in the heap at most once (``_queued``), so items moving back and forth between the same two
buckets add nothing; and since keys that never surface (high ones, or float scores a weight change
left behind) would still collect, the heap is rebuilt from the live keys once stale ones outnumber
them (amortised O(1)). Cost per update: O(1) plus an O(log k) heap push when a bucket appears,
k being the number of distinct keys (counts, scores), far fewer than items.

A heap of items with a random tie-break drawn per entry would not do: the item just re-scored
draws fresh while the others keep draws already known to be larger, so the same item keeps
winning ties.
"""

from __future__ import annotations

import heapq
import random
from typing import Generic, TypeVar

from zrouter import _speedups

from zrouter.broker.policies._indexed import IndexedSet

__all__ = ["MinBuckets", "PyMinBuckets"]

T = TypeVar("T")

# Stale keys tolerated beyond the live ones before a rebuild, so small sets do not rebuild often.
COMPACT_SLACK = 64


class MinBuckets(Generic[T]):
    """``add`` of a member raises ``ValueError``; ``remove``/``update`` of a non-member
    ``KeyError`` (the policies' shared contract)."""

    __slots__ = ("_buckets", "_filed", "_keys", "_queued")

    def __init__(self) -> None:
        # The key each item is filed under: callers pass the new key to ``update``, so the old
        # bucket has to be remembered here.
        self._filed: dict[T, float] = {}
        self._buckets: dict[float, IndexedSet[T]] = {}
        self._keys: list[float] = []
        self._queued: set[float] = set()

    def __len__(self) -> int:
        return len(self._filed)

    def __contains__(self, item: object) -> bool:
        return item in self._filed

    def add(self, item: T, key: float) -> None:
        if item in self._filed:
            raise ValueError(f"{item!r} is already present")
        self._file(item, key)

    def remove(self, item: T) -> None:
        self._unfile(item, self._filed.pop(item))

    def update(self, item: T, key: float) -> None:
        old = self._filed[item]
        if key != old:
            self._unfile(item, old)
            self._file(item, key)

    def choice_min(self, rng: random.Random) -> T | None:
        """A uniformly random item among those with the smallest key; ``None`` when empty."""
        keys = self._keys
        while keys:
            bucket = self._buckets.get(keys[0])
            if bucket is not None:
                return bucket.choice(rng)
            self._queued.discard(heapq.heappop(keys))
        return None

    def _file(self, item: T, key: float) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = IndexedSet()
            if key not in self._queued:
                self._queued.add(key)
                heapq.heappush(self._keys, key)
                if len(self._keys) > 2 * len(self._buckets) + COMPACT_SLACK:
                    self._keys = list(self._buckets)
                    heapq.heapify(self._keys)
                    self._queued = set(self._keys)
        bucket.add(item)
        self._filed[item] = key

    def _unfile(self, item: T, key: float) -> None:
        bucket = self._buckets[key]
        bucket.remove(item)
        if not bucket:
            del self._buckets[key]  # its key stays in the heap until it surfaces or a rebuild


# The reference above stays importable as PyMinBuckets; when the compiled path runs, MinBuckets is its
# twin (zrouter/_native/sets.pyx: same contract, same calls to ``rng``), a pick and two updates
# being on every request's path.
PyMinBuckets = MinBuckets
if _speedups.native():
    MinBuckets = _speedups.load_native("sets").MinBuckets  # type: ignore[misc,assignment]
