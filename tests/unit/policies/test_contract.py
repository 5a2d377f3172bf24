"""The contract every dispatch policy keeps (registry, membership, the broker's call protocol)
and the distributions each gives at zero load; each policy's own promise is tested in the module
named after its file."""

from __future__ import annotations

import collections
import random
from pathlib import Path

import pytest

from tests.unit.policies.helpers import (
    ALL,
    SEED,
    FakeEndpoint,
    dispatch_and_complete,
    endpoints,
    policy_with,
    shares,
)
from zrouter.broker.policies import POLICIES, consistent_hash, make_policy, p2c_ewma

def test_every_policy_is_registered_under_its_name() -> None:
    assert set(POLICIES) == {
        "least-outstanding",
        "weighted",
        "weighted-least-outstanding",
        "round-robin",
        "random",
        "p2c-ewma",
        "consistent-hash",
    }
    for name in ALL:
        assert make_policy(name).name == name


def test_every_policy_module_in_the_package_is_imported_by_it() -> None:
    package = Path(consistent_hash.__file__).parent
    modules = {p.stem for p in package.glob("*.py") if not p.stem.startswith("_") and p.stem != "base"}
    registered = {cls.__module__.rsplit(".", 1)[1] for cls in POLICIES.values()}
    assert modules == registered


def test_unknown_policy_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="least-outstanding"):
        make_policy("fastest")


@pytest.mark.parametrize("name", ALL)
def test_empty_policy_picks_none(name: str) -> None:
    p = make_policy(name, random.Random(SEED))
    assert len(p) == 0
    assert p.pick() is None
    assert p.pick(b"some key") is None
    ep = FakeEndpoint(b"a")
    p.add(ep)
    p.remove(ep)
    assert len(p) == 0
    assert p.pick() is None
    assert p.pick(b"some key") is None


@pytest.mark.parametrize("name", ALL)
def test_membership_errors(name: str) -> None:
    a, b = endpoints(2)
    p = policy_with(name, [a])
    with pytest.raises(ValueError):
        p.add(a)
    with pytest.raises(KeyError):
        p.remove(b)
    with pytest.raises(KeyError):
        p.changed(b)
    p.remove(a)
    with pytest.raises(KeyError):
        p.remove(a)
    with pytest.raises(KeyError):
        p.changed(a)
    assert len(p) == 0


@pytest.mark.parametrize("name", ALL)
def test_single_endpoint_is_always_picked(name: str) -> None:
    (a,) = endpoints(1)
    p = policy_with(name, [a])
    for i in range(50):
        assert dispatch_and_complete(p, None if i % 2 else b"k%d" % i) is a


@pytest.mark.parametrize("name", ALL)
def test_random_broker_traffic_only_ever_picks_eligible_endpoints(name: str) -> None:
    """Workers join, leave, fill up and drain at random; every pick must be a worker that is
    eligible right now, and len() must track the eligible count."""
    rng = random.Random(SEED)
    p = make_policy(name, random.Random(SEED))
    if isinstance(p, p2c_ewma.P2CEwma):
        now = [0.0]
        p.clock = lambda: now[0]
    capacity = 3
    known: list[FakeEndpoint] = []
    eligible: set[FakeEndpoint] = set()
    inflight: list[FakeEndpoint] = []
    for step in range(4000):
        op = rng.random()
        if op < 0.05 or not known:
            ep = FakeEndpoint(b"w%d" % step, weight=rng.choice([0.5, 1.0, 2.0, 3.0]))
            known.append(ep)
            p.add(ep)
            eligible.add(ep)
        elif op < 0.08:
            ep = rng.choice(known)
            known.remove(ep)
            inflight = [x for x in inflight if x is not ep]
            if ep in eligible:
                p.remove(ep)
                eligible.discard(ep)
            p.forget(ep)  # gone for good, as the broker says of a worker that left
        elif op < 0.12 and eligible:
            ep = rng.choice(sorted(eligible, key=lambda e: e.key))
            ep.weight = rng.choice([0.5, 1.0, 2.0, 3.0])
            p.changed(ep)
        elif op < 0.55 and inflight:
            ep = inflight.pop(rng.randrange(len(inflight)))
            p.done(ep, rng.random() / 10, float(step))
            ep.outstanding -= 1
            if ep in eligible:
                p.changed(ep)
            else:
                p.add(ep)
                eligible.add(ep)
        else:
            got = p.pick(None if rng.random() < 0.3 else b"key%d" % rng.randrange(100))
            if not eligible:
                assert got is None
                continue
            assert got in eligible
            assert isinstance(got, FakeEndpoint)
            got.outstanding += 1
            inflight.append(got)
            if got.outstanding >= capacity:
                p.remove(got)
                eligible.discard(got)
            else:
                p.changed(got)
        assert len(p) == len(eligible)


ZERO_LOAD_CASES = [
    ("weighted", [1, 2, 3], [1 / 6, 2 / 6, 3 / 6], 0.0),  # nginx is exact over whole periods
    ("weighted", [0.5, 1.5], [0.25, 0.75], 0.0),
    ("round-robin", [1, 2, 3], [1 / 3, 1 / 3, 1 / 3], 0.0),
    ("random", [1, 1, 1, 1], [0.25] * 4, 0.02),
    ("least-outstanding", [1, 1, 1, 1], [0.25] * 4, 0.02),  # all at 0: the random tie-break
    ("consistent-hash", [1, 1, 1, 1], [0.25] * 4, 0.02),  # keyless requests: random
    ("weighted-least-outstanding", [1, 1, 1, 1], [0.25] * 4, 0.02),
    ("p2c-ewma", [1, 1, 1, 1], [0.25] * 4, 0.02),
]


@pytest.mark.parametrize(("name", "weights", "expected", "tolerance"), ZERO_LOAD_CASES)
def test_distribution_at_zero_load(
    name: str, weights: list[float], expected: list[float], tolerance: float
) -> None:
    eps = endpoints(len(weights), weights)
    p = policy_with(name, eps)
    if isinstance(p, p2c_ewma.P2CEwma):
        p.clock = lambda: 0.0
    counts = collections.Counter(dispatch_and_complete(p) for _ in range(6000))
    assert shares(counts, eps) == pytest.approx(expected, abs=tolerance + 1e-12)



@pytest.mark.parametrize("name", ALL)
def test_done_and_forget_follow_the_brokers_call_order(name: str) -> None:
    """``done`` comes for eligible and full workers alike; ``forget`` after ``remove``, or for a
    worker the policy never saw; a forgotten worker may come back as a new one."""
    a, b = endpoints(2)
    p = policy_with(name, [a, b])
    p.done(a, 0.010, 1.0)  # eligible
    p.remove(b)
    p.done(b, 0.020, 1.5)  # full: out of the policy, its reply still reported
    p.add(b)
    p.remove(b)
    p.forget(b)
    p.forget(FakeEndpoint(b"never seen"))
    assert len(p) == 1
    assert dispatch_and_complete(p) is a
    p.add(b)
    assert len(p) == 2
    picked = {dispatch_and_complete(p, b"k%d" % i) for i in range(200)}
    assert b in picked and picked <= {a, b}
