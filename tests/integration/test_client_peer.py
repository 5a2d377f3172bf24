"""Client and AsyncClient end to end over real sockets, against a scripted broker front end.

The front end (tests/helpers.py: ScriptedFrontend) is a ROUTER on a free loopback port, run by
a thread, that decodes requests with zrouter.protocol and answers by service name, so each test
controls exactly what comes back (echo, any status, a late reply, no reply, garbage) without a
real broker or worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

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
from tests.helpers import STATUS_ERRORS, WAIT, ScriptedFrontend
from zrouter import protocol as p
from zrouter.transport import free_tcp_endpoint

pytestmark = pytest.mark.timeout(60)

OBJECTS: list[Any] = [{"a": [1, 2.5, None], "b": {"c": "d"}}, [1, "two"], 7, "text", None, True]


# -- sync Client --------------------------------------------------------------------------------


def test_echo_bytes_and_msgpack_objects(ctx: zmq.Context[Any], frontend: ScriptedFrontend) -> None:
    with Client(frontend.endpoint, context=ctx) as client:
        assert client.request("echo", b"raw \x00 bytes") == b"raw \x00 bytes"
        assert client.request("echo", bytearray(b"ba")) == b"ba"
        for obj in OBJECTS:
            assert client.request("echo", obj) == obj
    flags = [r.flags for r in frontend.requests]
    assert flags[0] == p.FLAG_IDEMPOTENT and flags[2] == p.FLAG_IDEMPOTENT | p.FLAG_MSGPACK


@pytest.mark.parametrize(("status", "cls"), STATUS_ERRORS)
def test_error_status_raises_its_exception(
    ctx: zmq.Context[Any], frontend: ScriptedFrontend, status: int, cls: type[ZRouterError]
) -> None:
    with Client(frontend.endpoint, context=ctx) as client, pytest.raises(cls) as info:
        client.request(f"status-{status}", b"")
    assert type(info.value) is cls and f"scripted status {status}" in str(info.value)
    if cls is RemoteError:
        assert isinstance(info.value, RemoteError) and info.value.type == "RuntimeError"


def test_timeout_raises_request_timeout_promptly(ctx: zmq.Context[Any], frontend: ScriptedFrontend) -> None:
    with Client(frontend.endpoint, context=ctx) as client:
        client.request("echo", b"warm-up")
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            client.request("silent", b"", timeout=0.5)
        assert 0.45 <= time.monotonic() - t0 < 1.0
    assert frontend.requests[-1].timeout_ms == 500


def test_late_reply_after_timeout_is_dropped(
    ctx: zmq.Context[Any], frontend: ScriptedFrontend, caplog: pytest.LogCaptureFixture
) -> None:
    with Client(frontend.endpoint, context=ctx) as client:
        with pytest.raises(RequestTimeout):
            client.request("delay-400", b"late", timeout=0.1)
        late_rid = frontend.requests[-1].rid
        frontend.wait_for(lambda b: late_rid in b.late_sent)
        with caplog.at_level(logging.DEBUG, logger="zrouter.client"):
            assert client.request("echo", b"next") == b"next"  # the late reply is read first
    assert f"unknown request id {late_rid}" in caplog.text


def test_one_outcome_for_a_duplicated_reply(ctx: zmq.Context[Any], frontend: ScriptedFrontend) -> None:
    with Client(frontend.endpoint, context=ctx) as client:
        assert client.request("twice", b"once") == b"once"
        assert client.request("echo", b"after") == b"after"


def test_malformed_replies(ctx: zmq.Context[Any], frontend: ScriptedFrontend, caplog: pytest.LogCaptureFixture) -> None:
    with Client(frontend.endpoint, context=ctx) as client:
        with caplog.at_level(logging.WARNING, logger="zrouter.client"):
            assert client.request("garbage", b"survives") == b"survives"
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
        with pytest.raises(ProtocolError):
            client.request("no-payload", b"")
        with pytest.raises(ProtocolError):
            client.request("bad-header", b"")


def test_hundred_in_flight_with_submit(ctx: zmq.Context[Any], frontend: ScriptedFrontend) -> None:
    with Client(frontend.endpoint, context=ctx) as client:
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
    ctx: zmq.Context[Any], make_frontend: Callable[..., ScriptedFrontend]
) -> None:
    late = make_frontend(start_after=0.3)
    with Client(late.endpoint, context=ctx, timeout=WAIT) as client:
        assert client.request("echo", b"hello") == b"hello"


def test_no_broker_at_all_times_out(ctx: zmq.Context[Any]) -> None:
    with Client(free_tcp_endpoint(), context=ctx) as client:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            client.request("echo", b"", timeout=0.3)
        assert time.monotonic() - t0 < 0.8


def test_close_fails_pending_requests(ctx: zmq.Context[Any], frontend: ScriptedFrontend) -> None:
    client = Client(frontend.endpoint, context=ctx)
    pending = client.submit("silent", b"")
    client.close()
    with pytest.raises(ClientClosed):
        pending.result()
    with pytest.raises(ClientClosed):
        client.request("echo", b"")
    client.close()


def test_oversize_request_is_refused_locally(ctx: zmq.Context[Any], frontend: ScriptedFrontend) -> None:
    with Client(frontend.endpoint, context=ctx, max_message_size=10) as client:
        with pytest.raises(MessageTooLarge):
            client.request("echo", b"x" * 11)
        assert client.request("echo", b"x" * 10) == b"x" * 10
    assert len(frontend.requests) == 1


def test_lost_broker_idempotent_requests_move_to_the_other(
    ctx: zmq.Context[Any], make_frontend: Callable[..., ScriptedFrontend]
) -> None:
    holder, answerer = make_frontend(hold=True), make_frontend()
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


def test_add_and_remove_brokers(ctx: zmq.Context[Any], make_frontend: Callable[..., ScriptedFrontend]) -> None:
    first, second = make_frontend(), make_frontend()
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


async def test_async_echo_bytes_and_msgpack(ctx: zmq.Context[Any], frontend: ScriptedFrontend) -> None:
    async with AsyncClient(frontend.endpoint, context=ctx) as client:
        assert await client.request("echo", b"raw") == b"raw"
        for obj in OBJECTS:
            assert await client.request("echo", obj) == obj


@pytest.mark.parametrize(("status", "cls"), STATUS_ERRORS)
async def test_async_error_status_raises_its_exception(
    ctx: zmq.Context[Any], frontend: ScriptedFrontend, status: int, cls: type[ZRouterError]
) -> None:
    async with AsyncClient(frontend.endpoint, context=ctx) as client:
        with pytest.raises(cls) as info:
            await client.request(f"status-{status}", b"")
    assert type(info.value) is cls


async def test_async_timeout_and_late_reply_dropped(
    ctx: zmq.Context[Any], frontend: ScriptedFrontend, caplog: pytest.LogCaptureFixture
) -> None:
    async with AsyncClient(frontend.endpoint, context=ctx) as client:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            await client.request("delay-600", b"", timeout=0.3)
        assert 0.25 <= time.monotonic() - t0 < 0.8
        late_rid = frontend.requests[-1].rid
        with caplog.at_level(logging.DEBUG, logger="zrouter.client"):  # the reader may see it any time now
            await asyncio.to_thread(frontend.wait_for, lambda b: late_rid in b.late_sent)
            assert await client.request("echo", b"next") == b"next"
    assert f"unknown request id {late_rid}" in caplog.text


async def test_async_silent_times_out(ctx: zmq.Context[Any], frontend: ScriptedFrontend) -> None:
    async with AsyncClient(frontend.endpoint, context=ctx, timeout=0.5) as client:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            await client.request("silent", b"")
        assert 0.45 <= time.monotonic() - t0 < 1.0


async def test_async_hundred_in_flight_with_gather(ctx: zmq.Context[Any], frontend: ScriptedFrontend) -> None:
    async with AsyncClient(frontend.endpoint, context=ctx) as client:
        got = await asyncio.gather(*(client.request("echo", {"i": i}) for i in range(100)))
        assert got == [{"i": i} for i in range(100)]
        assert await client.map("echo", list(range(100))) == list(range(100))
        out = await client.map("status-3", [b"", b""], return_exceptions=True)
        assert all(type(x) is ServiceUnavailable for x in out)


async def test_async_waits_for_a_broker_that_starts_later(
    ctx: zmq.Context[Any], make_frontend: Callable[..., ScriptedFrontend]
) -> None:
    late = make_frontend(start_after=0.3)
    async with AsyncClient(late.endpoint, context=ctx, timeout=WAIT) as client:
        assert await client.request("echo", b"hello") == b"hello"


async def test_async_close_fails_pending_and_cancel_is_clean(ctx: zmq.Context[Any], frontend: ScriptedFrontend) -> None:
    client = AsyncClient(frontend.endpoint, context=ctx)
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
    ctx: zmq.Context[Any], make_frontend: Callable[..., ScriptedFrontend]
) -> None:
    holder, answerer = make_frontend(hold=True), make_frontend()
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


async def test_async_add_and_remove_brokers(ctx: zmq.Context[Any], make_frontend: Callable[..., ScriptedFrontend]) -> None:
    first, second = make_frontend(), make_frontend()
    async with AsyncClient(first.endpoint, context=ctx) as client:
        assert await client.request("echo", b"1") == b"1"
        client.add_broker(second.endpoint)
        assert await client.wait_connected(2, timeout=WAIT)
        client.remove_broker(first.endpoint)
        assert await client.map("echo", [b"a", b"b"]) == [b"a", b"b"]
    assert len(first.requests) == 1 and len(second.requests) == 2
