"""``round-robin``: each in turn, through churn (``zrouter.broker.policies.round_robin``)."""

from __future__ import annotations

import collections
import random


from tests.unit.policies.helpers import SEED, FakeEndpoint, endpoints, policy_with, pick, dispatch_and_complete
from zrouter.broker.policies import make_policy


def test_round_robin_visits_each_once_per_cycle() -> None:
    eps = endpoints(7)
    p = policy_with("round-robin", eps)
    seq = [dispatch_and_complete(p) for _ in range(70)]
    first = seq[:7]
    assert set(first) == set(eps)
    assert seq == first * 10  # a stable order


def test_round_robin_churn_neither_skips_nor_repeats() -> None:
    """Between two picks of X, every worker eligible throughout that interval is picked exactly
    once, however others come and go."""
    rng = random.Random(SEED)
    p = make_policy("round-robin", random.Random(SEED))
    present: list[FakeEndpoint] = []
    since: dict[FakeEndpoint, int] = {}  # step it (re)joined
    picks: dict[FakeEndpoint, list[int]] = collections.defaultdict(list)
    for step in range(4000):
        op = rng.random()
        if op < 0.05 or len(present) < 2:
            ep = FakeEndpoint(b"w%d" % step)
            p.add(ep)
            present.append(ep)
            since[ep] = step
        elif op < 0.1:
            ep = present.pop(rng.randrange(len(present)))
            p.remove(ep)
            del since[ep]
        else:
            ep = pick(p)
            prev = picks[ep][-1] if picks[ep] else None
            if prev is not None and since[ep] < prev:
                for other in present:
                    if other is not ep and since[other] < prev:
                        between = [s for s in picks[other] if prev < s < step]
                        assert len(between) == 1, (step, ep, other)
            picks[ep].append(step)


def test_round_robin_new_worker_joins_at_the_back_of_the_line() -> None:
    """A (re)joining worker waits for everyone already in the rotation: one that keeps filling up
    and coming back does not get more than its turn."""
    a, b, c, d = endpoints(4)
    p = policy_with("round-robin", [a, b, c])
    assert pick(p) is a
    p.add(d)
    assert [pick(p) for _ in range(8)] == [b, c, a, d, b, c, a, d]


def test_round_robin_removing_the_next_one_moves_on() -> None:
    a, b, c = endpoints(3)
    p = policy_with("round-robin", [a, b, c])
    assert pick(p) is a
    p.remove(b)
    assert [pick(p) for _ in range(4)] == [c, a, c, a]
