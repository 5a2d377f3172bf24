"""A worker's capacity split between brokers (``zrouter.worker._connection``: ``ready_share``,
``rebalance``, ``BrokerConnection``) against simulated brokers that keep to what they were told,
over FIFO links with random delays: brokers come, go, die and drain under full load, and the
worker never holds more than its capacity. Time is simulated; no sockets."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest

from zrouter.worker._connection import ACTIVE, DRAINING, BrokerConnection, ready_share, rebalance, split_capacity

SETTLE = 0.1  # the worker's heartbeat interval: a lowered share counts until then
MAX_DELAY = 0.04  # one-way delay of a message: below SETTLE, as a broker reads within milliseconds


class OpenSocket:
    """Stands for the DEALER socket: the connection is open while it has one."""

    def close(self, linger: int = 0) -> None:
        pass


@dataclass
class Link:
    """One direction of one connection: FIFO, each message delayed at random."""

    rng: random.Random
    queue: deque[tuple[float, tuple[Any, ...]]] = field(default_factory=deque)

    def send(self, now: float, msg: tuple[Any, ...]) -> None:
        at = now + self.rng.uniform(0.0, MAX_DELAY)
        if self.queue and self.queue[-1][0] > at:
            at = self.queue[-1][0]  # TCP keeps order
        self.queue.append((at, msg))

    def due(self, now: float) -> tuple[Any, ...] | None:
        if self.queue and self.queue[0][0] <= now:
            return self.queue.popleft()[1]
        return None


@dataclass
class Broker:
    """What a broker knows of the worker on one connection, and a queue that never runs dry."""

    up: Link
    down: Link
    share: int = 0
    outstanding: int = 0
    draining: bool = False


class Sim:
    def __init__(self, capacity: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.capacity = capacity
        self.now = 0.0
        self.conns: list[BrokerConnection] = []
        self.brokers: dict[BrokerConnection, Broker] = {}  # open connections only
        self.held: list[tuple[BrokerConnection, int]] = []  # requests at the worker, any connection
        self.short = False
        self.peak = 0
        self.sent = 0
        self.order = 0

    # -- the worker, as the Engine does it --------------------------------------------------------

    def rebalance(self) -> None:
        changes, self.short = rebalance(self.capacity, len(self.held), self.conns, self.now, SETTLE)
        for conn, share in changes:
            self.brokers[conn].up.send(self.now, ("UPDATE", share))

    def add_broker(self) -> None:
        conn = BrokerConnection(f"b{self.order}", self.order)
        self.order += 1
        self.conns.append(conn)
        share = ready_share(self.capacity, len(self.held), self.conns)
        conn.sock = OpenSocket()  # type: ignore[assignment]
        conn.start(share, self.now)
        broker = self.brokers[conn] = Broker(Link(self.rng), Link(self.rng))
        broker.up.send(self.now, ("READY", share))

    def lose(self, conn: BrokerConnection) -> None:
        """The connection dies (liveness, DISCONNECT): what it held keeps running, unanswered."""
        conn.close()
        del self.brokers[conn]
        self.conns.remove(conn)
        self.rebalance()

    def drain(self, conn: BrokerConnection) -> None:
        conn.state = DRAINING
        conn.set_share(0, self.now + SETTLE)
        self.brokers[conn].up.send(self.now, ("DRAIN",))

    def finish_one(self) -> None:
        conn, generation = self.held.pop(self.rng.randrange(len(self.held)))
        if conn.sock is not None and conn.generation == generation:
            self.brokers[conn].up.send(self.now, ("REPLY",))
            conn.owed -= 1
            conn.replied()
            if conn.state == DRAINING and conn.owed == 0 and conn.drain_acked:
                self.lose(conn)
        if self.short:
            self.rebalance()

    def receive(self, conn: BrokerConnection, msg: tuple[Any, ...]) -> None:
        if not conn.confirmed:
            conn.confirmed = True
            self.rebalance()
        if msg[0] == "REQUEST":
            self.held.append((conn, conn.generation))
            conn.owed += 1
            self.peak = max(self.peak, len(self.held))
            assert len(self.held) <= self.capacity, (self.now, [(c.endpoint, c.share, c.owed) for c in self.conns])
        elif msg[0] == "DRAIN" and conn.state == DRAINING:
            conn.drain_acked = True
            if conn.owed == 0:
                self.lose(conn)

    # -- the brokers: dispatch whenever they have a credit ----------------------------------------

    def broker_turn(self, conn: BrokerConnection, broker: Broker) -> None:
        while (msg := broker.up.due(self.now)) is not None:
            kind = msg[0]
            if kind == "READY":
                broker.share = msg[1]
                broker.down.send(self.now, ("HEARTBEAT",))
            elif kind == "UPDATE":
                broker.share = msg[1]
            elif kind == "REPLY":
                broker.outstanding -= 1
            elif kind == "DRAIN":
                broker.draining = True
                broker.down.send(self.now, ("DRAIN",))
        while not broker.draining and broker.outstanding < broker.share:
            broker.outstanding += 1
            self.sent += 1
            broker.down.send(self.now, ("REQUEST",))

    def step(self) -> None:
        self.now += self.rng.uniform(0.0, 0.01)
        for conn, broker in list(self.brokers.items()):
            self.broker_turn(conn, broker)
            while conn in self.brokers and (msg := broker.down.due(self.now)) is not None:
                self.receive(conn, msg)
        if self.held and self.rng.random() < 0.5:
            self.finish_one()
        if self.short:
            self.rebalance()  # the Engine's timer turn, at settle_at at the latest


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("capacity", [1, 4, 7])
def test_brokers_coming_and_going_under_load_never_overfill_the_worker(seed: int, capacity: int) -> None:
    sim = Sim(capacity, seed)
    sim.add_broker()
    for _ in range(3000):
        sim.step()
        r = sim.rng.random()
        open_ = [c for c in sim.conns if c.state == ACTIVE]
        if r < 0.01 and len(sim.conns) < 4:
            sim.add_broker()
        elif r < 0.015 and len(open_) > 1:
            sim.drain(sim.rng.choice(open_))
        elif r < 0.02 and len(open_) > 1:
            sim.lose(sim.rng.choice(open_))
    assert sim.peak == capacity  # the brokers kept it full, never more
    assert sim.sent > 20 * capacity

    # Quiet again: every open broker ends with its even share of the capacity.
    for _ in range(2000):
        sim.step()
    active = sorted((c for c in sim.conns if c.state == ACTIVE), key=lambda c: c.order)
    assert [c.share for c in active] == split_capacity(capacity, len(active))
    assert [sim.brokers[c].share for c in active] == split_capacity(capacity, len(active))


def test_a_new_broker_gets_capacity_only_as_the_old_ones_holdings_drain() -> None:
    """Issue 8's measured case: capacity 4, all of it held through broker A; B appears. A is
    lowered to 2 at once; B gets 1, then 2, as A's requests are answered, not before."""
    a, b = BrokerConnection("a", 0), BrokerConnection("b", 1)
    for conn in (a, b):
        conn.sock = OpenSocket()  # type: ignore[assignment]
    a.start(4, 0.0)
    a.confirmed, a.owed = True, 4
    b.start(ready_share(4, 4, [a, b]), 0.0)
    assert b.share == 0
    b.confirmed = True
    changes, short = rebalance(4, 4, [a, b], 0.0, SETTLE)
    assert changes == [(a, 2)] and short and a.bound() == 4
    a.owed -= 1
    a.replied()  # A frees a credit it can no longer refill beyond 2
    changes, short = rebalance(4, 3, [a, b], 0.01, SETTLE)
    assert changes == [(b, 1)] and short
    a.owed -= 1
    a.replied()
    changes, short = rebalance(4, 2, [a, b], 0.02, SETTLE)
    assert changes == [(b, 2)] and not short
    assert a.bound() + b.bound() == 4


def test_an_idle_broker_lowered_frees_its_share_once_settled() -> None:
    """With nothing held there are no replies to count: the old share counts until the broker
    must have read the UPDATE (settle), then the new broker gets its part."""
    a, b = BrokerConnection("a", 0), BrokerConnection("b", 1)
    for conn in (a, b):
        conn.sock = OpenSocket()  # type: ignore[assignment]
    a.start(4, 0.0)
    b.start(0, 0.0)
    a.confirmed = b.confirmed = True
    assert rebalance(4, 0, [a, b], 1.0, SETTLE) == ([(a, 2)], True)
    assert rebalance(4, 0, [a, b], 1.0 + SETTLE / 2, SETTLE) == ([], True)
    assert rebalance(4, 0, [a, b], 1.0 + SETTLE, SETTLE) == ([(b, 2)], False)


def test_requests_of_a_lost_connection_still_running_keep_their_room() -> None:
    a, b = BrokerConnection("a", 0), BrokerConnection("b", 1)
    b.sock = OpenSocket()  # type: ignore[assignment]
    b.start(1, 0.0)
    b.confirmed = True
    # a is closed (sock None) but 3 of its requests still run: b may have only what is left.
    assert rebalance(4, 3, [a, b], 0.0, SETTLE) == ([], True)
    assert ready_share(4, 3, [a]) == 1
    assert rebalance(4, 1, [a, b], 0.0, SETTLE) == ([(b, 3)], True)  # two finished
    assert rebalance(4, 0, [a, b], 0.0, SETTLE) == ([(b, 4)], False)
