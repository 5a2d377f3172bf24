"""Client and AsyncClient end to end over real sockets, against a scripted broker peer.

The peer is a ROUTER on a free loopback port, run by a thread, that decodes requests with
zrouter.protocol and answers by service name, so each test controls exactly what comes back
(echo, any status, a late reply, no reply, garbage) without a real broker or worker.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import zmq

from zrouter.client import (
    AsyncClient,
    Client,
    ClientClosed,
    MessageTooLarge,
    Overloaded,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    ServiceUnavailable,
    WorkerLost,
    ZRouterError,
)
from zrouter import protocol as p
from zrouter.transport import free_tcp_endpoint, recv_frames, send_frames

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0  # upper bound of every wait on a condition that should hold within milliseconds


class ScriptedBroker:
    """A stand-in broker. Services: ``echo``, ``status-N``, ``delay-MS``, ``silent``, ``twice``,
    ``garbage`` (two undecodable messages, then an echo), ``no-payload``, ``bad-header``.
    With ``hold=True`` it records requests and answers none."""

    def __init__(self, ctx: zmq.Context[Any], *, hold: bool = False, start_after: float = 0.0) -> None:
        self.endpoint = free_tcp_endpoint()
        self.hold = hold
        self.requests: list[p.Request] = []
        self.late_sent: list[int] = []  # rids of delayed replies already sent
        self._ctx = ctx
        self._start_after = start_after
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"broker-{self.endpoint}", daemon=True)
        self._thread.start()
        if not start_after:
            assert self._bound.wait(WAIT), "scripted broker did not bind"

    def wait_for(self, predicate: Callable[[ScriptedBroker], bool], timeout: float = WAIT) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self), timeout), "scripted broker: condition not met"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        if self._stop.wait(self._start_after):
            return
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        self._bound.set()
        later: list[tuple[float, int, list[bytes]]] = []  # (due, rid, frames) of delayed replies
        try:
            while not self._stop.is_set():
                timeout = 20 if not later else max(0, min(20, int((later[0][0] - time.monotonic()) * 1000)))
                if sock.poll(timeout):
                    self._handle(sock, [f.bytes for f in recv_frames(sock)], later)
                while later and later[0][0] <= time.monotonic():
                    _, rid, msg = heapq.heappop(later)
                    send_frames(sock, msg)
                    with self._cond:
                        self.late_sent.append(rid)
                        self._cond.notify_all()
        finally:
            sock.close(0)

    def _handle(self, sock: zmq.Socket[Any], msg: list[bytes], later: list[Any]) -> None:
        ident, _sig, header, body = msg
        req = p.check_request(p.decode_header(header))
        with self._cond:
            self.requests.append(req)
            self._cond.notify_all()
        if self.hold:
            return

        def answer(status: int = p.STATUS_OK, payload: bytes = body, message: str | None = None) -> list[bytes]:
            kind = "RuntimeError" if status == p.STATUS_REMOTE_ERROR else None
            head = p.encode_reply(req.rid, status, req.flags & p.FLAG_MSGPACK, message, kind)
            return [ident, p.SIGNATURE, head, payload]

        service = req.service
        if service == "echo":
            send_frames(sock, answer())
        elif service.startswith("status-"):
            send_frames(sock, answer(int(service[7:]), b"", f"scripted status {service[7:]}"))
        elif service.startswith("delay-"):
            heapq.heappush(later, (time.monotonic() + int(service[6:]) / 1000, req.rid, answer()))
        elif service == "twice":
            send_frames(sock, answer())
            send_frames(sock, answer(p.STATUS_WORKER_LOST))
        elif service == "garbage":
            send_frames(sock, [ident, b"NOPE", b"\x00", b""])
            send_frames(sock, [ident, p.SIGNATURE, b"\xc1", b""])
            send_frames(sock, answer())
        elif service == "no-payload":
            send_frames(sock, answer()[:3])
        elif service == "bad-header":
            send_frames(sock, [ident, p.SIGNATURE, msgpack.packb([p.REPLY, req.rid, "ok"]), b""])
        # "silent" and anything else: no reply


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    c: zmq.Context[Any] = zmq.Context()
    yield c
    c.destroy(linger=0)  # everything should be closed already; this only keeps a failure local


@pytest.fixture
def brokers(ctx: zmq.Context[Any]) -> Iterator[Callable[..., ScriptedBroker]]:
    made: list[ScriptedBroker] = []

    def make(**kwargs: Any) -> ScriptedBroker:
        b = ScriptedBroker(ctx, **kwargs)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def broker(brokers: Callable[..., ScriptedBroker]) -> ScriptedBroker:
    return brokers()


STATUS_ERRORS: list[tuple[int, type[ZRouterError]]] = [
    (p.STATUS_REMOTE_ERROR, RemoteError),
    (p.STATUS_TIMEOUT, RequestTimeout),
    (p.STATUS_UNAVAILABLE, ServiceUnavailable),
    (p.STATUS_OVERLOADED, Overloaded),
    (p.STATUS_WORKER_LOST, WorkerLost),
    (p.STATUS_BAD_REQUEST, ProtocolError),
    (p.STATUS_TOO_LARGE, MessageTooLarge),
    (42, ProtocolError),
]
OBJECTS: list[Any] = [{"a": [1, 2.5, None], "b": {"c": "d"}}, [1, "two"], 7, "text", None, True]


# -- sync Client --------------------------------------------------------------------------------


def test_echo_bytes_and_msgpack_objects(ctx: zmq.Context[Any], broker: ScriptedBroker) -> None:
    with Client(broker.endpoint, context=ctx) as client:
        assert client.request("echo", b"raw \x00 bytes") == b"raw \x00 bytes"
        assert client.request("echo", bytearray(b"ba")) == b"ba"
        for obj in OBJECTS:
            assert client.request("echo", obj) == obj
    flags = [r.flags for r in broker.requests]
    assert flags[0] == p.FLAG_IDEMPOTENT and flags[2] == p.FLAG_IDEMPOTENT | p.FLAG_MSGPACK


@pytest.mark.parametrize(("status", "cls"), STATUS_ERRORS)
def test_error_status_raises_its_exception(
    ctx: zmq.Context[Any], broker: ScriptedBroker, status: int, cls: type[ZRouterError]
) -> None:
    with Client(broker.endpoint, context=ctx) as client, pytest.raises(cls) as info:
        client.request(f"status-{status}", b"")
    assert type(info.value) is cls and f"scripted status {status}" in str(info.value)
    if cls is RemoteError:
        assert isinstance(info.value, RemoteError) and info.value.type == "RuntimeError"


def test_timeout_raises_request_timeout_promptly(ctx: zmq.Context[Any], broker: ScriptedBroker) -> None:
    with Client(broker.endpoint, context=ctx) as client:
        client.request("echo", b"warm-up")
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            client.request("silent", b"", timeout=0.5)
        assert 0.45 <= time.monotonic() - t0 < 1.0
    assert broker.requests[-1].timeout_ms == 500


def test_late_reply_after_timeout_is_dropped(
    ctx: zmq.Context[Any], broker: ScriptedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    with Client(broker.endpoint, context=ctx) as client:
        with pytest.raises(RequestTimeout):
            client.request("delay-400", b"late", timeout=0.1)
        late_rid = broker.requests[-1].rid
        broker.wait_for(lambda b: late_rid in b.late_sent)
        with caplog.at_level(logging.DEBUG, logger="zrouter.client"):
            assert client.request("echo", b"next") == b"next"  # the late reply is read first
    assert f"unknown request id {late_rid}" in caplog.text


def test_one_outcome_for_a_duplicated_reply(ctx: zmq.Context[Any], broker: ScriptedBroker) -> None:
    with Client(broker.endpoint, context=ctx) as client:
        assert client.request("twice", b"once") == b"once"
        assert client.request("echo", b"after") == b"after"


def test_malformed_replies(ctx: zmq.Context[Any], broker: ScriptedBroker, caplog: pytest.LogCaptureFixture) -> None:
    with Client(broker.endpoint, context=ctx) as client:
        with caplog.at_level(logging.WARNING, logger="zrouter.client"):
            assert client.request("garbage", b"survives") == b"survives"
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
        with pytest.raises(ProtocolError):
            client.request("no-payload", b"")
        with pytest.raises(ProtocolError):
            client.request("bad-header", b"")


def test_hundred_in_flight_with_submit(ctx: zmq.Context[Any], broker: ScriptedBroker) -> None:
    with Client(broker.endpoint, context=ctx) as client:
        pendings = [client.submit("echo", {"i": i}) for i in range(100)]
        assert [x.result(timeout=WAIT) for x in pendings] == [{"i": i} for i in range(100)]
        assert client.map("echo", [b"%d" % i for i in range(100)]) == [b"%d" % i for i in range(100)]
        mixed = [client.submit("echo", 1), client.submit("status-4", b""), client.submit("echo", 2)]
        assert mixed[1].exception() is not None and mixed[0].done()
        out = client.gather(mixed, return_exceptions=True)
        assert out[0] == 1 and isinstance(out[1], Overloaded) and out[2] == 2
        with pytest.raises(Overloaded):
            client.gather(mixed)


def test_request_waits_for_a_broker_that_starts_later(
    ctx: zmq.Context[Any], brokers: Callable[..., ScriptedBroker]
) -> None:
    late = brokers(start_after=0.3)
    with Client(late.endpoint, context=ctx, timeout=WAIT) as client:
        assert client.request("echo", b"hello") == b"hello"


def test_no_broker_at_all_times_out(ctx: zmq.Context[Any]) -> None:
    with Client(free_tcp_endpoint(), context=ctx) as client:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            client.request("echo", b"", timeout=0.3)
        assert time.monotonic() - t0 < 0.8


def test_close_fails_pending_requests(ctx: zmq.Context[Any], broker: ScriptedBroker) -> None:
    client = Client(broker.endpoint, context=ctx)
    pending = client.submit("silent", b"")
    client.close()
    with pytest.raises(ClientClosed):
        pending.result()
    with pytest.raises(ClientClosed):
        client.request("echo", b"")
    client.close()


def test_oversize_request_is_refused_locally(ctx: zmq.Context[Any], broker: ScriptedBroker) -> None:
    with Client(broker.endpoint, context=ctx, max_message_size=10) as client:
        with pytest.raises(MessageTooLarge):
            client.request("echo", b"x" * 11)
        assert client.request("echo", b"x" * 10) == b"x" * 10
    assert len(broker.requests) == 1


def test_lost_broker_idempotent_requests_move_to_the_other(
    ctx: zmq.Context[Any], brokers: Callable[..., ScriptedBroker]
) -> None:
    holder, answerer = brokers(hold=True), brokers()
    with Client([holder.endpoint, answerer.endpoint], context=ctx, timeout=WAIT) as client:
        assert client.wait_connected(2, timeout=WAIT)
        pendings = [client.submit("echo", {"i": i}) for i in range(20)]
        once = [client.submit("echo", b"once", idempotent=False) for _ in range(4)]
        holder.wait_for(lambda b: len(b.requests) == 12)  # fewest pending: half each
        holder.close()
        assert [x.result() for x in pendings] == [{"i": i} for i in range(20)]
        lost = [x for x in once if x.exception() is not None]
        assert len(lost) == 2 and all(type(x.exception()) is WorkerLost for x in lost)
        assert client.connected_brokers == [answerer.endpoint]
    held = {r.rid for r in holder.requests if r.flags & p.FLAG_IDEMPOTENT}
    resent = {r.rid for r in answerer.requests if r.attempt == 1}
    assert len(held) == 10 and resent == held
    assert all(r.timeout_ms <= WAIT * 1000 for r in answerer.requests)
    rids = [r.rid for r in answerer.requests]
    assert len(rids) == len(set(rids)) == 22  # each request answered exactly once


def test_add_and_remove_brokers(ctx: zmq.Context[Any], brokers: Callable[..., ScriptedBroker]) -> None:
    first, second = brokers(), brokers()
    with Client(first.endpoint, context=ctx) as client:
        assert client.request("echo", b"1") == b"1"
        client.add_broker(second.endpoint)
        assert client.wait_connected(2, timeout=WAIT)
        client.remove_broker(first.endpoint)
        assert client.brokers == [second.endpoint]
        assert client.map("echo", [b"a", b"b", b"c"]) == [b"a", b"b", b"c"]
        client.set_brokers([first.endpoint])
        assert client.request("echo", b"2") == b"2"
    assert len(first.requests) == 2 and len(second.requests) == 3


# -- AsyncClient --------------------------------------------------------------------------------


async def test_async_echo_bytes_and_msgpack(ctx: zmq.Context[Any], broker: ScriptedBroker) -> None:
    async with AsyncClient(broker.endpoint, context=ctx) as client:
        assert await client.request("echo", b"raw") == b"raw"
        for obj in OBJECTS:
            assert await client.request("echo", obj) == obj


@pytest.mark.parametrize(("status", "cls"), STATUS_ERRORS)
async def test_async_error_status_raises_its_exception(
    ctx: zmq.Context[Any], broker: ScriptedBroker, status: int, cls: type[ZRouterError]
) -> None:
    async with AsyncClient(broker.endpoint, context=ctx) as client:
        with pytest.raises(cls) as info:
            await client.request(f"status-{status}", b"")
    assert type(info.value) is cls


async def test_async_timeout_and_late_reply_dropped(
    ctx: zmq.Context[Any], broker: ScriptedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    async with AsyncClient(broker.endpoint, context=ctx) as client:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            await client.request("delay-600", b"", timeout=0.3)
        assert 0.25 <= time.monotonic() - t0 < 0.8
        late_rid = broker.requests[-1].rid
        with caplog.at_level(logging.DEBUG, logger="zrouter.client"):  # the reader may see it any time now
            await asyncio.to_thread(broker.wait_for, lambda b: late_rid in b.late_sent)
            assert await client.request("echo", b"next") == b"next"
    assert f"unknown request id {late_rid}" in caplog.text


async def test_async_silent_times_out(ctx: zmq.Context[Any], broker: ScriptedBroker) -> None:
    async with AsyncClient(broker.endpoint, context=ctx, timeout=0.5) as client:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            await client.request("silent", b"")
        assert 0.45 <= time.monotonic() - t0 < 1.0


async def test_async_hundred_in_flight_with_gather(ctx: zmq.Context[Any], broker: ScriptedBroker) -> None:
    async with AsyncClient(broker.endpoint, context=ctx) as client:
        got = await asyncio.gather(*(client.request("echo", {"i": i}) for i in range(100)))
        assert got == [{"i": i} for i in range(100)]
        assert await client.map("echo", list(range(100))) == list(range(100))
        out = await client.map("status-3", [b"", b""], return_exceptions=True)
        assert all(type(x) is ServiceUnavailable for x in out)


async def test_async_waits_for_a_broker_that_starts_later(
    ctx: zmq.Context[Any], brokers: Callable[..., ScriptedBroker]
) -> None:
    late = brokers(start_after=0.3)
    async with AsyncClient(late.endpoint, context=ctx, timeout=WAIT) as client:
        assert await client.request("echo", b"hello") == b"hello"


async def test_async_close_fails_pending_and_cancel_is_clean(ctx: zmq.Context[Any], broker: ScriptedBroker) -> None:
    client = AsyncClient(broker.endpoint, context=ctx)
    task = asyncio.ensure_future(client.request("silent", b""))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.request("silent", b""), 0.1)  # cancelled by wait_for
    await client.aclose()
    with pytest.raises(ClientClosed):
        await task
    with pytest.raises(ClientClosed):
        await client.request("echo", b"")
    await client.aclose()


async def test_async_lost_broker_idempotent_requests_move_to_the_other(
    ctx: zmq.Context[Any], brokers: Callable[..., ScriptedBroker]
) -> None:
    holder, answerer = brokers(hold=True), brokers()
    async with AsyncClient([holder.endpoint, answerer.endpoint], context=ctx, timeout=WAIT) as client:
        assert await client.wait_connected(2, timeout=WAIT)
        idem = [client.submit("echo", i) for i in range(20)]
        once = [client.submit("echo", b"o", idempotent=False) for _ in range(4)]
        await asyncio.to_thread(holder.wait_for, lambda b: len(b.requests) == 12)
        holder.close()
        assert await asyncio.gather(*idem) == list(range(20))
        outcomes = await asyncio.gather(*once, return_exceptions=True)
        assert sorted(type(x).__name__ for x in outcomes) == ["WorkerLost", "WorkerLost", "bytes", "bytes"]
    held = {r.rid for r in holder.requests if r.flags & p.FLAG_IDEMPOTENT}
    assert len(held) == 10 and {r.rid for r in answerer.requests if r.attempt == 1} == held
    rids = [r.rid for r in answerer.requests]
    assert len(rids) == len(set(rids)) == 22


async def test_async_add_and_remove_brokers(ctx: zmq.Context[Any], brokers: Callable[..., ScriptedBroker]) -> None:
    first, second = brokers(), brokers()
    async with AsyncClient(first.endpoint, context=ctx) as client:
        assert await client.request("echo", b"1") == b"1"
        client.add_broker(second.endpoint)
        assert await client.wait_connected(2, timeout=WAIT)
        client.remove_broker(first.endpoint)
        assert await client.map("echo", [b"a", b"b"]) == [b"a", b"b"]
    assert len(first.requests) == 1 and len(second.requests) == 2
