"""``weighted-least-outstanding``: lowest (outstanding + 1) / weight
(``zrouter.broker.policies.weighted_least_outstanding``)."""

from __future__ import annotations

import random

import pytest

from tests.unit.policies.helpers import (
    SEED,
    FakeEndpoint,
    dispatch_and_complete,
    endpoints,
    pick,
    policy_with,
    run_under_load,
)


def test_weighted_least_outstanding_honours_weights_under_load() -> None:
    eps = endpoints(3, [1, 2, 3])
    got = run_under_load(policy_with("weighted-least-outstanding", eps), eps, concurrency=60, n=20000)
    # In flight settles where (outstanding + 1) / weight is level, i.e. nearly in weight ratio.
    assert got == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=0.03)


def test_weighted_least_outstanding_prefers_heavier_worker_when_idle() -> None:
    light, heavy = endpoints(2, [1, 3])
    p = policy_with("weighted-least-outstanding", [light, heavy])
    assert {dispatch_and_complete(p) for _ in range(100)} == {heavy}


def test_weighted_least_outstanding_picks_the_lowest_score() -> None:
    rng = random.Random(SEED)
    eps = endpoints(20, [rng.choice([1, 2, 5]) for _ in range(20)])
    p = policy_with("weighted-least-outstanding", eps)
    for _ in range(500):
        if rng.random() < 0.5:
            ep = pick(p)
            best = min((e.outstanding + 1) / e.weight for e in eps)
            assert (ep.outstanding + 1) / ep.weight == best
            ep.outstanding += 1
        else:
            ep = rng.choice([e for e in eps if e.outstanding] or eps)
            ep.outstanding = max(0, ep.outstanding - 1)
        p.changed(ep)


def test_weighted_least_outstanding_keeps_no_memory_through_capacity_churn() -> None:
    """The drift ``weighted`` had (a worker taken out when full lost its place) cannot happen
    here: the score is (outstanding + 1) / weight, computed afresh when a worker comes back, and
    ties are broken by a fresh draw, not by join order. Every pick has the lowest score among the
    workers with a free credit, however often they fill up and come back."""
    rng = random.Random(SEED)
    eps = endpoints(6, [1, 1, 2, 3, 5, 5])
    p = policy_with("weighted-least-outstanding", eps)
    capacity = 2
    eligible = set(eps)
    inflight: list[FakeEndpoint] = []
    for _ in range(3000):
        if inflight and (rng.random() < 0.5 or not eligible):
            ep = inflight.pop(rng.randrange(len(inflight)))
            ep.outstanding -= 1
            if ep in eligible:
                p.changed(ep)
            else:
                p.add(ep)
                eligible.add(ep)
        else:
            ep = pick(p)
            assert ep in eligible
            assert (ep.outstanding + 1) / ep.weight == min((e.outstanding + 1) / e.weight for e in eligible)
            ep.outstanding += 1
            inflight.append(ep)
            if ep.outstanding >= capacity:
                p.remove(ep)
                eligible.discard(ep)
            else:
                p.changed(ep)
