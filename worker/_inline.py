"""Inline mode (``Worker(..., inline=True)``): the I/O thread runs sync handlers itself.

Each poll wake-up drains up to a batch of messages from every readable broker socket; the
REQUESTs among them wait in a local FIFO (conn.owed counts them, as in pool mode) and are then
run one after the other, in arrival order, each reply sent straight back on the socket the
request came in on: no pool thread, no queue hand-off, no inproc hop, no GIL ping-pong. A batch
that runs longer than a millisecond reads the sockets again between requests. Then the loop
runs its timers (heartbeats, liveness, drain progress) and polls again.

The price: nothing else happens while a handler runs. No heartbeat goes out and no broker
message is read, so a handler must finish well within ``heartbeat_interval * liveness`` or the
broker declares the worker dead and requeues what it held (the late reply is then refused and
the worker registers again). After a long handler, a broker whose messages are waiting unread
is not taken for silent. Requests beyond the one running wait in the local FIFO or the socket;
the broker's credits (``capacity``) still bound how many the worker holds. A request's deadline
counts from when the worker reads it, so one that arrives during a handler gets that much late.

A second SIGINT/SIGTERM ("stop without waiting") interrupts the running handler when the loop
runs in the main thread (the CLI): the request is abandoned unanswered, as pool mode abandons
its threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import zmq

from zrouter.errors import ProtocolError
from zrouter.protocol import (
    REQUEST,
    SIGNATURE,
    STATUS_BAD_REQUEST,
    STATUS_REMOTE_ERROR,
    STATUS_TIMEOUT,
    decode_header,
    decode_payload,
)
from zrouter.transport import NOBLOCK
# Compiled when built, else zrouter.protocol/transport's.
from zrouter._speedups import encode_reply, recv_frames

from ._connection import DRAINING, BrokerConnection
from ._context import RequestInfo, _current
from ._engine import _BATCH, Engine
from ._handlers import Job, Reply, Runner, _error_reply, _reply

__all__ = ["InlineEngine"]

log = logging.getLogger("zrouter.worker")

_EMPTY: Final = b""
_POLLIN: Final = int(zmq.POLLIN)
_REDRAIN: Final = 0.001  # s: within a batch, read the sockets again after this long


def _timeout_header(rid: int) -> bytes:
    return encode_reply(rid, STATUS_TIMEOUT, 0, "deadline passed while queued in the worker")


# (connection, generation, rid, service, attempt, deadline, flags, payload frame or None)
Item = tuple[BrokerConnection, int, int, str, int, float, int, Any]


class _ForcedStop(BaseException):
    """Raised from the signal handler into a running inline handler on a forced stop."""


class _NoThreads(Runner):
    """The runner an inline engine hands to :meth:`Engine.run`: there is nothing to run."""

    def __init__(self, post: Callable[[Reply], None], instance_id: str) -> None:
        super().__init__(post, instance_id)
        self.submit = _ignore

    def start(self) -> None:
        pass

    def shutdown(self, deadline: float) -> bool:
        return True


def _ignore(job: Job) -> None:
    raise AssertionError("an inline worker has no handler pool")


class InlineEngine(Engine):
    """An :class:`Engine` whose I/O thread calls the (sync) handler itself."""

    def __init__(self, *, handler: Callable[[Any], Any], instance_id: str, **engine: Any) -> None:
        super().__init__(runner_factory=lambda post: _NoThreads(post, instance_id), **engine)
        self._handler = handler
        self._instance_id = instance_id
        self._queue: deque[Item] = deque()
        self._in_handler = False
        self._ident = -1  # the loop's thread

    def request_stop(self, force: bool = False) -> None:
        super().request_stop(force)
        # A signal handler runs in the main thread: when that thread is inside a handler, a
        # forced stop leaves the handler now (see _run_queue) instead of after it returns.
        if force and self._in_handler and threading.get_ident() == self._ident:
            self._in_handler = False
            raise _ForcedStop

    def _loop(self) -> None:
        self._ident = threading.get_ident()
        super()._loop()

    def _after_events(self, now: float) -> float:
        return self._run_queue(now) if self._queue else now

    def _on_broker(self, conn: BrokerConnection, sock: zmq.Socket[Any], now: float) -> None:
        append = self._queue.append
        for _ in range(_BATCH):
            try:
                frames = recv_frames(sock, NOBLOCK)
            except zmq.Again:
                return
            conn.last_recv = now
            n = len(frames)
            first = frames[0]
            header_frame = frames[1] if n > 1 else None
            payload = frames[2] if n > 2 else None  # frames past it are tolerated: later versions
            if header_frame is None or first.bytes != SIGNATURE:
                log.warning("broker %s sent a message without the zrouter signature", conn.endpoint)
                continue
            try:
                header = decode_header(header_frame.buffer)
            except ProtocolError as exc:
                log.warning("broker %s sent a bad header: %s", conn.endpoint, exc)
                continue
            cmd = header[0]
            if cmd == REQUEST:
                if not conn.confirmed:
                    self._confirm(conn, now)
                try:
                    item: Item = (conn, conn.generation, header[1], header[2], header[4],
                                  now + header[3] * 0.001, header[5], payload)  # fmt: skip
                except (IndexError, TypeError):
                    self._reject(conn, header, now)
                    continue
                conn.owed += 1
                self.running += 1
                append(item)
            elif self._on_command(conn, cmd, now):
                return

    def _on_timers(self, now: float) -> float:
        # Messages queued unread behind a long batch prove the broker alive: do not reconnect.
        dead_after = self.dead_after
        for conn in self.conns:
            sock = conn.sock
            if sock is not None and now - conn.last_recv >= dead_after and sock.poll(0, _POLLIN):
                conn.last_recv = now
        return super()._on_timers(now)

    def _run_queue(self, now: float) -> float:
        """Run the queued requests in arrival order, replying to each; returns the time after.

        Once a batch has run for ``_REDRAIN`` the sockets are read again between requests (new
        requests join the end of the queue): a request's deadline counts from when it is read,
        and DRAIN acknowledgements or broker heartbeats should not wait for the whole batch."""
        queue = self._queue
        monotonic = time.monotonic
        drained = now
        while queue:
            if now - drained >= _REDRAIN:
                drained = now
                for conn in list(self.conns):
                    if conn.sock is not None:
                        self._on_broker(conn, conn.sock, now)
            if self._force or (self.stopping and now >= self.stop_deadline):
                break  # forced, or out of drain time: the connections are finished unanswered
            conn, generation, rid, service, attempt, deadline, flags, frame = queue.popleft()
            self.running -= 1
            if conn.generation != generation or conn.sock is None:
                log.debug("dropping a queued request of an earlier connection to %s", conn.endpoint)
                continue
            if now >= deadline:
                header, payload = _timeout_header(rid), _EMPTY
            else:
                token = _current.set(RequestInfo(rid, service, attempt, deadline, self._instance_id))
                try:
                    header, payload = self._call(rid, flags, frame)
                except _ForcedStop:
                    log.warning("stopping without waiting: request %d abandoned", rid)
                    return monotonic()
                finally:
                    _current.reset(token)
            now = monotonic()
            conn.reply(header, payload, now)
            conn.owed -= 1
            if conn.state == DRAINING and conn.owed == 0:
                self._dirty = True
        return now

    def _call(self, rid: int, flags: int, frame: Any) -> tuple[bytes, Any]:
        """(reply header, payload) for one request; lets only :class:`_ForcedStop` out."""
        try:
            arg = decode_payload(flags, _EMPTY if frame is None else frame.bytes)
        except ProtocolError as exc:
            return _error_reply(rid, STATUS_BAD_REQUEST, exc)
        try:
            try:
                self._in_handler = True
                result = self._handler(arg)
            finally:
                self._in_handler = False
        except _ForcedStop:
            raise
        except BaseException as exc:
            log.debug("handler raised for request %d", rid, exc_info=True)
            return _error_reply(rid, STATUS_REMOTE_ERROR, exc)
        return _reply(rid, result)
