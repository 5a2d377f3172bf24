"""``consistent-hash``: key affinity, minimal movement, a stable hash
(``zrouter.broker.policies.consistent_hash``)."""

from __future__ import annotations

import bisect
import collections
import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.policies.helpers import SEED, FakeEndpoint, endpoints, policy_with, pick
from zrouter.broker.policies import Policy, consistent_hash


KEYS = [b"user-%d" % i for i in range(10_000)]


def assignment(p: Policy) -> dict[bytes, FakeEndpoint]:
    return {k: pick(p, k) for k in KEYS}


def test_consistent_hash_same_key_same_endpoint() -> None:
    eps = endpoints(10)
    p = policy_with("consistent-hash", eps, seed=1)
    first = assignment(p)
    assert assignment(p) == first
    # Independent of the rng and of the order workers joined in.
    q = policy_with("consistent-hash", list(reversed(eps)), seed=2)
    assert assignment(q) == first


def test_consistent_hash_spreads_keys() -> None:
    eps = endpoints(10)
    counts = collections.Counter(assignment(policy_with("consistent-hash", eps)).values())
    assert set(counts) == set(eps)
    # 160 points per worker: each share within ~4 sigma (8% each) of the fair 1,000.
    assert all(650 < n < 1350 for n in counts.values()), counts


@pytest.mark.parametrize("n", [5, 10, 20])
def test_consistent_hash_removal_moves_only_the_removed_workers_keys(n: int) -> None:
    eps = endpoints(n)
    p = policy_with("consistent-hash", eps)
    before = assignment(p)
    gone = eps[n // 2]
    p.remove(gone)
    after = assignment(p)
    moved = {k for k in KEYS if before[k] is not after[k]}
    assert moved == {k for k in KEYS if before[k] is gone}
    assert after == assignment(policy_with("consistent-hash", [e for e in eps if e is not gone]))
    assert len(moved) / len(KEYS) == pytest.approx(1 / n, rel=0.35)
    # Its keys spread over the others rather than landing on one neighbour.
    assert len({after[k] for k in moved}) > n // 2
    # Back with the same key, it gets exactly its keys back.
    p.add(gone)
    assert assignment(p) == before


@pytest.mark.parametrize("n", [5, 10, 20])
def test_consistent_hash_addition_takes_a_fair_share_from_everyone(n: int) -> None:
    eps = endpoints(n + 1)
    p = policy_with("consistent-hash", eps[:n])
    before = assignment(p)
    p.add(eps[n])
    after = assignment(p)
    moved = {k for k in KEYS if before[k] is not after[k]}
    assert all(after[k] is eps[n] for k in moved)
    assert len(moved) / len(KEYS) == pytest.approx(1 / (n + 1), rel=0.35)


def test_consistent_hash_full_worker_spills_and_returns() -> None:
    eps = endpoints(3)
    p = policy_with("consistent-hash", eps)
    key = b"sticky"
    home = pick(p, key)
    home.outstanding = 1
    p.remove(home)  # full: the broker takes it out
    neighbour = pick(p, key)
    assert neighbour is not home
    assert pick(p, key) is neighbour
    home.outstanding = 0
    p.add(home)
    assert pick(p, key) is home


def test_consistent_hash_ring_survives_growth_and_shrinkage() -> None:
    """Adding and removing enough workers to re-split the ring's buckets both ways keeps the
    same key → worker mapping as a ring built directly with the survivors."""
    eps = endpoints(200)
    p = policy_with("consistent-hash", eps)
    for ep in eps[5:]:
        p.remove(ep)
    direct = policy_with("consistent-hash", eps[:5])
    assert assignment(p) == assignment(direct)


def test_consistent_hash_churn_matches_a_ring_built_from_scratch() -> None:
    """Workers taken out (parked, then evicted once many are out) and put back, over several
    rounds and in any order, leave the same mapping as a fresh ring of the eligible workers."""
    rng = random.Random(SEED)
    eps = endpoints(150)
    p = policy_with("consistent-hash", eps)
    eligible = set(eps)
    for _ in range(4):
        for ep in rng.sample(sorted(eligible, key=lambda e: e.key), len(eligible) - 10):
            p.remove(ep)
            eligible.discard(ep)
        for ep in rng.sample([e for e in eps if e not in eligible], 70):
            p.add(ep)
            eligible.add(ep)
        assert len(p) == len(eligible)
        assert assignment(p) == assignment(policy_with("consistent-hash", list(eligible)))


def test_consistent_hash_ring_walks_every_point_once_clockwise() -> None:
    rng = random.Random(SEED)
    ring = consistent_hash._Ring()
    points = list(dict.fromkeys(rng.getrandbits(64) for _ in range(3000)))
    for point in points:
        ring.insert(point)
    for point in points[1000:]:
        ring.delete(point)  # shrinks the bucket table again
    kept = sorted(points[:1000])
    for h in [0, 2**64 - 1, kept[0], kept[-1] + 1, *(rng.getrandbits(64) for _ in range(50))]:
        i = bisect.bisect_left(kept, h)
        assert list(ring.clockwise(h)) == kept[i:] + kept[:i]


def test_consistent_hash_same_instance_on_a_new_connection_takes_over_its_keys() -> None:
    eps = endpoints(5)
    p = policy_with("consistent-hash", eps)
    before = assignment(p)
    old = eps[2]
    p.remove(old)
    new = FakeEndpoint(old.key)  # same instance name, new WorkerState
    p.add(new)
    assert assignment(p) == {k: new if ep is old else ep for k, ep in before.items()}


def test_consistent_hash_new_connection_takes_over_after_its_old_self_was_evicted() -> None:
    eps = endpoints(100)
    p = policy_with("consistent-hash", eps)
    old, rest = eps[0], eps[1:]
    p.remove(old)
    p.add(old)
    p.remove(old)  # now the longest parked...
    for ep in rest[:95]:
        p.remove(ep)  # ...and evicted once parked workers exceed PARK_RATIO per eligible one
    new = FakeEndpoint(old.key)
    p.add(new)
    for ep in rest[:95]:
        p.add(ep)
    assert assignment(p) == assignment(policy_with("consistent-hash", [new, *rest]))


def test_consistent_hash_is_stable_across_processes() -> None:
    """The mapping must not depend on Python's per-process hash() salt."""
    script = (
        "import random\n"
        "from zrouter.broker.policies import make_policy\n"
        "class E:\n"
        "    outstanding, weight, ewma = 0, 1.0, 0.0\n"
        "    def __init__(self, key): self.key = key\n"
        "p = make_policy('consistent-hash', random.Random(0))\n"
        "for i in range(10): p.add(E(b'w%d' % i))\n"
        "print(','.join(p.pick(b'key%d' % i).key.decode() for i in range(200)))\n"
    )
    root = Path(__file__).resolve().parents[3]
    outputs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(root))
        run = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root, check=False
        )
        assert run.returncode == 0, run.stderr
        outputs.add(run.stdout)
    assert len(outputs) == 1


def test_consistent_hash_key_hash_is_blake2b() -> None:
    assert consistent_hash.ring_hash(b"abc") == int.from_bytes(
        hashlib.blake2b(b"abc", digest_size=8).digest(), "big"
    )
