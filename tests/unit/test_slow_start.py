"""Slow start: the ramp itself (pure functions) and the router applying it to a worker that joins an
established service, with time passed in: no sockets, no sleeps."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest

from zrouter import protocol as p
from zrouter.broker.router import Router
from zrouter.broker.slow_start import MIN_WEIGHT_FACTOR, ramp, slow_credit, slow_weight, starts_slow
from zrouter.broker.state import WorkerState

SETTLE = 3.0  # the router's liveness timeout in these tests


@pytest.mark.parametrize(
    ("elapsed", "window", "expected"),
    [(0.0, 10.0, 0.0), (2.5, 10.0, 0.25), (10.0, 10.0, 1.0), (99.0, 10.0, 1.0), (-1.0, 10.0, 0.0),
     (5.0, 0.0, 1.0), (5.0, -1.0, 1.0)],
)
def test_ramp_is_the_fraction_of_the_window_passed(elapsed: float, window: float, expected: float) -> None:
    assert ramp(elapsed, window) == expected


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [(0.0, 0.4), (0.5, 0.4), (1.0, 0.4), (2.5, 1.0), (5.0, 2.0), (10.0, 4.0), (50.0, 4.0)],
)
def test_weight_ramps_linearly_from_envoys_ten_percent(elapsed: float, expected: float) -> None:
    assert MIN_WEIGHT_FACTOR == 0.1
    assert slow_weight(4.0, elapsed, 10.0) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("capacity", "elapsed", "expected"),
    [(16, 0.0, 1), (16, 0.5, 1), (16, 1.25, 2), (16, 5.0, 8), (16, 9.99, 15), (16, 10.0, 16),
     (1, 0.0, 1), (3, 6.0, 1), (3, 7.0, 2), (0, 5.0, 0)],
)
def test_credits_grow_from_one_to_the_capacity_like_haproxys_maxconn(capacity: int, elapsed: float, expected: int) -> None:
    assert slow_credit(capacity, elapsed, 10.0) == expected


@pytest.mark.parametrize(
    ("window", "age", "others", "slow"),
    [(10.0, 60.0, 2, True), (0.0, 60.0, 2, False), (10.0, 60.0, 0, False), (10.0, 1.0, 2, False),
     (10.0, SETTLE, 1, True)],
)
def test_only_a_newcomer_to_an_established_service_starts_slow(window: float, age: float, others: int, slow: bool) -> None:
    assert starts_slow(window, age, others, SETTLE) is slow


class Sink:
    """Counts what the router sends: requests by worker (rid, ident) and client replies."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, int]] = []
        self.replies = 0

    def to_worker(self, ident: bytes, header: bytes, payload: Any) -> bool:
        h = msgpack.unpackb(header)
        if h[0] == p.REQUEST:
            self.requests.append((ident, h[1]))
        return True

    def to_client(self, client: bytes, header: bytes, payload: Any) -> None:
        self.replies += 1

    def to(self, ident: bytes) -> list[int]:
        return [rid for i, rid in self.requests if i == ident]


def router(policy: str = "least-outstanding", **kw: Any) -> tuple[Router, Sink]:
    sink = Sink()
    r = Router(sink, default_policy=policy, rng=random.Random(1), liveness_timeout=SETTLE, **kw)
    return r, sink


def join(r: Router, ident: bytes, now: float, capacity: int = 8, weight: int = 1, service: str = "svc") -> WorkerState:
    return r.worker_ready(ident, p.Ready(service, capacity, weight, {"instance": ident.decode()}), now)


def tick(r: Router, now: float) -> None:
    """A heartbeat interval passes; every worker has been heard from meanwhile."""
    for ident in r.workers:
        r.seen(ident, now)
    r.tick(now)


def send(r: Router, n: int, now: float, service: str = "svc") -> None:
    for i in range(n):
        r.request(b"c", i + 1, service, 600_000, 0, p.FLAG_IDEMPOTENT, None, b"x", now)


def test_a_newcomer_to_an_established_service_ramps_its_credits() -> None:
    r, sink = router(slow_start=10.0)
    old = join(r, b"old", now=0.0)
    new = join(r, b"new", now=100.0)
    assert old.credit == 8 and old.slow_window == 0.0  # the service's first worker is not slowed
    assert (new.credit, new.weight, new.slow_window) == (1, pytest.approx(0.1), 10.0)
    send(r, 20, now=100.0)
    assert len(sink.to(b"old")) == 8 and len(sink.to(b"new")) == 1  # 11 wait in the queue
    tick(r, 105.0)  # half-way: 4 credits; the queue feeds the 3 new ones at once
    assert len(sink.to(b"new")) == 4 and (new.credit, new.weight) == (4, pytest.approx(0.5))
    r.worker_reply(new, sink.to(b"new")[0], p.STATUS_OK, 0, None, None, b"", 107.5)  # a reply moves it too
    assert new.credit == 6 and new.outstanding == 6  # 3 still held, 3 more sent
    tick(r, 110.0)  # the window is over
    assert (new.credit, new.weight, new.slow_window) == (8, 1.0, 0.0)
    assert new.outstanding == 8 and len(sink.to(b"new")) == 9
    assert not r._ramping


def test_everyone_joining_a_new_service_or_a_restarted_broker_starts_at_full_speed() -> None:
    r, _ = router(slow_start=10.0)
    workers = [join(r, b"w%d" % i, now=0.1 * i) for i in range(5)]  # within the liveness timeout
    assert [w.credit for w in workers] == [8] * 5
    assert not r._ramping


def test_service_slow_start_overrides_the_default() -> None:
    r, _ = router(slow_start=10.0, service_slow_start={"fast": 0.0, "cold": 60.0})
    for service in ("svc", "fast", "cold"):
        join(r, b"a-" + service.encode(), now=0.0, service=service)
    assert join(r, b"b-svc", now=50.0, service="svc").slow_window == 10.0
    assert join(r, b"b-fast", now=50.0, service="fast").slow_window == 0.0
    b_cold = join(r, b"b-cold", now=50.0, service="cold")
    assert b_cold.slow_window == 60.0 and b_cold.credit == 1


def test_weighted_policies_see_the_ramped_weight() -> None:
    r, sink = router("weighted", slow_start=10.0)
    join(r, b"old", now=0.0, weight=1)
    new = join(r, b"new", now=100.0, weight=1)
    for _ in range(110):  # one at a time: the share follows the weights, 1 : 0.1
        send(r, 1, now=100.0)
        ident, rid = sink.requests[-1]
        r.worker_reply(r.workers[ident], rid, p.STATUS_OK, 0, None, None, b"", 100.0)
    assert len(sink.to(b"new")) == 10
    tick(r, 115.0)
    assert new.weight == 1.0


def test_a_ramping_worker_that_leaves_is_forgotten() -> None:
    r, _ = router(slow_start=10.0)
    join(r, b"old", now=0.0)
    new = join(r, b"new", now=100.0)
    assert r._ramping == {b"new": new}
    r.remove_worker(new, "test", 101.0)
    assert not r._ramping
    again = join(r, b"new", now=102.0)  # back on the same identity: a newcomer again
    assert r._ramping == {b"new": again} and again.credit == 1
    r.worker_update(again, 16, 1, 107.0)  # a new capacity ramps too: half of 16
    assert again.credit == 8


def test_no_slow_start_by_default() -> None:
    r, _ = router()
    join(r, b"old", now=0.0)
    assert join(r, b"new", now=100.0).credit == 8
