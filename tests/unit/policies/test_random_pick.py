"""``random``: uniform among the eligible (``zrouter.broker.policies.random_pick``)."""

from __future__ import annotations

import collections

import pytest

from tests.unit.policies.helpers import endpoints, policy_with, pick, shares


def test_random_stays_uniform_after_removals() -> None:
    eps = endpoints(6)
    p = policy_with("random", eps)
    for ep in (eps[0], eps[3]):
        p.remove(ep)
    rest = [eps[1], eps[2], eps[4], eps[5]]
    counts = collections.Counter(pick(p) for _ in range(8000))
    assert set(counts) == set(rest)
    assert shares(counts, rest) == pytest.approx([0.25] * 4, abs=0.02)
