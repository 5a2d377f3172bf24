# cython: language_level=3
"""The policies' containers, compiled: ``IndexedSet``, ``MinBuckets`` and ``LazyHeap``.

The references are zrouter/broker/policies/_indexed.py, _buckets.py and _lazy_heap.py (their
docstrings give the algorithms and costs); these twins keep the same contract (same errors, same iteration
order, the same calls to ``rng`` in the same order, so a seeded policy picks the same workers on
both paths: tests/native/test_sets.py drives both with the same random operations). They exist
because every request runs one pick and two ``changed`` calls through them: compiled, a
least-outstanding dispatch + completion cycle costs a fraction of the interpreted one
(``python bench/policy_pick.py``).
"""

from heapq import heapify, heappop, heappush
from random import Random

_Random = Random

__all__ = ["COMPACT_SLACK", "IndexedSet", "LazyHeap", "LeastOutstandingCore", "MinBuckets"]

# Same value and meaning as zrouter/broker/policies/_buckets.py (tests/native checks it).
COMPACT_SLACK = 64


cdef inline object _below(object rng, Py_ssize_t n):
    # rng.randrange(n) for n > 0 on a random.Random is its _randbelow(n), which draws
    # getrandbits(n.bit_length()) until the value is below n (CPython's random.py): the same
    # loop here gives the same draws without three Python-level calls per pick (test_sets
    # compares seeded picks with the reference's, so a Python that changes the loop fails
    # there). Any other rng (or n < 1, which must raise as the reference does) goes through
    # randrange itself.
    cdef Py_ssize_t k
    if n > 0 and type(rng) is _Random:
        k = (<object>n).bit_length()
        getrandbits = rng.getrandbits
        r = getrandbits(k)
        while r >= n:
            r = getrandbits(k)
        return r
    return rng.randrange(n)


cdef class IndexedSet:
    """Members in arbitrary order; ``add`` of a member raises ``ValueError``, ``remove`` of a
    non-member ``KeyError``."""

    cdef list _items
    cdef dict _index

    def __cinit__(self):
        self._items = []
        self._index = {}

    def __len__(self):
        return len(self._items)

    def __contains__(self, item):
        return item in self._index

    def __iter__(self):
        return iter(self._items)

    def __getitem__(self, Py_ssize_t i):
        return self._items[i]

    def __class_getitem__(cls, item):  # IndexedSet[T] in annotations and casts, as the reference
        return cls

    cpdef add(self, item):
        if item in self._index:
            raise ValueError(f"{item!r} is already present")
        self._index[item] = len(self._items)
        self._items.append(item)

    cpdef remove(self, item):
        cdef Py_ssize_t i = self._index.pop(item)
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._index[last] = i

    cpdef choice(self, rng):
        """A uniformly random member; ``IndexError`` when empty."""
        return self._items[_below(rng, len(self._items))]


cdef class MinBuckets:
    """``add`` of a member raises ``ValueError``; ``remove``/``update`` of a non-member
    ``KeyError``."""

    cdef dict _filed
    cdef dict _buckets
    cdef list _keys
    cdef set _queued

    def __cinit__(self):
        self._filed = {}
        self._buckets = {}
        self._keys = []
        self._queued = set()

    def __len__(self):
        return len(self._filed)

    def __contains__(self, item):
        return item in self._filed

    def __class_getitem__(cls, item):
        return cls

    cpdef add(self, item, key):
        if item in self._filed:
            raise ValueError(f"{item!r} is already present")
        self._file(item, key)

    cpdef remove(self, item):
        self._unfile(item, self._filed.pop(item))

    cpdef update(self, item, key):
        old = self._filed[item]
        if key != old:
            self._unfile(item, old)
            self._file(item, key)

    cpdef choice_min(self, rng):
        """A uniformly random item among those with the smallest key; ``None`` when empty."""
        cdef IndexedSet bucket
        while self._keys:
            bucket = self._buckets.get(self._keys[0])
            if bucket is not None:
                return bucket._items[_below(rng, len(bucket._items))]
            self._queued.discard(heappop(self._keys))
        return None

    cdef _file(self, item, key):
        cdef IndexedSet bucket = self._buckets.get(key)
        if bucket is None:
            bucket = IndexedSet()
            self._buckets[key] = bucket
            if key not in self._queued:
                self._queued.add(key)
                heappush(self._keys, key)
                if len(self._keys) > 2 * len(self._buckets) + COMPACT_SLACK:
                    self._keys = list(self._buckets)
                    heapify(self._keys)
                    self._queued = set(self._keys)
        bucket.add(item)
        self._filed[item] = key

    cdef _unfile(self, item, key):
        cdef IndexedSet bucket = self._buckets[key]
        bucket.remove(item)
        if not bucket._items:
            del self._buckets[key]


cdef class LeastOutstandingCore:
    """The least-outstanding policy's four per-request calls over its ``MinBuckets`` and ``rng``
    (zrouter/broker/policies/least_outstanding.py is the reference: each call is one line
    there). The policy binds these methods in place of its own when the compiled path runs,
    so a dispatch costs no Python frame."""

    cdef MinBuckets buckets
    cdef object rng

    def __init__(self, MinBuckets buckets, rng):
        self.buckets = buckets
        self.rng = rng

    cpdef add(self, ep):
        self.buckets.add(ep, ep.outstanding)

    cpdef remove(self, ep):
        self.buckets.remove(ep)

    cpdef changed(self, ep):
        self.buckets.update(ep, ep.outstanding)

    cpdef pick(self, key=None):
        return self.buckets.choice_min(self.rng)


cdef class LazyHeap:
    """Items ordered by ``(primary, secondary)``, smallest first; ties beyond that go to the
    earlier-set item. ``set`` of a new item adds it; ``discard`` of a non-member raises
    ``KeyError``. Entries are ``(primary, secondary, seq, item)`` tuples as in the reference, so
    the heap orders them the same way."""

    cdef list _heap
    cdef dict _live
    cdef object _seq

    def __cinit__(self):
        self._heap = []
        self._live = {}
        self._seq = 0

    def __len__(self):
        return len(self._live)

    def __contains__(self, item):
        return item in self._live

    def __class_getitem__(cls, item):
        return cls

    def items(self):
        return list(self._live)

    cpdef set(self, item, primary, secondary=0.0):
        entry = (primary, secondary, self._seq, item)
        self._seq += 1
        self._live[item] = entry
        heappush(self._heap, entry)
        self._maybe_compact()

    cpdef discard(self, item):
        del self._live[item]
        self._maybe_compact()

    cpdef peek(self):
        """The smallest live item with its priority, or ``None`` when empty."""
        cdef tuple top
        while self._heap:
            top = <tuple>self._heap[0]
            if self._live.get(top[3]) is top:
                return top[0], top[1], top[3]
            heappop(self._heap)
        return None

    cdef _maybe_compact(self):
        if len(self._heap) > 2 * len(self._live) + COMPACT_SLACK:
            self._heap = list(self._live.values())
            heapify(self._heap)
