"""The broker's last line of defence: a bug met while handling one message, or in a turn of
the loop, is logged with its traceback, counted and survived (issue 7.1). The bugs are injected
into a real broker (in this process, on real sockets) by wrapping router methods, since no
input is known to trigger one any more."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from tests.procs import ProcessGroup
from zrouter import protocol as p
from zrouter.broker.server import Broker, BrokerConfig
from zrouter.transport import free_tcp_endpoint, recv_frames

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker(BrokerConfig(frontend=free_tcp_endpoint(), backend=free_tcp_endpoint(), heartbeat_interval=0.1,
                            shutdown_grace=1.0), zmq.Context())
    b.bind()
    t = threading.Thread(target=b.run, daemon=True)
    t.start()
    assert b.ready.wait(10)
    yield b
    b.stop()
    t.join(10)
    assert not t.is_alive()
    b.close()
    b.ctx.term()


def _ask(ctx: zmq.Context[Any], endpoint: str, rid: int, service: str, sock: zmq.Socket[Any] | None = None) -> p.Reply:
    s = sock or ctx.socket(zmq.DEALER)
    if sock is None:
        s.linger = 0
        s.connect(endpoint)
    try:
        s.send_multipart([p.SIGNATURE, p.encode_request(rid, service, 5000), b"hi"])
        assert s.poll(10_000), "no reply"
        return p.decode_reply(recv_frames(s)[1].bytes)
    finally:
        if sock is None:
            s.close()


def test_a_bug_met_by_one_request_answers_it_and_serves_on(broker: Broker, procs: ProcessGroup,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    worker = procs.worker(broker.backend_endpoint, service="echo", handler="zrouter.worker.examples:echo")
    real = broker.router.request

    def buggy(client: bytes, crid: int, service: str, *rest: Any) -> None:
        if service == "trigger":
            raise KeyError("a bug")
        real(client, crid, service, *rest)

    broker.router.request = buggy  # type: ignore[method-assign]
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        one = ctx.socket(zmq.DEALER)  # one peer: its log lines are paced
        one.connect(broker.frontend_endpoint)
        with caplog.at_level(logging.INFO, logger="zrouter.broker"):
            for rid in range(1, 6):
                reply = _ask(ctx, broker.frontend_endpoint, rid, "trigger", one)
                assert (reply.rid, reply.status) == (rid, p.STATUS_BAD_REQUEST)
                assert reply.message == "bad request: the broker failed to handle it"
            worker.wait_for("registered with broker")
            assert _ask(ctx, broker.frontend_endpoint, 7, "echo").status == p.STATUS_OK
    finally:
        ctx.destroy(0)
    assert broker.router.bad_messages[("frontend", "internal_error")] == 5
    errors = [r for r in caplog.records if "error handling a message" in r.getMessage()]
    assert len(errors) == 3 and errors[0].exc_info is not None  # with the traceback, paced: 3 of 5


def test_a_bug_in_a_turn_of_the_loop_is_logged_and_the_loop_goes_on(broker: Broker,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    real = broker.router.tick
    failures = [0]

    def buggy(now: float, heartbeat: bool = True) -> None:
        if failures[0] < 4:
            failures[0] += 1
            raise RuntimeError("a bug in the timers")
        real(now, heartbeat)

    with caplog.at_level(logging.INFO, logger="zrouter.broker"):
        broker.router.tick = buggy  # type: ignore[method-assign]
        ctx: zmq.Context[Any] = zmq.Context()
        try:
            # Requests keep being answered while the timers fail, and after.
            for rid in range(1, 30):
                assert _ask(ctx, broker.frontend_endpoint, rid, "nobody").status == p.STATUS_UNAVAILABLE
                if failures[0] >= 4 and broker.loop_errors >= 4:
                    break
        finally:
            ctx.destroy(0)
    assert broker.loop_errors == 4
    logged = [r for r in caplog.records if "broker loop error" in r.getMessage()]
    assert logged and logged[0].exc_info is not None
