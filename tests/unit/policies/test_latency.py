"""Latency as policies keep it: go-zero's time-decayed EWMA and the per-service estimate
(``zrouter.broker.policies._latency``)."""

from __future__ import annotations

import math
import random

import pytest

from zrouter.broker.policies._latency import DECAY_TIME, RESUM_SLACK, LatencyTracker, update_ewma
from zrouter.broker.policies.p2c_ewma import update_ewma as exported


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
    assert exported is update_ewma  # p2c_ewma's public name for it


def test_tracker_decays_each_endpoint_by_its_own_clock() -> None:
    t: LatencyTracker[str] = LatencyTracker()
    assert t.ewma("a") == 0.0 and t.estimate() == 0.0 and len(t) == 0
    assert t.observe("a", 0.1, 5.0) == 0.1  # first sample as is
    t.observe("b", 0.4, 7.0)
    assert t.observe("a", 0.2, 15.0) == pytest.approx(update_ewma(0.1, 0.2, 10.0))  # 10 s since a's last
    assert t.ewma("b") == 0.4
    assert t.estimate() == pytest.approx((update_ewma(0.1, 0.2, 10.0) + 0.4) / 2)


def test_tracker_estimate_is_the_mean_over_endpoints_not_over_requests() -> None:
    """A fast endpoint answering a hundred times counts once, like the slow one."""
    t: LatencyTracker[str] = LatencyTracker()
    for i in range(100):
        t.observe("fast", 0.010, float(i))
    t.observe("slow", 0.090, 100.0)
    assert t.estimate() == pytest.approx(0.050)
    t.forget("slow")
    assert t.estimate() == pytest.approx(0.010)
    t.forget("slow")  # twice, or never seen: nothing happens
    t.forget("fast")
    assert t.estimate() == 0.0 and len(t) == 0


def test_tracker_running_sum_stays_exact() -> None:
    """Many samples and departures: the O(1) running mean matches a fresh mean of the EWMAs."""
    rng = random.Random(1)
    t: LatencyTracker[int] = LatencyTracker()
    for step in range(20 * RESUM_SLACK):
        ep = rng.randrange(30)
        if rng.random() < 0.1:
            t.forget(ep)
        else:
            t.observe(ep, rng.choice([1e-4, 0.5, 30.0]), step * 0.01)
        live = [t.ewma(i) for i in range(30) if t.ewma(i)]
        assert t.estimate() == pytest.approx(math.fsum(live) / len(live) if live else 0.0, rel=1e-9)
