"""``p2c-ewma``: power of two choices over latency EWMA x (outstanding + 1), force picks, and the
time-decayed EWMA itself (``zrouter.broker.policies.p2c_ewma``)."""

from __future__ import annotations

import collections
import math
from collections.abc import Callable

import pytest

from tests.unit.policies.helpers import FakeEndpoint, endpoints, policy_with, pick, dispatch_and_complete, shares
from zrouter.broker.policies import Endpoint, p2c_ewma
from zrouter.broker.policies.p2c_ewma import COLD_START_EWMA, DECAY_TIME, FORCE_PICK, update_ewma


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
