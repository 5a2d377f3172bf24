"""The broker's drain loops, compiled (zrouter/_native/drain.pyx) and pure (zrouter/_drain.py),
fed the same messages on real sockets into a real Broker whose router calls are recorded: the
same calls come out, in the same order, whatever the message (valid, malformed, control)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import msgpack
import pytest
import zmq

from zrouter import _drain, _speedups
from zrouter import protocol as p
from zrouter.broker.server import BATCH, Broker, BrokerConfig

native = _speedups.load_native("drain")
SIG = p.SIGNATURE
MAX_SIZE = 64
_n = itertools.count()


def h(*fields: Any) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


R, P = p.REQUEST, p.REPLY
BUGGY_RID = 77  # the router raises for this rid: that message alone fails, the next ones are served
CLIENT_MESSAGES: list[list[bytes]] = [
    [SIG, h(R, 1, "echo", 5000, 0, 3, None), b"payload"],
    [SIG, h(R, 2**64 - 1, "é" * 100, 1, 255, 2**32 - 1, b"k" * 255), b""],
    [SIG, h(R, 3, "echo", 100, 0, 1, "clé"), b"x"],  # a str key reaches the router as its UTF-8 bytes
    [SIG, h(R, 4, "echo", 100, 0, 1, None, "later field"), b"x"],
    [SIG, h(R, 5, "echo", 100, 0, 1, None), b"x" * MAX_SIZE],
    [SIG, h(R, 6, "echo", 100, 0, 1, None), b"x" * (MAX_SIZE + 1)],  # too large
    [SIG, h(R, 0, "echo", 100, 0, 1, None), b"x"],  # rid 0
    [SIG, h(R, 7, "", 100, 0, 1, None), b"x"],
    [SIG, h(R, 8, "echo", 0, 0, 1, None), b"x"],
    [SIG, h(R, 9, "echo", 100, 0, 1, 5), b"x"],
    [SIG, h(R, 10, "echo", 100, 0, 1, None)],  # no payload frame
    [SIG, h(R, 11, "echo", 100, 0, 1, None), b"x", b"extra"],
    [b"ZRT2", h(R, 12, "echo", 100, 0, 1, None), b"x"],
    [SIG, b"\xc1", b"x"],
    [SIG, h(P, 13, 0, 0, None, None), b"x"],  # a REPLY from a client
    [SIG, h(True, 14, "echo", 100, 0, 1, None), b"x"],
    [SIG, h(R, 15, ["nested"], 100, 0, 1, None), b"x"],
    [SIG],
    [SIG, h(R, BUGGY_RID, "echo", 100, 0, 1, None), b"x"],
    [SIG, h(R, 16, "echo", 100, 0, 1, None), b"x"],
]
WORKER_MESSAGES: list[list[bytes]] = [
    [SIG, h(P, 1, 0, 2, None, None), b"result"],
    [SIG, h(P, 2**64 - 1, 255, 2**32 - 1, "m" * 1024, "E" * 1024), b""],
    [SIG, h(P, 3, 1, 0, "boom", "ValueError", "later"), b"x"],
    [SIG, h(P, 4, 256, 0, None, None), b"x"],  # status out of range
    [SIG, h(P, 5, 0, 0, None, None)],  # no payload
    [SIG, h(P, 6, 0, 0, 1.5, None), b"x"],
    [SIG, p.encode_heartbeat()],
    [SIG, p.encode_update(3, 2)],
    [SIG, p.encode_drain()],
    [b"nope", h(P, 7, 0, 0, None, None), b"x"],
    [SIG, h(R, 8, "echo", 100, 0, 1, None), b"x"],  # a REQUEST from a worker
    [SIG, h(P, BUGGY_RID, 0, 0, None, None), b"x"],
    [SIG, h(P, 9, 0, 0, None, None), b"x"],
]


def _comparable(value: Any) -> Any:
    if hasattr(value, "more"):  # a frame (zmq.Frame or the compiled Part): its bytes
        return bytes(value)
    if type(value).__name__ == "W":  # the stand-in worker each feed registers
        return "worker"
    return value


class Recorder:
    """Stands in for the router's entry points and the broker's answers: a list of calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, name: str) -> Callable[..., None]:
        def record(*args: Any) -> None:
            self.calls.append((name, *(_comparable(a) for a in args)))
            if name in ("request", "worker_reply") and BUGGY_RID in args:
                raise RuntimeError("a bug met by this one message")

        return record


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = _broker()
    yield b
    b.close()


def _broker() -> Broker:
    n = next(_n)
    b = Broker(BrokerConfig(frontend=f"inproc://drain-front-{n}", backend=f"inproc://drain-back-{n}",
                            max_message_size=MAX_SIZE))
    b.bind()
    return b


def _feed(messages: list[list[bytes]], front: bool, impl: ModuleType) -> list[tuple[Any, ...]]:
    """The router calls a fresh broker makes for ``messages`` from one peer, drained by ``impl``."""
    broker = _broker()
    rec = Recorder()
    router: Any = broker.router
    router.request = rec("request")
    router.answer = rec("answer")
    router.worker_reply = rec("worker_reply")
    router.worker_update = rec("worker_update")
    router.worker_drain = rec("worker_drain")
    router.remove_worker = rec("remove_worker")
    broker._disconnect = rec("disconnect")  # type: ignore[method-assign]
    broker._message_failed = rec("message_failed")  # type: ignore[method-assign]
    peer = broker.ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.ROUTING_ID, b"peer-1")
    peer.connect(broker.frontend_endpoint if front else broker.backend_endpoint)
    known = type("W", (), {"last_seen": 0.0})()
    if not front:
        router.workers[b"peer-1"] = known
    try:
        for msg in messages:
            peer.send_multipart(msg)  # inproc: queued whole at the broker once sent
        if front:
            while impl.drain_requests(broker.front, BATCH, MAX_SIZE, router.request, broker._on_client_message,
                                       broker._request_failed, 42.0):
                pass
        else:
            while impl.drain_replies(broker.back, BATCH, broker._on_reply, broker._on_worker_frames, broker._reply_failed,
                                      42.0):
                pass
    finally:
        peer.close(0)
        broker.close()
    if not front:
        assert known.last_seen == 42.0
    return rec.calls


@pytest.mark.parametrize("front", [True, False], ids=["requests", "replies"])
def test_both_drains_make_the_same_router_calls(front: bool) -> None:
    messages = CLIENT_MESSAGES if front else WORKER_MESSAGES
    pure = _feed(messages, front, _drain)
    compiled = _feed(messages, front, native)
    assert compiled == pure
    kinds = {c[0] for c in pure}
    assert kinds >= ({"request", "answer"} if front else {"worker_reply", "worker_update", "worker_drain"}), kinds
    failed = [c for c in pure if c[0] == "message_failed"]
    assert len(failed) == 1 and failed[0][2] == b"peer-1", failed
    assert pure[-1][0] == ("request" if front else "worker_reply")  # served on after the failure


def test_the_compiled_drain_calls_the_router_itself_for_valid_messages(broker: Broker) -> None:
    """Valid messages never reach the Python per-message code on the compiled path."""
    slow: list[Any] = []
    valid = [CLIENT_MESSAGES[i] for i in (0, 1, 2, 3, 4)]
    router: Any = broker.router
    calls = Recorder()
    router.request = calls("request")
    peer = broker.ctx.socket(zmq.DEALER)
    peer.connect(broker.frontend_endpoint)
    try:
        for msg in valid:
            peer.send_multipart(msg)
        assert broker.front.poll(5000)
        while len(calls.calls) < len(valid):
            native.drain_requests(broker.front, BATCH, MAX_SIZE, router.request, lambda f, now: slow.append(f),
                                  broker._request_failed, 1.0)
    finally:
        peer.close(0)
    assert slow == [] and [c[2] for c in calls.calls] == [1, 2**64 - 1, 3, 4, 5]
    assert calls.calls[2][7] == "clé".encode()


def test_drains_stop_on_an_empty_socket_and_after_a_batch(broker: Broker) -> None:
    for impl in (_drain, native):
        assert impl.drain_requests(broker.front, 4, MAX_SIZE, print, print, print, 0.0) is False
        assert impl.drain_replies(broker.back, 4, print, print, print, 0.0) is False
