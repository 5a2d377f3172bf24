"""The worker's I/O thread: one zmq poll loop over every broker DEALER and a wake-up socket
pair; it alone touches those sockets.

Each REQUEST read becomes a :class:`~worker._handlers.Job` and goes to :meth:`Engine._accept`,
the one step the inline engine (``_inline``) does differently: here it goes to a handler runner
(``_handlers``), or waits in the backlog while ``capacity`` jobs run. Replies come back through
:meth:`Engine.post` (a deque, plus a wake-up byte unless one is on its way) with their job, which
names the connection and generation to answer on. Other threads talk to the loop only through
``post``, :meth:`Engine.request_stop` and :meth:`Engine.set_brokers` (a field set under a lock,
a byte).
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
    encode_disconnect,
    encode_drain,
    encode_ready,
    encode_update,
)
from zrouter.ratelimit import RateLimiter
# The per-request codec and socket calls: compiled when built, else zrouter.protocol/transport.
from zrouter._speedups import decode_request, encode_reply, recv_or_none

from ._connection import ACTIVE, BACKOFF, DRAINING, BrokerConnection, ready_share, rebalance
from ._handlers import Answer, Job, Runner, timeout_reply

__all__ = ["Engine"]

log = logging.getLogger("zrouter.worker")

_BATCH: Final = 256  # messages taken from one socket per poll wake-up
_DISCONNECT_LINGER_MS: Final = 1000  # how long a closing socket may spend flushing DISCONNECT
_EMPTY: Final = b""
_DRAIN_FRAMES: Final = (SIGNATURE, encode_drain())
_OVERFILL_LOG_EVERY: Final = 10.0  # s between warnings about brokers sending beyond the capacity
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


class Engine:
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

    # -- connection life cycle ---------------------------------------------------------------

    def _on_timers(self, now: float) -> float:
        """Reconnects, liveness, heartbeats and drain progress; returns the next timer due."""
        heartbeat, dead_after = self.heartbeat, self.dead_after
        nxt = now + heartbeat
        changed = False
        for conn in list(self.conns):
            if conn.state == BACKOFF:
                if conn.removed:
                    self._remove(conn)
                    continue
                if now < conn.reconnect_at:
                    nxt = min(nxt, conn.reconnect_at)
                    continue
                self._open(conn, now)
            elif now - conn.last_recv >= dead_after and conn.sock is not None and conn.sock.poll(0, zmq.POLLIN):
                conn.last_recv = now  # its messages wait unread behind a late turn of this loop: alive
            elif now - conn.last_recv >= dead_after:
                changed = True
                if conn.state == DRAINING or conn.removed:
                    log.warning("broker %s silent while draining: giving up on it", conn.endpoint)
                    self._remove(conn)
                    continue
                heard = conn.confirmed
                self._close(conn, 0)
                delay = conn.schedule_reconnect(now)
                if heard:
                    log.warning("broker %s silent for %.1f s: reconnecting", conn.endpoint, dead_after)
                else:  # never answered this connection: down, or not started yet
                    log.info("no answer from broker %s: retrying in %.1f s", conn.endpoint, delay)
                nxt = min(nxt, conn.reconnect_at)
                continue
            elif conn.state == DRAINING:
                if (conn.drain_acked and conn.owed == 0) or now >= conn.drain_deadline:
                    self._finish(conn, now)
                    continue
                nxt = min(nxt, conn.drain_deadline)
            if now - conn.last_send >= heartbeat:
                conn.heartbeat(now)
            nxt = min(nxt, conn.last_send + heartbeat, conn.last_recv + dead_after)
        if changed or self._short:
            self._rebalance(now)
        if self._short:  # a lowered share settles then, making room for the raise that waits
            nxt = min([nxt, *(c.settle_at for c in self.conns if c.excess)])
        if self.stopping and not self.conns:
            self._finished = True
        return nxt

    def _open(self, conn: BrokerConnection, now: float) -> None:
        assert self._ctx is not None
        # Until the broker confirms us, take only capacity no other broker may hold.
        share = ready_share(self.capacity, self.running + len(self.backlog), self.conns)
        ready = encode_ready(self.service, share, self.weight, self.meta)
        sock = conn.open(self._ctx, ready, share, now, self.curve)
        self._poller.register(sock, zmq.POLLIN)
        self._by_sock[sock] = conn
        if conn.monitor is not None:
            self._poller.register(conn.monitor, zmq.POLLIN)
            self._by_monitor[conn.monitor] = conn
        log.info("connecting to broker %s (connection %d), capacity %d", conn.endpoint, conn.generation, share)

    def _confirm(self, conn: BrokerConnection, now: float) -> None:
        conn.confirmed = True
        conn.attempt = 0
        log.info("registered with broker %s", conn.endpoint)
        self._rebalance(now)

    def _close(self, conn: BrokerConnection, linger_ms: int) -> None:
        sock = conn.sock
        if sock is not None:
            self._poller.unregister(sock)
            del self._by_sock[sock]
            if conn.monitor is not None:
                self._poller.unregister(conn.monitor)
                del self._by_monitor[conn.monitor]
            conn.close(linger_ms)

    def _on_monitor(self, conn: BrokerConnection, now: float) -> None:
        """CURVE only: a broker refused our handshake. Loud, and final once every broker has:
        the loop ends and run() raises AuthenticationFailed."""
        why = conn.read_monitor()
        if why is None:
            return
        log.error("broker %s refused this worker: %s", conn.endpoint, why)
        self._close(conn, 0)
        conn.schedule_retry_refused(now)
        self._rebalance(now)
        self._dirty = True
        if all(c.refused for c in self.conns):
            self.refused = AuthenticationFailed(f"broker {conn.endpoint}: {why}")
            self._finished = True

    def _remove(self, conn: BrokerConnection, linger_ms: int = 0) -> None:
        self._close(conn, linger_ms)
        conn.removed = True
        conn.state = BACKOFF
        if conn in self.conns:
            self.conns.remove(conn)

    def _on_disconnect(self, conn: BrokerConnection, now: float, reason: str | None = None) -> None:
        # The reason is the broker's (bounded by the decoder); a refused READY says why here.
        why = f": {reason}" if reason else ""
        if conn.state == DRAINING or conn.removed:
            log.info("broker %s dropped us while draining%s", conn.endpoint, why)
            self._remove(conn)
        else:
            log.warning("broker %s sent DISCONNECT%s; registering again on a new connection", conn.endpoint, why)
            self._close(conn, 0)
            conn.schedule_reconnect(now)
            self._rebalance(now)
        self._dirty = True

    def _begin_drain(self, conn: BrokerConnection, now: float, deadline: float) -> None:
        conn.removed = True
        if conn.state == BACKOFF:
            self._remove(conn)
        elif conn.state == ACTIVE:
            if not conn.confirmed and conn.owed == 0:  # nothing received: nothing to drain
                conn.send((SIGNATURE, encode_disconnect("stopping")), now)
                self._remove(conn, _DISCONNECT_LINGER_MS)
                return
            conn.send(_DRAIN_FRAMES, now)
            conn.state = DRAINING
            conn.set_share(0, now + self.heartbeat)  # requests already on their way still come
            conn.drain_deadline = deadline
            log.info("draining broker %s (%d requests owed)", conn.endpoint, conn.owed)

    def _finish(self, conn: BrokerConnection, now: float) -> None:
        drained = conn.drain_acked and conn.owed == 0
        if not drained:
            log.warning(
                "drain of broker %s timed out (%s, %d replies owed)",
                conn.endpoint, "acknowledged" if conn.drain_acked else "no acknowledgement", conn.owed,
            )  # fmt: skip
        conn.send((SIGNATURE, encode_disconnect("drained" if drained else "drain timeout")), now)
        self._remove(conn, _DISCONNECT_LINGER_MS)
        log.info("disconnected from broker %s", conn.endpoint)

    def _start_stop(self, now: float) -> None:
        self.stopping = True
        self.stop_deadline = now + self.drain_timeout
        log.info("stopping: draining %d broker connection(s)", len(self.conns))
        for conn in list(self.conns):
            self._begin_drain(conn, now, self.stop_deadline)

    def _apply_brokers(self, endpoints: list[str], now: float) -> None:
        current = {c.endpoint: c for c in self.conns if not c.removed}
        for endpoint, conn in current.items():
            if endpoint not in endpoints:
                log.info("broker %s no longer listed", endpoint)
                self._begin_drain(conn, now, now + self.drain_timeout)
        for order, endpoint in enumerate(endpoints):
            known = current.get(endpoint)
            if known is None:
                log.info("broker %s added", endpoint)
                self.conns.append(BrokerConnection(endpoint, order))
            else:
                known.order = order
        self._rebalance(now)

    def _rebalance(self, now: float) -> None:
        """UPDATE the confirmed brokers towards an even split (``_connection.rebalance``): decreases
        at once, increases only into room no other broker may still hold; ``_short`` meanwhile."""
        if self.stopping:
            self._short = False
            return
        held = self.running + len(self.backlog)
        before = {conn: conn.share for conn in self.conns}
        changes, self._short = rebalance(self.capacity, held, self.conns, now, self.heartbeat)
        for conn, share in changes:
            log.info("broker %s: capacity %d -> %d", conn.endpoint, before[conn], share)
            conn.send((SIGNATURE, encode_update(share, self.weight)), now)

    def _overfilled(self, conn: BrokerConnection, now: float) -> None:
        """A request arrived with every handler busy (brokers keeping to their shares never do
        that): it waits here; counted, logged at a bounded rate."""
        self.overfilled += 1
        if now - self._overfill_logged_at >= _OVERFILL_LOG_EVERY:
            self._overfill_logged_at = now
            log.warning("broker %s sent a request beyond this worker's capacity %d (%d waiting here; "
                        "%d so far)", conn.endpoint, self.capacity, len(self.backlog), self.overfilled)
