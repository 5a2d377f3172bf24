"""The compiled policy containers (zrouter/_native/sets.pyx) against their references
(zrouter/broker/policies/_indexed.py, _buckets.py): the same random operations on both give the
same results, the same errors, the same members in the same order, and the same picks from
equally seeded ``random.Random`` (a seeded policy must pick the same workers on both paths)."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from zrouter import _speedups
from zrouter.broker.policies import _buckets, _indexed

native = _speedups.load_native("sets")

ITEMS = st.integers(0, 11)
SET_OPS = st.lists(st.tuples(st.sampled_from(["add", "remove", "choice", "contains", "len", "iter", "get"]), ITEMS),
                   max_size=200)
# Integer counts (least-outstanding) and float scores (weighted-least-outstanding) both occur.
KEYS = st.one_of(st.integers(0, 6), st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.25]))
BUCKET_OPS = st.lists(st.tuples(st.sampled_from(["add", "remove", "update", "choice", "contains", "len"]), ITEMS, KEYS),
                      max_size=300)


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except Exception as exc:  # the error type is part of the contract
        return "raised", type(exc)


def _set_step(s: Any, op: str, item: int, rng: random.Random) -> tuple[str, Any]:
    if op == "add":
        return _outcome(lambda: s.add(item))
    if op == "remove":
        return _outcome(lambda: s.remove(item))
    if op == "choice":
        return _outcome(lambda: s.choice(rng))
    if op == "contains":
        return _outcome(lambda: item in s)
    if op == "len":
        return _outcome(lambda: len(s))
    if op == "iter":
        return _outcome(lambda: list(s))
    return _outcome(lambda: s[item % 4 - 2])  # negative, zero and positive positions


@settings(max_examples=300, deadline=None)
@given(SET_OPS, st.integers(0, 2**32))
def test_indexed_set_twins_agree(ops: list[tuple[str, int]], seed: int) -> None:
    ref, twin = _indexed.PyIndexedSet(), native.IndexedSet()
    rng_ref, rng_twin = random.Random(seed), random.Random(seed)
    for op, item in ops:
        assert _set_step(twin, op, item, rng_twin) == _set_step(ref, op, item, rng_ref), (op, item)
    assert list(twin) == list(ref)


def _bucket_step(b: Any, op: str, item: int, key: float, rng: random.Random) -> tuple[str, Any]:
    if op == "add":
        return _outcome(lambda: b.add(item, key))
    if op == "remove":
        return _outcome(lambda: b.remove(item))
    if op == "update":
        return _outcome(lambda: b.update(item, key))
    if op == "choice":
        return _outcome(lambda: b.choice_min(rng))
    if op == "contains":
        return _outcome(lambda: item in b)
    return _outcome(lambda: len(b))


@settings(max_examples=300, deadline=None)
@given(BUCKET_OPS, st.integers(0, 2**32))
def test_min_buckets_twins_agree(ops: list[tuple[str, int, float]], seed: int) -> None:
    ref, twin = _buckets.PyMinBuckets(), native.MinBuckets()
    rng_ref, rng_twin = random.Random(seed), random.Random(seed)
    for op, item, key in ops:
        got = [_bucket_step(b, op, item, key, rng) for b, rng in ((ref, rng_ref), (twin, rng_twin))]
        assert got[1] == got[0], (op, item, key)


def test_min_buckets_compacts_its_key_heap_like_the_reference() -> None:
    # Float scores that never surface would pile up in the heap: both rebuild past the same slack.
    assert native.COMPACT_SLACK == _buckets.COMPACT_SLACK
    for b in (_buckets.PyMinBuckets(), native.MinBuckets()):
        b.add("w", 0.0)
        for i in range(1, 10_000):
            b.update("w", i / 7.0)
        b.add("x", -1.0)
        assert len(b) == 2 and b.choice_min(random.Random(1)) == "x"


def test_the_policies_use_the_path_this_run_asked_for() -> None:
    compiled = _speedups.native()
    assert (_indexed.IndexedSet is native.IndexedSet) is compiled
    assert (_buckets.MinBuckets is native.MinBuckets) is compiled
    if not compiled:
        assert _indexed.IndexedSet is _indexed.PyIndexedSet and _buckets.MinBuckets is _buckets.PyMinBuckets


HEAP_OPS = st.lists(st.tuples(st.sampled_from(["set", "set", "discard", "peek", "len", "items", "contains"]),
                              ITEMS, st.sampled_from([0.0, -1.5, 2.0, 3.25, -7.0]), st.integers(0, 3)),
                    max_size=300)


@settings(max_examples=300, deadline=None)
@given(HEAP_OPS)
def test_lazy_heap_twins_agree(ops: list[tuple[str, int, float, int]]) -> None:
    from zrouter.broker.policies import _lazy_heap

    ref, twin = _lazy_heap.PyLazyHeap(), native.LazyHeap()
    assert native.COMPACT_SLACK == _lazy_heap.COMPACT_SLACK
    for op, item, primary, secondary in ops:
        got = [_heap_step(h, op, item, primary, secondary) for h in (ref, twin)]
        assert got[1] == got[0], (op, item, primary, secondary)


def _heap_step(h: Any, op: str, item: int, primary: float, secondary: int) -> tuple[str, Any]:
    if op == "set":
        return _outcome(lambda: h.set(item, primary, secondary))
    if op == "discard":
        return _outcome(lambda: h.discard(item))
    if op == "peek":
        return _outcome(h.peek)
    if op == "len":
        return _outcome(lambda: len(h))
    if op == "items":
        return _outcome(h.items)
    return _outcome(lambda: item in h)
