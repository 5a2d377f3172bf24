"""Dispatch policies, in process: contract, distributions, and each algorithm's own promise.

No sockets, no sleeps: fixed-seed ``random.Random`` everywhere, and p2c-ewma's clock is replaced.
The broker's call protocol is simulated: after ``pick`` the endpoint's ``outstanding`` goes up and
``changed`` follows (or ``remove`` when it is full); a completion lowers it and calls ``changed``
(or ``add`` when it had been full).
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import math
import os
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from zrouter.broker.policies import POLICIES, Endpoint, Policy, consistent_hash, make_policy, p2c_ewma, weighted
from zrouter.broker.policies.p2c_ewma import COLD_START_EWMA, DECAY_TIME, FORCE_PICK, update_ewma

ALL = sorted(POLICIES)
SEED = 20240611


@dataclass(eq=False)  # eq=False keeps identity hashing, like the broker's WorkerState
class FakeEndpoint:
    key: bytes
    outstanding: int = 0
    weight: float = 1.0
    ewma: float = 0.0

    def __repr__(self) -> str:
        return self.key.decode()


def endpoints(n: int, weights: Sequence[float] | None = None) -> list[FakeEndpoint]:
    return [FakeEndpoint(b"w%d" % i, weight=weights[i] if weights else 1.0) for i in range(n)]


def policy_with(name: str, eps: Sequence[FakeEndpoint], seed: int = SEED) -> Policy:
    p = make_policy(name, random.Random(seed))
    for ep in eps:
        p.add(ep)
    return p


def pick(p: Policy, key: bytes | None = None) -> FakeEndpoint:
    ep = p.pick(key)
    assert isinstance(ep, FakeEndpoint)
    return ep


def dispatch_and_complete(p: Policy, key: bytes | None = None) -> FakeEndpoint:
    """One request that finishes before the next arrives (zero standing load)."""
    ep = pick(p, key)
    ep.outstanding += 1
    p.changed(ep)
    ep.outstanding -= 1
    p.changed(ep)
    return ep


def shares(counts: collections.Counter[FakeEndpoint], eps: Sequence[FakeEndpoint]) -> list[float]:
    total = sum(counts.values())
    return [counts[ep] / total for ep in eps]


# -- registry ----------------------------------------------------------------------------------


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


# -- the contract every policy keeps --------------------------------------------------------------


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
            ep = FakeEndpoint(b"w%d" % step, weight=rng.choice([0.5, 1.0, 2.0, 3.0]), ewma=rng.random() / 10)
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
        elif op < 0.12 and eligible:
            ep = rng.choice(sorted(eligible, key=lambda e: e.key))
            ep.weight = rng.choice([0.5, 1.0, 2.0, 3.0])
            ep.ewma = rng.random() / 10
            p.changed(ep)
        elif op < 0.55 and inflight:
            ep = inflight.pop(rng.randrange(len(inflight)))
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


# -- distributions -------------------------------------------------------------------------------

# (policy, weights, expected shares, tolerance) with a request completing before the next arrives.
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


def run_under_load(p: Policy, eps: Sequence[FakeEndpoint], concurrency: int, n: int) -> list[float]:
    """Keep ``concurrency`` requests in flight; each step one random in-flight request completes
    (equal service times) and a new one is dispatched."""
    rng = random.Random(SEED + 1)
    inflight: list[FakeEndpoint] = []
    counts: collections.Counter[FakeEndpoint] = collections.Counter()
    for _ in range(n):
        if len(inflight) >= concurrency:
            done = inflight.pop(rng.randrange(len(inflight)))
            done.outstanding -= 1
            p.changed(done)
        ep = pick(p)
        ep.outstanding += 1
        p.changed(ep)
        inflight.append(ep)
        counts[ep] += 1
    return shares(counts, eps)


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


def test_least_outstanding_load_spreads_evenly_under_load() -> None:
    eps = endpoints(4)
    got = run_under_load(policy_with("least-outstanding", eps), eps, concurrency=20, n=8000)
    assert got == pytest.approx([0.25] * 4, abs=0.02)


# -- least-outstanding ---------------------------------------------------------------------------


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


# -- weighted (nginx smooth weighted round-robin) ------------------------------------------------------


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


# -- round-robin -------------------------------------------------------------------------------------


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


# -- random --------------------------------------------------------------------------------------


def test_random_stays_uniform_after_removals() -> None:
    eps = endpoints(6)
    p = policy_with("random", eps)
    for ep in (eps[0], eps[3]):
        p.remove(ep)
    rest = [eps[1], eps[2], eps[4], eps[5]]
    counts = collections.Counter(pick(p) for _ in range(8000))
    assert set(counts) == set(rest)
    assert shares(counts, rest) == pytest.approx([0.25] * 4, abs=0.02)


# -- p2c-ewma -------------------------------------------------------------------------------------


def test_p2c_sends_less_to_a_slow_endpoint() -> None:
    slow, *fast = eps = endpoints(4)
    slow.ewma = 0.100
    for ep in fast:
        ep.ewma = 0.010
    p = policy_with("p2c-ewma", eps)
    assert isinstance(p, p2c_ewma.P2CEwma)
    now = [0.0]
    p.clock = lambda: now[0]
    counts: collections.Counter[FakeEndpoint] = collections.Counter()
    for _ in range(4000):
        now[0] += 0.0001  # 10k requests/s: every fast worker is picked well within FORCE_PICK
        counts[dispatch_and_complete(p)] += 1
    # Always the loser of its pair (the two are distinct), and never idle for FORCE_PICK.
    assert counts[slow] == 0
    assert shares(counts, fast) == pytest.approx([1 / 3] * 3, abs=0.03)


def test_p2c_weighs_outstanding_into_load() -> None:
    fast, slow = endpoints(2)
    fast.ewma, slow.ewma = 0.010, 0.030
    fast.outstanding = 3  # 0.010 * 4 = 0.040 > 0.030 * 1
    p = policy_with("p2c-ewma", [fast, slow])
    assert isinstance(p, p2c_ewma.P2CEwma)
    p.clock = lambda: 0.0
    assert pick(p) is slow
    fast.outstanding = 1  # 0.010 * 2 = 0.020 < 0.030
    p.changed(fast)
    assert pick(p) is fast


def test_p2c_force_picks_a_worker_left_idle_too_long() -> None:
    fast, slow = endpoints(2)
    fast.ewma, slow.ewma = 0.010, 0.500
    p = policy_with("p2c-ewma", [fast, slow])
    assert isinstance(p, p2c_ewma.P2CEwma)
    now = [100.0]
    p.clock = lambda: now[0]
    p.remove(slow)
    p.add(slow)  # its pick clock starts now
    assert pick(p) is fast
    now[0] += FORCE_PICK  # not yet: strictly more than FORCE_PICK
    assert pick(p) is fast
    now[0] += 0.001
    assert pick(p) is slow
    assert pick(p) is fast  # and the force pick reset its clock


def test_p2c_tries_a_cold_worker() -> None:
    eps = endpoints(5)
    for ep in eps[:4]:
        ep.ewma = 0.020
    cold = eps[4]
    p = policy_with("p2c-ewma", eps)
    assert isinstance(p, p2c_ewma.P2CEwma)
    p.clock = lambda: 0.0
    # Idle, it wins every pair it is in (2 of 5 pairs)...
    assert collections.Counter(dispatch_and_complete(p) for _ in range(2000))[cold] > 600
    # ...but its own outstanding count still weighs: with 0.020/COLD_START_EWMA in flight it is
    # no cheaper than an idle measured worker and stops winning.
    cold.outstanding = round(0.020 / COLD_START_EWMA)
    p.changed(cold)
    assert collections.Counter(pick(p) for _ in range(500))[cold] == 0


def test_update_ewma_first_sample_is_taken_as_is() -> None:
    assert update_ewma(0.0, 0.042, elapsed=123.0) == 0.042


@pytest.mark.parametrize(
    ("old", "rtt", "elapsed", "tau", "expected"),
    [
        (0.1, 0.2, 10.0, 10.0, 0.1 * math.exp(-1) + 0.2 * (1 - math.exp(-1))),
        (0.1, 0.2, 5.0, 10.0, 0.1 * math.exp(-0.5) + 0.2 * (1 - math.exp(-0.5))),
        (0.1, 0.9, 1.0, 2.0, 0.1 * math.exp(-0.5) + 0.9 * (1 - math.exp(-0.5))),
        (0.1, 0.2, 0.0, 10.0, 0.1),  # back-to-back samples: history unchanged
        (0.1, 0.2, -3.0, 10.0, 0.1),  # a clock step backwards counts as no time passing
        (0.1, 0.2, 1e6, 10.0, 0.2),  # after a long silence the new sample is all that counts
    ],
)
def test_update_ewma_decays_with_time(
    old: float, rtt: float, elapsed: float, tau: float, expected: float
) -> None:
    assert update_ewma(old, rtt, elapsed, tau) == pytest.approx(expected, rel=1e-12)


def test_update_ewma_default_decay_time() -> None:
    assert DECAY_TIME == 10.0
    assert update_ewma(0.1, 0.2, 10.0) == pytest.approx(update_ewma(0.1, 0.2, 10.0, 10.0))


# -- consistent-hash -----------------------------------------------------------------------------

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
    root = Path(__file__).resolve().parents[2]
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


def test_p2c_load_is_latency_times_outstanding_plus_one() -> None:
    ep: Endpoint = FakeEndpoint(b"x")  # also checks, under mypy, that the fake fits the protocol
    load: Callable[[Endpoint], float] = p2c_ewma.load
    assert load(ep) == COLD_START_EWMA
    assert load(FakeEndpoint(b"y", outstanding=2, ewma=0.05)) == pytest.approx(0.15)


def test_p2c_never_forces_a_busy_worker() -> None:
    """A slow worker still holding requests will report fresh latency when they finish;
    forcing more onto it only keeps it saturated."""
    fast, slow = endpoints(2)
    fast.ewma, slow.ewma = 0.010, 0.500
    slow.outstanding = 1
    p = policy_with("p2c-ewma", [fast, slow])
    assert isinstance(p, p2c_ewma.P2CEwma)
    now = [100.0]
    p.clock = lambda: now[0]
    p.remove(slow)
    p.add(slow)  # its pick clock starts now
    now[0] += 10 * FORCE_PICK
    assert [pick(p) for _ in range(5)] == [fast] * 5
    slow.outstanding = 0
    p.changed(slow)
    assert pick(p) is slow
