"""The compiled client path (zrouter/_native/client.pyx) against the reference (ClientCore.start,
handle_reply and _drain): two cores, one driven through each, get the same random traffic
(requests with good and bad arguments, payloads raw and msgpack, within and past the bounds;
replies OK, failed, msgpack, malformed, unknown, duplicate and oversized; brokers going down,
coming up and being removed; deadlines passing; cancels) and must send the same frames, give
every request the same outcome and keep the same bookkeeping after every step."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_client_core import DOWN, UP, Factory, reply
from zrouter import _speedups
from zrouter import protocol as p
from zrouter.client._core import ClientCore, Entry

native = _speedups.load_native("client")

BROKERS = ("tcp://a:1", "tcp://b:1")
SHADOWED = ("start", "handle_reply", "_drain")


class Side:
    """One core with fake broker sockets; ``compiled`` picks which path its methods take."""

    def __init__(self, compiled: bool) -> None:
        self.factory = Factory()
        self.core = ClientCore(list(BROKERS), self.factory, timeout=5.0, max_message_size=300, max_inflight=4,
                               max_inflight_bytes=500)
        for name in SHADOWED:  # the reference: the class's own methods, whatever the build
            self.core.__dict__.pop(name, None)
        if compiled:
            path = native.ClientPath(self.core, self.core.start, self.core.handle_reply)
            self.core.start, self.core.handle_reply, self.core._drain = path.start, path.handle_reply, path.drain
        self.entries: list[Entry] = []

    def start(self, args: tuple[Any, ...], now: float) -> str:
        entry = Entry()
        try:
            conn = self.core.start(entry, *args, now)
        except Exception as exc:  # the arguments' error, which both paths must raise alike
            return f"{type(exc).__name__}: {exc}"
        self.entries.append(entry)
        return "queued" if conn is None else conn.endpoint

    def state(self) -> Any:
        core = self.core
        conns = {ep: (c.pending, c.pending_bytes, c.up, c.removed, c.closed) for ep, c in core._brokers.conns.items()}
        sent = {ep: [[bytes(f) if not isinstance(f, (bytes, str)) else f for f in m] for m in s.messages]
                for ep, s in self.factory.socks.items()}
        outcomes = [(e.rid, e._done, e._value, type(e._error).__name__, str(e._error), e.attempt,
                     None if e.conn is None else e.conn.endpoint, e.payload) for e in self.entries]
        return (conns, sent, outcomes, sorted(core.pending), [e.rid for e in core._waiting], sorted(core._held),
                core._next_rid, sorted((d, r) for d, r, _ in core._deadlines))


def random_args(rng: random.Random) -> tuple[Any, ...]:
    service = rng.choice(["echo", "echo", "echo", "", 5, "other"])
    payload = rng.choice([b"x" * rng.randrange(0, 40), {"k": rng.randrange(9)}, b"y" * 350, b"z" * 200,
                          bytearray(b"ab"), memoryview(b"mv"), None])
    timeout = rng.choice([None, None, 0.5, 2.0, 3, -1.0, float("nan"), 1e-4, float("inf"), 86_400.0, 86_400.5])
    key = rng.choice([None, None, b"k", "k", 7])
    return (service, payload, timeout, rng.random() < 0.8, key)


def random_reply(rng: random.Random, rids: list[int]) -> list[Any]:
    rid = rng.choice(rids) if rids and rng.random() < 0.85 else rng.choice([0, 999, 2**64 - 1])
    kind = rng.randrange(10)
    if kind == 0:
        return reply(rid, rng.choice([p.STATUS_TIMEOUT, p.STATUS_REMOTE_ERROR, p.STATUS_OVERLOADED, 99]),
                     message="no", error_type="KeyError")
    if kind == 1:
        return reply(rid, flags=p.FLAG_MSGPACK, payload=msgpack.packb({"v": rid}))
    if kind == 2:
        return reply(rid, flags=p.FLAG_MSGPACK, payload=b"\xc1")  # flagged msgpack, does not decode
    if kind == 3:
        return reply(rid, payload=b"q" * 301)  # over max_message_size
    if kind == 4:
        good = reply(rid, payload=b"p")
        bad = rng.choice([good[:2], [good[0], b"not msgpack", good[2]], [b"ZRT2", *good[1:]], [*good, b"extra"],
                          [good[0], p.encode_request(rid or 1, "echo", 5), good[2]]])
        return [f if isinstance(f, zmq.Frame) else zmq.Frame(f) for f in bad]
    return reply(rid, payload=b"r%d" % rid)


def walk(seed: int, steps: int) -> None:
    rng = random.Random(seed)
    sides = [Side(False), Side(True)]
    for side in sides:
        for ep in BROKERS:
            side.core.connection_event(side.core.connection(ep), UP, 0.0)  # type: ignore[arg-type]
    now = 0.0
    for step in range(steps):
        now += rng.choice([0.0, 0.001, 0.3, 1.0])
        op = rng.randrange(100)
        results = []
        if op < 45:
            args = random_args(rng)
            results = [side.start(args, now) for side in sides]
        elif op < 80:
            frames = random_reply(rng, [e.rid for e in sides[0].entries if getattr(e, "rid", None)])
            for side in sides:
                side.core.handle_reply(frames)
        elif op < 86:
            ep = rng.choice(BROKERS)
            event = rng.choice([UP, DOWN])
            for side in sides:
                conn = side.core.connection(ep)
                if conn is not None:
                    side.core.connection_event(conn, event, now)
        elif op < 88:
            ep = rng.choice(BROKERS)
            remove = rng.random() < 0.5
            for side in sides:
                if remove:
                    side.core.remove_broker(ep)
                else:
                    side.core.add_broker(ep)
        elif op < 92:
            accept = rng.random() < 0.5
            for side in sides:
                for sock in side.factory.socks.values():
                    sock.accept = accept
        elif op < 96:
            index = rng.randrange(len(sides[0].entries)) if sides[0].entries else None
            for side in sides:
                if index is not None:
                    side.core.cancel(side.entries[index])
        else:
            for side in sides:
                side.core.tick(now)
        if results:
            assert results[0] == results[1], (seed, step)
        assert sides[0].state() == sides[1].state(), (seed, step, op)


@pytest.mark.parametrize("seed", range(12))
def test_random_walks_match_the_reference(seed: int) -> None:
    walk(seed, 1500)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_hypothesis_seeds_match_the_reference(seed: int) -> None:
    walk(seed, 120)


def test_drain_reads_a_real_socket_until_empty() -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.bind("inproc://test-client-drain")
        dealer.connect("inproc://test-client-drain")
        side = Side(True)
        core = side.core
        conn = core.connection(BROKERS[0])
        assert conn is not None
        conn.sock = dealer
        core.connection_event(conn, UP, 0.0)
        entries = [Entry() for _ in range(3)]
        for entry in entries:
            assert core.start(entry, "echo", b"hi", None, True, None, 0.0) is conn
        for entry in entries:
            peer, *frames = router.recv_multipart()
            assert p.decode_request(frames[1]).rid == entry.rid and frames[2] == b"hi"
            router.send_multipart([peer, p.SIGNATURE, p.encode_reply(entry.rid), b"back %d" % entry.rid])
        assert dealer.poll(1000)
        core._drain(conn)
        assert [e._value for e in entries] == [b"back %d" % e.rid for e in entries]
        assert conn.pending == 0 and conn.pending_bytes == 0 and not dealer.poll(0)
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()
