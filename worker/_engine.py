"""The worker's I/O thread: one zmq poll loop over every broker DEALER and a wake-up socket
pair; it alone touches those sockets.

Each REQUEST read becomes a :class:`~worker._handlers.Job` and goes to :meth:`Engine._accept`,
the one step the inline engine (``_inline``) does differently: here it goes to a handler runner
(``_handlers``), or waits in the backlog while ``capacity`` jobs run. Replies come back through
:meth:`Engine.post` (a deque, plus a wake-up byte unless one is on its way) with their job, which
names the connection and generation to answer on. Other threads talk to the loop only through
``post``, :meth:`Engine.request_stop` and :meth:`Engine.set_brokers` (a field set under a lock,
a byte). The broker connections' life (open, confirm, liveness, reconnect, drain, rebalance) is
mixed in from ``_lifecycle``.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

import zmq

from zrouter.curve import ClientKeys
from zrouter.errors import AuthenticationFailed
from zrouter.protocol import (
    SIGNATURE,
    STATUS_BAD_REQUEST,
    BadMessage,
    BrokerMessage,
    Disconnect,
    Drain,
    Request,
    UnknownCommand,
    check_frames,
    check_payload_count,
    decode_broker_message,
)
from zrouter.ratelimit import RateLimiter
# The per-request codec and socket calls: compiled when built, else zrouter.protocol/transport.
from zrouter._speedups import decode_request, encode_reply, recv_or_none

from ._connection import DRAINING, BrokerConnection
from ._handlers import Answer, Job, Runner, timeout_reply
from ._lifecycle import Connections

__all__ = ["Engine"]

log = logging.getLogger("zrouter.worker")

_BATCH: Final = 256  # messages taken from one socket per poll wake-up
_EMPTY: Final = b""
# Warnings about bad messages: LOG_BAD_BURST at once per broker, then one per LOG_BAD_EVERY s.
_LOG_BAD_BURST: Final = 3
_LOG_BAD_EVERY: Final = 10.0
_new_job: Final = tuple.__new__  # Job(...) would cost a Python-level __new__ per request

RunnerFactory = Callable[[Callable[[Answer], None]], Runner]  # given Engine.post


def _decode(frames: list[zmq.Frame]) -> BrokerMessage:
    """The message in a broker's ``frames`` (signature, header, payload if any), checked by
    :mod:`zrouter.protocol`. Raises :class:`~zrouter.protocol.BadMessage` (or
    :class:`~zrouter.protocol.UnknownCommand`) naming what is wrong.

    Nearly everything a broker sends a worker is a REQUEST: three frames, checked in one pass by
    :func:`~zrouter.protocol.decode_request` (half the cost of the general decoder). Anything
    else, or a REQUEST that fails that check, takes the general path."""
    if len(frames) == 3 and frames[0].bytes == SIGNATURE:
        try:
            return decode_request(frames[1])  # the frame itself: no memoryview per request
        except BadMessage as exc:
            if exc.kind != "wrong_command":  # a REQUEST, but a bad one: the error says why
                raise
    check_frames(frames, 0)
    msg = decode_broker_message(frames[1])
    check_payload_count(msg, frames, 0)
    return msg


class Engine(Connections):
    """Broker connections, request bookkeeping and the poll loop (see the module docstring)."""

    def __init__(
        self,
        *,
        service: str,
        capacity: int,
        weight: int,
        heartbeat_interval: float,
        liveness: int,
        meta: dict[str, str],
        drain_timeout: float,
        brokers: Sequence[str],
        runner_factory: RunnerFactory,
        curve: ClientKeys | None = None,
    ) -> None:
        self.service = service
        self.capacity = capacity
        self.weight = weight
        self.heartbeat = heartbeat_interval
        self.dead_after = heartbeat_interval * liveness
        self.meta = meta
        self.drain_timeout = drain_timeout
        self._runner_factory = runner_factory
        self.curve = curve  # CURVE keys for every broker connection (None: no CURVE)
        self.refused: AuthenticationFailed | None = None  # set when every broker refused our key
        self.closed = threading.Event()  # set once the loop has ended (late posts go nowhere)
        self.last_tick = 0.0  # monotonic time of the loop's latest wake-up (registration health)

        # Control from other threads. Re-entrant: a signal handler may interrupt _on_wake's holder.
        self._lock = threading.RLock()
        self._stop_requested = False
        self._control = False  # request_stop/set_brokers left something for _on_wake to read
        self._force = False
        self._new_brokers: list[str] | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

        # I/O thread state.
        self.conns = [BrokerConnection(ep, i) for i, ep in enumerate(brokers)]
        self.backlog: deque[Job] = deque()  # over the local limit: the broker overfilled us
        self.running = 0  # jobs handed to the runner and not yet answered
        self.stopping = False
        self.stop_deadline = math.inf
        self._dirty = True  # re-run the timers on the next turn of the loop
        self._finished = False
        self._ctx: zmq.Context[Any] | None = None
        self._poller = zmq.Poller()
        self._by_sock: dict[zmq.Socket[Any], BrokerConnection] = {}
        self._by_monitor: dict[zmq.Socket[Any], BrokerConnection] = {}  # CURVE handshake monitors
        self._submit: Callable[[Job], None] = lambda job: None
        self._replies: deque[Answer] = deque()  # from the runner's threads (post)
        self._reply_woken = False  # a wake-up byte for the replies is on its way
        self._short = False  # a broker's share is below its target, waiting for room (_rebalance)
        self.overfilled = 0  # requests that arrived with every handler busy (a broker overdelivered)
        self.bad_messages = 0  # messages from brokers that broke the protocol (refused)
        self._log_bad = RateLimiter(1.0 / _LOG_BAD_EVERY, _LOG_BAD_BURST, 64)  # keyed by endpoint
        self._overfill_logged_at = -math.inf

    # -- any thread --------------------------------------------------------------------------

    def request_stop(self, force: bool = False) -> None:
        with self._lock:
            self._stop_requested = True
            self._force = self._force or force
            self._control = True
        self._wake()

    def set_brokers(self, endpoints: Sequence[str]) -> None:
        with self._lock:
            self._new_brokers = list(endpoints)
            self._control = True
        self._wake()

    def post(self, reply: Answer) -> None:
        """A handler's reply, from any thread: queued for the loop, woken if not already due."""
        self._replies.append(reply)
        if not self._reply_woken:  # two threads may both write: a spare wake-up is harmless
            self._reply_woken = True
            self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or already closed
            pass

    def status(self) -> tuple[bool, str]:
        """(healthy, note) for the registration's TTL check: the loop turns and is not closed."""
        healthy = not self.closed.is_set() and time.monotonic() - self.last_tick < self.dead_after + 1.0
        conns = list(self.conns)
        up = sum(1 for c in conns if c.confirmed)
        return healthy, f"brokers {up}/{len(conns)}, in flight {self.running}/{self.capacity}"

    # -- the I/O thread ----------------------------------------------------------------------

    def run(self, on_started: Callable[[], None] | None = None) -> None:
        """Serve until a stop request has drained every connection; then shut the runner down.

        ``on_started`` is called (in this thread) once the handler runner is up, just before
        the loop starts."""
        ctx: zmq.Context[Any] = zmq.Context()
        self._ctx = ctx
        runner = self._runner_factory(self.post)
        self._submit = runner.submit
        clean = False
        try:
            runner.start()
            self.last_tick = time.monotonic()
            if on_started is not None:
                on_started()
            self._loop()
            clean = True
        finally:
            for conn in list(self.conns):
                self._remove(conn)
            self.closed.set()
            self._wake_r.close()
            self._wake_w.close()
            now = time.monotonic()
            deadline = min(self.stop_deadline, now + self.drain_timeout) if clean else now
            if self.running == 0:  # idle threads only have to see the end-of-work marker
                deadline = max(deadline, now + 2.0)
            if runner.shutdown(deadline):
                ctx.term()  # waits (bounded by linger) for DISCONNECTs to be flushed
            else:
                log.warning("handlers still running after the drain timeout: abandoning them")
        if self.refused is not None:
            raise self.refused

    def _loop(self) -> None:
        poller = self._poller
        wake_fd = self._wake_r.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        by_sock = self._by_sock
        poll = poller.poll
        monotonic = time.monotonic
        after_events = self._after_events
        next_timer = 0.0
        now = monotonic()
        self._on_wake(now)  # a stop or broker list that came before the loop started
        while True:
            if self._dirty or now >= next_timer:
                self._dirty = False
                next_timer = self._on_timers(now)
                if self._finished:
                    return
            events = poll(max(0, math.ceil((next_timer - now) * 1000.0)))
            now = monotonic()
            self.last_tick = now
            for sock, _ in events:
                conn = by_sock.get(sock)
                if conn is not None:
                    self._on_broker(conn, sock, now)
                elif sock == wake_fd:
                    self._on_wake(now)
                elif sock in self._by_monitor:
                    self._on_monitor(self._by_monitor[sock], now)
            now = after_events(now)

    def _after_events(self, now: float) -> float:
        """After each wake-up's events: the replies posted meanwhile. Returns the time after."""
        if self._replies:
            self._on_replies(now)
        return now

    def _on_broker(self, conn: BrokerConnection, sock: zmq.Socket[Any], now: float) -> None:
        """Read up to a batch of messages from one broker: REQUESTs go to :meth:`_accept`."""
        accept = self._accept
        for _ in range(_BATCH):
            frames = recv_or_none(sock)  # None once drained: no zmq.Again built per wake-up
            if frames is None:
                return
            conn.last_recv = now
            try:
                msg = _decode(frames)
            except UnknownCommand as exc:  # a later version's: ignored (docs/protocol.md)
                log.debug("broker %s sent unknown command %d: ignored", conn.endpoint, exc.command)
                continue
            except BadMessage as exc:
                self._refuse(conn, exc, now)
                continue
            if not conn.confirmed and type(msg) is not Disconnect:
                self._confirm(conn, now)
            if type(msg) is Request:
                conn.owed += 1
                accept(_new_job(Job, (conn, conn.generation, msg.rid, msg.service, msg.attempt,
                                      now + msg.timeout_ms * 0.001, msg.flags, frames[2])), now)  # fmt: skip
            elif self._on_command(conn, msg, now):
                return

    def _on_command(self, conn: BrokerConnection, msg: BrokerMessage, now: float) -> bool:
        """HEARTBEAT, DRAIN or DISCONNECT; True when the socket must not be read on (DISCONNECT)."""
        kind = type(msg)
        if kind is Drain:
            if conn.state == DRAINING:
                conn.drain_acked = True
                self._dirty = True
            else:
                log.info("broker %s sent DRAIN unasked: ignored", conn.endpoint)
        elif kind is Disconnect:
            self._on_disconnect(conn, now, msg.reason)  # type: ignore[union-attr]
            return True
        return False

    def _refuse(self, conn: BrokerConnection, exc: BadMessage, now: float) -> None:
        """A message that breaks the protocol: counted, dropped, logged at a bounded rate; a
        REQUEST whose rid could be read is answered BAD_REQUEST, so the broker does not wait for
        it until its deadline."""
        self.bad_messages += 1
        skipped = self._log_bad.take(conn.endpoint, now)
        if skipped is not None:
            log.warning("broker %s sent a bad message (%s): %s%s", conn.endpoint, exc.kind, exc,
                        f" [{skipped} similar lines not logged]" if skipped else "")  # fmt: skip
        if exc.rid and exc.kind != "wrong_command":
            bad = encode_reply(exc.rid, STATUS_BAD_REQUEST, 0, f"bad request: {exc}")
            conn.send((SIGNATURE, bad, _EMPTY), now)

    def _accept(self, job: Job, now: float) -> None:
        """Run a request read from a broker: on the runner, or in the backlog while it is full."""
        if self.running < self.capacity:
            self.running += 1
            self._submit(job)
        else:
            self.backlog.append(job)
            self._overfilled(job.conn, now)

    def _on_replies(self, now: float) -> None:
        replies = self._replies
        pop = replies.popleft
        while replies:  # at most capacity of them
            job, header, payload = pop()
            self.running -= 1
            self._reply(job, header, payload, now)
        if self.backlog:
            self._pump_backlog(now)
        if self._short:  # a reply may have made room for a broker waiting on its share
            self._rebalance(now)

    def _pump_backlog(self, now: float) -> None:
        backlog = self.backlog
        while backlog and self.running < self.capacity:
            job = backlog.popleft()
            if self._runnable(job, now):
                self.running += 1
                self._submit(job)

    def _runnable(self, job: Job, now: float) -> bool:
        """Whether a job that waited in the worker may still run: not when its connection was
        replaced meanwhile (dropped) or its deadline passed (answered TIMEOUT)."""
        conn = job.conn
        if conn.generation != job.generation or conn.sock is None:
            log.debug("dropping a queued request of an earlier connection to %s", conn.endpoint)
            return False
        if now >= job.deadline:
            header, payload = timeout_reply(job.rid)
            self._reply(job, header, payload, now)
            return False
        return True

    def _reply(self, job: Job, header: bytes, payload: Any, now: float) -> None:
        """Send a job's reply on the connection it came from, unless that was replaced since."""
        conn = job.conn
        if conn.generation != job.generation or conn.sock is None:
            log.debug("dropping a reply owed to an earlier connection to %s", conn.endpoint)
            return
        conn.reply(header, payload, now)
        conn.owed -= 1
        if conn.state == DRAINING and conn.owed == 0:
            self._dirty = True

    def _on_wake(self, now: float) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:  # drained (BlockingIOError)
            pass
        self._reply_woken = False  # before the loop reads the deque: a later post wakes again
        if not self._control:
            return
        self._control = False
        with self._lock:
            stop, force, brokers = self._stop_requested, self._force, self._new_brokers
            self._new_brokers = None
        if stop and not self.stopping:
            self._start_stop(now)
        if force:
            self.stop_deadline = now
            for conn in self.conns:
                conn.drain_deadline = min(conn.drain_deadline, now)
        if brokers is not None and not self.stopping:
            self._apply_brokers(brokers, now)
        self._dirty = True
