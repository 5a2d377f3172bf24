"""``least-outstanding``: fewest in flight, ties at random (``zrouter.broker.policies.least_outstanding``)."""

from __future__ import annotations

import collections
import random

import pytest

from tests.unit.policies.helpers import FakeEndpoint, endpoints, policy_with, pick, run_under_load
from zrouter.broker.policies import make_policy


def test_least_outstanding_load_spreads_evenly_under_load() -> None:
    eps = endpoints(4)
    got = run_under_load(policy_with("least-outstanding", eps), eps, concurrency=20, n=8000)
    assert got == pytest.approx([0.25] * 4, abs=0.02)


@pytest.mark.parametrize("seed", range(5))
def test_least_outstanding_never_picks_a_busier_worker(seed: int) -> None:
    rng = random.Random(seed)
    p = make_policy("least-outstanding", random.Random(seed))
    capacity = 6
    eligible: list[FakeEndpoint] = []
    full: list[FakeEndpoint] = []
    inflight: list[FakeEndpoint] = []
    for step in range(3000):
        op = rng.random()
        if op < 0.03 or not (eligible or full):
            ep = FakeEndpoint(b"w%d" % step, outstanding=rng.randrange(capacity))
            p.add(ep)
            eligible.append(ep)
            inflight.extend([ep] * ep.outstanding)
        elif op < 0.05 and eligible:
            ep = eligible.pop(rng.randrange(len(eligible)))
            p.remove(ep)  # draining: stays out, its requests still complete
        elif op < 0.5 and inflight:
            ep = inflight.pop(rng.randrange(len(inflight)))
            ep.outstanding -= 1
            if ep in full:
                full.remove(ep)
                p.add(ep)
                eligible.append(ep)
            elif ep in eligible:
                p.changed(ep)
        else:
            got = p.pick()
            if not eligible:
                assert got is None
                continue
            assert isinstance(got, FakeEndpoint)
            assert got.outstanding == min(e.outstanding for e in eligible)
            got.outstanding += 1
            inflight.append(got)
            if got.outstanding >= capacity:
                eligible.remove(got)
                full.append(got)
                p.remove(got)
            else:
                p.changed(got)


def test_least_outstanding_breaks_ties_at_random() -> None:
    eps = endpoints(5)
    for ep, n in zip(eps, [2, 1, 1, 1, 3], strict=True):
        ep.outstanding = n
    p = policy_with("least-outstanding", eps)
    seen = collections.Counter(pick(p) for _ in range(3000))
    assert set(seen) == {eps[1], eps[2], eps[3]}
    assert min(seen.values()) > 800
