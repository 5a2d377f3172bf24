"""A set with O(1) add, remove and uniform random choice, shared by several policies.

A Python ``set`` cannot hand out a random member without copying it into a sequence first,
which costs O(n) per pick; a list plus an item → position map keeps every operation O(1) by
swapping the last item into the hole a removal leaves.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Generic, TypeVar

from zrouter import _speedups

__all__ = ["IndexedSet", "PyIndexedSet"]

T = TypeVar("T")


class IndexedSet(Generic[T]):
    """Members in arbitrary order; ``add`` of a member raises ``ValueError``, ``remove`` of a
    non-member ``KeyError`` (the policies' shared contract)."""

    __slots__ = ("_index", "_items")

    def __init__(self) -> None:
        self._items: list[T] = []
        self._index: dict[T, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._index

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    def __getitem__(self, i: int) -> T:
        return self._items[i]

    def add(self, item: T) -> None:
        if item in self._index:
            raise ValueError(f"{item!r} is already present")
        self._index[item] = len(self._items)
        self._items.append(item)

    def remove(self, item: T) -> None:
        i = self._index.pop(item)
        last = self._items.pop()
        if i < len(self._items):  # the hole is not at the end: fill it with the old last item
            self._items[i] = last
            self._index[last] = i

    def choice(self, rng: random.Random) -> T:
        """A uniformly random member; ``IndexError`` when empty."""
        return self._items[rng.randrange(len(self._items))]


# The reference above stays importable as PyIndexedSet; when the compiled path runs, IndexedSet is its
# twin (zrouter/_native/sets.pyx: same contract, same calls to ``rng``), a pick and two updates
# being on every request's path.
PyIndexedSet = IndexedSet
if _speedups.native():
    IndexedSet = _speedups.load_native("sets").IndexedSet  # type: ignore[misc,assignment]
