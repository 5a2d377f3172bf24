"""What the tests share: bounded waits, unique names, two scripted stand-ins for a broker (one
for each side of it; fixtures over them are in tests/conftest.py) and one scenario on real
processes that more than one module runs.

- :class:`ScriptedBackend`: the broker's back end, for tests of a real Worker.
- :class:`ScriptedFrontend`: the broker's front end, for tests of a real Client/AsyncClient.

Both are real ROUTER sockets on free loopback ports, each run by a thread of its own.
"""

from __future__ import annotations

import heapq
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
import zmq

from tests.procs import BrokerProc, ProcessGroup, WorkerProc
from zrouter import errors
from zrouter import protocol as p
from zrouter.client import Client
from zrouter.protocol import (
    DISCONNECT,
    DRAIN,
    READY,
    REPLY,
    SIGNATURE,
    UPDATE,
    check_ready,
    check_reply,
    decode_header,
    decode_payload,
    encode_drain,
    encode_heartbeat,
    encode_payload,
    encode_request,
)
from zrouter.transport import free_tcp_endpoint, recv_frames, send_frames

__all__ = [
    "HB",
    "STATUS_ERRORS",
    "WAIT",
    "Msg",
    "ScriptedBackend",
    "ScriptedFrontend",
    "drain_one_of_two_workers",
    "sigkill_a_busy_worker",
    "eventually",
    "unique",
]

HB = 0.1  # heartbeat interval used by the workers under test and the scripted back end
WAIT = 10.0  # upper bound of any single wait on something that should happen within milliseconds

# Every reply status but OK, and one no version defines, with the exception a client raises.
STATUS_ERRORS: list[tuple[int, type[errors.ZRouterError]]] = [
    (p.STATUS_REMOTE_ERROR, errors.RemoteError),
    (p.STATUS_TIMEOUT, errors.RequestTimeout),
    (p.STATUS_UNAVAILABLE, errors.ServiceUnavailable),
    (p.STATUS_OVERLOADED, errors.Overloaded),
    (p.STATUS_WORKER_LOST, errors.WorkerLost),
    (p.STATUS_BAD_REQUEST, errors.ProtocolError),
    (p.STATUS_TOO_LARGE, errors.MessageTooLarge),
    (p.STATUS_FORBIDDEN, errors.Forbidden),
    (99, errors.ProtocolError),
]


T = TypeVar("T")


def eventually(probe: Callable[[], T | None], timeout: float = 15.0, what: str = "condition") -> T:
    """Poll *probe* until it returns something truthy (returned); fail after *timeout* seconds.
    For state another process or thread changes with no event to wait on (Consul's catalog, a
    capacity announced over the wire): bounded, never a bare sleep."""
    deadline = time.monotonic() + timeout
    last = probe()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(0.05)
        last = probe()
    return last


def unique(prefix: str) -> str:
    """``prefix`` plus a random suffix: names that tests sharing one Consul agent cannot reuse."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def drain_one_of_two_workers(
    procs: ProcessGroup, *, delay: float, extra: Sequence[str] = ()
) -> tuple[BrokerProc, WorkerProc, WorkerProc, list[Any]]:
    """A graceful drain under load on a real broker: a worker (capacity 4, ``delay`` s per
    request, ``extra`` worker arguments) holds four requests when it gets SIGTERM; a second
    worker joined before that, and eight more requests go out once the broker has seen the
    drain. Returns (broker, the leaving worker, the staying one, the twelve answers in the
    order sent: the four held, then the eight)."""
    broker = procs.broker()
    leaving = procs.worker(broker, capacity=4, delay=delay, extra=extra)
    broker.wait_workers(1)
    with Client(broker.frontend, timeout=20) as client:
        client.request("svc", "warm-up")  # connected: the next submits go out at once
        pending = [client.submit("svc", i) for i in range(4)]  # all four held by the leaving worker
        staying = procs.worker(broker, capacity=4, extra=extra)
        broker.wait_workers(2)
        leaving.signal(signal.SIGTERM)
        broker.wait_for("is draining")
        more = [client.submit("svc", 100 + i) for i in range(8)]
        answers = [x.result() for x in pending + more]
    return broker, leaving, staying, answers


def sigkill_a_busy_worker(
    broker: BrokerProc, start_worker: Callable[[float], WorkerProc], client: Callable[[], Client]
) -> tuple[WorkerProc, list[Any]]:
    """A worker killed while it holds requests: three workers of capacity 4 for "svc"
    (``start_worker(delay)`` starts one taking ``delay`` s a request: the victim 0.3, two others
    0.05) get 60 idempotent requests from ``client()``; the victim gets SIGKILL once the first
    reply shows the dispatch happened, while it still holds its 4. Returns (the victim, the 60
    answers in the order sent)."""
    victim = start_worker(0.3)
    broker.wait_workers(1)
    for _ in range(2):
        start_worker(0.05)
    broker.wait_workers(3)
    with client() as c:
        pending = [c.submit("svc", i) for i in range(60)]
        # All three are idle, so each takes 4 at once. A first reply (fast workers: 50 ms) means
        # the dispatch happened; the victim (300 ms a request) still holds its 4.
        deadline = time.monotonic() + 10
        while not any(x.done() for x in pending) and time.monotonic() < deadline:
            pass
        victim.kill()
        answers = [x.result() for x in pending]
    return victim, answers


# -- the broker's back end, as a worker sees it -----------------------------------------------


@dataclass
class Msg:
    identity: bytes
    cmd: int
    header: list[Any]
    payload: bytes | None
    at: float

    def reply(self) -> tuple[int, int, str | None, str | None, Any]:
        """(rid, status, message, error_type, decoded payload) of a REPLY."""
        r = check_reply(self.header)
        return r.rid, r.status, r.message, r.error_type, decode_payload(r.flags, self.payload or b"")


class ScriptedBackend:
    """A stand-in broker as workers see it: a ROUTER on a free loopback port, run by a thread of
    its own, that records every message (:class:`Msg`), heartbeats every worker that sent READY
    (unless ``heartbeats_on`` is cleared), acknowledges DRAIN (unless ``ack_drain`` is cleared)
    and sends what the test queues (:meth:`send`, :meth:`request`). Every wait is a bounded wait
    on what it recorded."""

    def __init__(self, ctx: zmq.Context[Any], heartbeat: float = HB, endpoint: str | None = None) -> None:
        self.endpoint = endpoint or free_tcp_endpoint()
        self.heartbeat = heartbeat
        self.heartbeats_on = True
        self.ack_drain = True
        self.log: list[Msg] = []
        self._cond = threading.Condition()
        self._outbox: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
        self._peers: set[bytes] = set()
        self._sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        deadline = time.monotonic() + WAIT
        while True:  # a just-closed broker's listener is released asynchronously: retry a while
            try:
                self._sock.bind(self.endpoint)
                break
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    self._sock.close(0)
                    raise
                time.sleep(0.02)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scripted-backend", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        next_hb = time.monotonic()
        try:
            while not self._stop.is_set():
                if poller.poll(5):
                    while True:
                        try:
                            frames = recv_frames(sock, zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._record([f.bytes for f in frames])
                while True:
                    try:
                        send_frames(sock, self._outbox.get_nowait())
                    except queue.Empty:
                        break
                now = time.monotonic()
                if now >= next_hb:
                    next_hb = now + self.heartbeat
                    if self.heartbeats_on:
                        for peer in list(self._peers):
                            send_frames(sock, [peer, SIGNATURE, encode_heartbeat()])
        finally:
            sock.close(0)

    def _record(self, frames: list[bytes]) -> None:
        identity, sig, header_frame = frames[0], frames[1], frames[2]
        assert sig == SIGNATURE
        header = decode_header(header_frame)
        msg = Msg(identity, header[0], header, frames[3] if len(frames) > 3 else None, time.monotonic())
        if msg.cmd == READY:
            self._peers.add(identity)
        elif msg.cmd == DISCONNECT:
            self._peers.discard(identity)
        elif msg.cmd == DRAIN and self.ack_drain:
            send_frames(self._sock, [identity, SIGNATURE, encode_drain()])
        with self._cond:
            self.log.append(msg)
            self._cond.notify_all()

    # -- used by the tests -------------------------------------------------------------------

    def send(self, identity: bytes, header: bytes, payload: Any = None) -> None:
        frames = [identity, SIGNATURE, header] + ([] if payload is None else [payload])
        self._outbox.put(frames)

    def request(self, identity: bytes, rid: int, payload: Any, timeout_ms: int = 10_000, attempt: int = 0) -> None:
        flags, frame = encode_payload(payload)
        self.send(identity, encode_request(rid, "svc", timeout_ms, attempt, flags | 1), frame)

    def wait_for(self, pred: Callable[[Msg], bool], timeout: float = WAIT, start: int = 0) -> Msg:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.log[start:]:
                    if pred(msg):
                        return msg
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out; got {[(m.cmd, m.header) for m in self.log[-10:]]}")
                self._cond.wait(remaining)

    def wait_cmd(self, cmd: int, timeout: float = WAIT, start: int = 0, identity: bytes | None = None) -> Msg:
        return self.wait_for(lambda m: m.cmd == cmd and (identity is None or m.identity == identity), timeout, start)

    def wait_reply(self, rid: int, timeout: float = WAIT) -> Msg:
        return self.wait_for(lambda m: m.cmd == REPLY and m.header[1] == rid, timeout)

    def messages(self, cmd: int | None = None) -> list[Msg]:
        with self._cond:
            return [m for m in self.log if cmd is None or m.cmd == cmd]

    def mark(self) -> int:
        with self._cond:
            return len(self.log)

    def announced(self) -> int | None:
        """The capacity this broker was last told (READY, then UPDATEs) by its latest peer."""
        with self._cond:
            value = None
            for m in self.log:
                if m.cmd == READY:
                    value = check_ready(m.header).capacity
                elif m.cmd == UPDATE:
                    value = p.check_update(m.header).capacity
                elif m.cmd == DISCONNECT:
                    value = None
            return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)


# -- the broker's front end, as a client sees it ----------------------------------------------


class ScriptedFrontend:
    """A stand-in broker as clients see it: a ROUTER on a free loopback port, run by a thread,
    that decodes requests with zrouter.protocol and answers by service name, so each test
    controls exactly what comes back. Services: ``echo``, ``status-N``, ``delay-MS``,
    ``silent``, ``twice``, ``garbage`` (two undecodable messages, then an echo),
    ``no-payload``, ``bad-header``. With ``hold=True`` it records requests and answers none;
    with ``start_after`` it binds only after that many seconds."""

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
        self._thread = threading.Thread(target=self._run, name=f"scripted-frontend-{self.endpoint}", daemon=True)
        self._thread.start()
        if not start_after:
            assert self._bound.wait(WAIT), "scripted broker did not bind"

    def wait_for(self, predicate: Callable[[ScriptedFrontend], bool], timeout: float = WAIT) -> None:
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
        req = p.decode_request(header)
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
