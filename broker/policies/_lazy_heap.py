"""A min-heap whose items can be re-prioritised or dropped in O(log n), shared by the heap-based
policies.

``heapq`` cannot change or delete an entry in place, so updating an item pushes a fresh entry
and leaves the old one behind as garbage ("lazy invalidation"); ``peek`` discards garbage it finds
on top. Garbage that never reaches the top (an item whose old priority was worse than everything
live) would otherwise pile up forever, so the heap is rebuilt from the live entries once garbage
outnumbers them: O(n) work after at least n updates, i.e. amortised O(1).
"""

from __future__ import annotations

import heapq
import itertools
from typing import Generic, TypeVar

from zrouter import _speedups

__all__ = ["LazyHeap", "PyLazyHeap"]

T = TypeVar("T")

# Rebuild only past this much garbage too, so tiny heaps do not rebuild on every other update.
COMPACT_SLACK = 64

_Entry = tuple[float, float, int, T]


class LazyHeap(Generic[T]):
    """Items ordered by ``(primary, secondary)``, smallest first; ties beyond that go to the
    earlier-set item. ``set`` of a new item adds it; ``discard`` of a non-member raises
    ``KeyError``."""

    __slots__ = ("_heap", "_live", "_seq")

    def __init__(self) -> None:
        # The unique sequence number in each entry keeps heapq from ever comparing two items,
        # which need not be orderable.
        self._heap: list[_Entry[T]] = []
        self._live: dict[T, _Entry[T]] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, item: object) -> bool:
        return item in self._live

    def items(self) -> list[T]:
        return list(self._live)

    def set(self, item: T, primary: float, secondary: float = 0.0) -> None:
        entry = (primary, secondary, next(self._seq), item)
        self._live[item] = entry
        heapq.heappush(self._heap, entry)
        self._maybe_compact()

    def discard(self, item: T) -> None:
        del self._live[item]
        self._maybe_compact()

    def peek(self) -> tuple[float, float, T] | None:
        """The smallest live item with its priority, or ``None`` when empty."""
        heap, live = self._heap, self._live
        while heap:
            top = heap[0]
            if live.get(top[3]) is top:
                return top[0], top[1], top[3]
            heapq.heappop(heap)
        return None

    def _maybe_compact(self) -> None:
        if len(self._heap) > 2 * len(self._live) + COMPACT_SLACK:
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)


# The reference above stays importable as PyLazyHeap; when the compiled path runs, LazyHeap is its
# twin (zrouter/_native/sets.pyx: same entries, same order), weighted's pick running through it.
PyLazyHeap = LazyHeap
if _speedups.native():
    LazyHeap = _speedups.load_native("sets").LazyHeap  # type: ignore[misc,assignment]
