"""``weighted``: nginx's smooth weighted round-robin, its sequence and its churn
(``zrouter.broker.policies.weighted``)."""

from __future__ import annotations

import collections
import random

import pytest

from tests.unit.policies.helpers import SEED, FakeEndpoint, endpoints, policy_with, dispatch_and_complete, shares
from zrouter.broker.policies import make_policy, weighted


def test_weighted_gives_nginx_smooth_sequence() -> None:
    a, b, c = eps = endpoints(3, [5, 1, 1])
    a.key, b.key, c.key = b"a", b"b", b"c"
    p = policy_with("weighted", eps)
    got = "".join(dispatch_and_complete(p).key.decode() for _ in range(14))
    assert got == "aabacaa" * 2


def test_weighted_interleaves_within_every_period() -> None:
    eps = endpoints(3, [1, 2, 3])
    p = policy_with("weighted", eps)
    seq = [dispatch_and_complete(p) for _ in range(600)]
    for start in range(0, 600, 6):
        window = collections.Counter(seq[start : start + 6])
        assert [window[ep] for ep in eps] == [1, 2, 3]
    # Smooth: the weight-3 worker is never picked three times in a row.
    assert all(not (x is y is z) for x, y, z in zip(seq, seq[1:], seq[2:], strict=False))


def test_weighted_follows_a_weight_change() -> None:
    eps = endpoints(2, [1, 1])
    b = eps[1]
    p = policy_with("weighted", eps)
    for _ in range(10):
        dispatch_and_complete(p)
    b.weight = 3.0
    p.changed(b)
    counts = collections.Counter(dispatch_and_complete(p) for _ in range(4000))
    assert shares(counts, eps) == pytest.approx([0.25, 0.75], abs=0.01)


class NginxReference:
    """nginx's O(n) loop, written plainly, to check the grouped implementation against."""

    def __init__(self) -> None:
        self.peers: list[FakeEndpoint] = []
        self.current: dict[FakeEndpoint, float] = {}
        self.weight: dict[FakeEndpoint, float] = {}

    def add(self, ep: FakeEndpoint) -> None:
        self.peers.append(ep)
        self.current[ep] = 0.0
        self.weight[ep] = ep.weight

    def remove(self, ep: FakeEndpoint) -> None:
        self.peers.remove(ep)
        del self.current[ep], self.weight[ep]

    def changed(self, ep: FakeEndpoint) -> None:
        self.weight[ep] = ep.weight

    def pick(self) -> FakeEndpoint | None:
        best = None
        for ep in self.peers:
            self.current[ep] += self.weight[ep]
            if best is None or self.current[ep] > self.current[best]:
                best = ep
        if best is not None:
            self.current[best] -= sum(self.weight.values())
        return best


@pytest.mark.parametrize("rebase_after", [weighted.REBASE_AFTER, 7])
def test_weighted_matches_nginx_through_churn(rebase_after: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weighted, "REBASE_AFTER", rebase_after)
    rng = random.Random(SEED)
    p = make_policy("weighted", random.Random(SEED))
    ref = NginxReference()
    present: list[FakeEndpoint] = []
    absent: list[FakeEndpoint] = []
    weights = [0.5, 1.0, 1.0, 1.0, 2.0, 3.0, 4.5]  # exact in binary, so both sides agree bit for bit
    for step in range(5000):
        op = rng.random()
        if op < 0.04 or not present:
            ep = absent.pop() if absent and rng.random() < 0.5 else FakeEndpoint(b"w%d" % step)
            ep.weight = rng.choice(weights)
            p.add(ep)
            ref.add(ep)
            present.append(ep)
        elif op < 0.07:
            ep = present.pop(rng.randrange(len(present)))
            p.remove(ep)
            ref.remove(ep)
            absent.append(ep)
        elif op < 0.1:
            ep = rng.choice(present)
            ep.weight = rng.choice(weights)
            p.changed(ep)
            ref.changed(ep)
        else:
            assert p.pick() is ref.pick(), f"step {step}"
