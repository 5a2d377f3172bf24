"""Everything a zrouter client does that never waits, shared by ``Client`` and ``AsyncClient``.

The two front ends differ only in *how they wait* (the sync one polls from the calling thread,
the async one parks a reader task on the sockets' file descriptors). Everything else lives
here, so both behave the same and the logic can be tested without sockets or sleeps:

- request ids, request frames, the pending table (rid -> entry) with a deadline heap;
- turning a reply's frames into a value or an exception and settling its entry;
- expiring entries whose deadline passed;
- what happens to requests when a broker's connection drops (idempotent ones are re-sent to
  another broker, the others fail), and a queue of requests waiting for any broker;
- keeping within the broker's per-client bounds (zrouter.limits): a connection takes a request
  only while it has fewer than ``max_inflight`` requests and ``max_inflight_bytes`` of payload
  there; the rest wait here, in order. A request given up on here (deadline, cancel) keeps its
  place until the broker answers it too (it always does, by the deadline), so our count never
  drops below the broker's.

The broker connections themselves (sockets, up/down state, picking one) are in ``_brokers.py``.
Every method takes ``now`` (a ``time.monotonic()`` value; asyncio's ``loop.time()`` is the
same clock) instead of reading a clock, so tests can drive time by hand.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from heapq import heapify, heappop, heappush
from typing import Any, Final

import zmq

from zrouter import limits
from zrouter.client._brokers import BrokerConn, BrokerSet, SocketFactory
from zrouter.client._entry import Entry, request_frames
from zrouter.errors import ClientClosed, MessageTooLarge, ProtocolError, RequestTimeout, WorkerLost
from zrouter.protocol import (
    FLAG_IDEMPOTENT,
    MAX_TIMEOUT_MS,
    SIGNATURE,
    STATUS_OK,
    BadMessage,
    Reply,
    check_frames,
    decode_payload,
    encode_payload,
    error_for_status,
)
from zrouter.transport import NOBLOCK
# The per-request codec and socket calls: compiled when built, else zrouter.protocol/transport.
from zrouter import _speedups
from zrouter._speedups import decode_reply, recv_frames, recv_or_none, send_frames

__all__ = ["DEFAULT_BROKER", "DEFAULT_TIMEOUT", "MAX_TIMEOUT", "ClientCore", "Entry", "request_frames"]

log = logging.getLogger("zrouter.client")

DEFAULT_BROKER: Final = "tcp://127.0.0.1:5555"
DEFAULT_TIMEOUT: Final = 10.0

# While requests wait for a broker that is "up" but refused the send (its disconnect event is
# still in flight), look again after this long instead of waiting for an event that already came.
_RESEND_RETRY: Final = 0.05
# A request given up on here keeps its place in the broker's bounds until the broker answers it
# (by its deadline); if that answer never comes (a broker that does not answer what its workers
# hold), the place is freed this long after the deadline.
_HOLD_GRACE: Final = 2.0

# The longest request deadline, in seconds: the protocol's timeout_ms limit (one day). Checked
# when the request is made, so a longer one (or inf) fails there, not in the encoder or at the
# broker after it was registered.
MAX_TIMEOUT: Final = MAX_TIMEOUT_MS / 1000.0
_EVENTS: Final = int(zmq.EVENTS)
_NATIVE: Final = _speedups.native()
_POLLIN: Final = int(zmq.POLLIN)


class ClientCore:
    """The state of one client; see the module docstring. Not thread-safe, like a zmq socket."""

    def __init__(
        self,
        brokers: str | Iterable[str],
        connect: SocketFactory,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_message_size: int | None = limits.MAX_MESSAGE_SIZE,
        max_inflight: int = limits.MAX_CLIENT_REQUESTS,
        max_inflight_bytes: int = limits.MAX_CLIENT_BYTES,
        watch: Callable[[Any], None] | None = None,
        unwatch: Callable[[Any], None] | None = None,
    ) -> None:
        if not 0 < timeout <= MAX_TIMEOUT:  # also refuses NaN
            raise ValueError(f"timeout must be > 0 and at most {MAX_TIMEOUT:g} seconds, got {timeout!r}")
        if max_message_size is not None and max_message_size <= 0:
            raise ValueError(f"max_message_size must be > 0 or None, got {max_message_size!r}")
        if max_inflight < 1 or max_inflight_bytes < 1:
            raise ValueError(f"max_inflight and max_inflight_bytes must be >= 1, got {max_inflight!r}, "
                             f"{max_inflight_bytes!r}")
        self.timeout = float(timeout)
        self.max_message_size = max_message_size
        # rid -> (connection, payload bytes, when to stop waiting): given up on here, not yet
        # answered by the broker, so still counted in its bounds.
        self._held: dict[int, tuple[BrokerConn, int, float]] = {}
        self._held_next = math.inf
        self.pending: dict[int, Entry] = {}
        # (deadline, rid, entry); settled entries are left in place and skipped when popped, and
        # the heap is rebuilt when they outnumber live ones (see _compact).
        self._deadlines: list[tuple[float, int, Entry]] = []
        self._waiting: deque[Entry] = deque()  # not sent: no broker connected when they were due
        self._next_rid = 1
        self.closed = False
        # Called after a broker connection comes up or drops (AsyncClient wakes its waiters).
        self.on_connection_change: Callable[[], None] | None = None
        self._brokers = BrokerSet(connect, self._broker_up, self._broker_down, watch, unwatch,
                                  max_inflight, max_inflight_bytes)
        try:
            self._brokers.set(brokers)
        except BaseException:  # e.g. a malformed endpoint: do not leak the sockets made so far
            self._brokers.close_all()
            raise
        if _NATIVE:
            # The per-request common path, compiled (zrouter/_native/client.pyx); it hands every
            # other case back to the methods it shadows, passed here bound.
            path = _speedups.load_native("client").ClientPath(self, self.start, self.handle_reply)
            self.start, self.handle_reply, self._drain = (  # type: ignore[method-assign]
                path.start, path.handle_reply, path.drain)

    # -- brokers ------------------------------------------------------------------------------

    @property
    def brokers(self) -> list[str]:
        return list(self._brokers.conns)

    @property
    def connected(self) -> list[str]:
        return [c.endpoint for c in self._brokers.up]

    def connection(self, endpoint: str) -> BrokerConn | None:
        """The active connection to ``endpoint``, if any (for inspection and tests)."""
        return self._brokers.conns.get(endpoint)

    @property
    def sockets(self) -> list[Any]:
        """Every socket that must be watched for input (data and monitor sockets)."""
        return list(self._brokers.socks)

    def add_broker(self, endpoint: str) -> None:
        """Connect to one more broker (no-op if already there; revives one being removed)."""
        if self.closed:
            raise ClientClosed("client is closed")
        self._brokers.add(endpoint)

    def remove_broker(self, endpoint: str) -> None:
        """Send nothing new to ``endpoint``; its pending requests may still be answered there.

        The connection closes once they settle. If it drops before, they are handled like any
        lost connection (idempotent ones re-sent elsewhere). Unknown endpoints are ignored.
        """
        self._brokers.remove(endpoint)

    def set_brokers(self, endpoints: str | Iterable[str]) -> None:
        """Follow a new broker list (discovery): add the new ones, remove the missing ones."""
        if self.closed:
            raise ClientClosed("client is closed")
        self._brokers.set(endpoints)

    def connection_event(self, conn: BrokerConn, event: int, now: float) -> None:
        """Apply one monitor event to ``conn`` (public so tests can feed events)."""
        self._brokers.event(conn, event, now)

    def read_monitors(self, now: float) -> None:
        self._brokers.read_monitors(now)

    def _broker_up(self, conn: BrokerConn, now: float) -> None:
        self._flush(now)
        if self.on_connection_change is not None:
            self.on_connection_change()

    def _broker_down(self, conn: BrokerConn, now: float) -> None:
        # With IMMEDIATE the pipe (and anything still queued in it) is gone, and whatever the
        # broker held for us is unroutable: our next connection gets a new routing id.
        for rid in [rid for rid, held in self._held.items() if held[0] is conn]:
            self._brokers.release(conn, self._held.pop(rid)[1])  # that answer will never come
        lost = [e for e in self.pending.values() if e.conn is conn]
        for entry in lost:
            entry.conn = None
            self._brokers.release(conn, entry.size)
            if entry.flags & FLAG_IDEMPOTENT:
                entry.attempt += 1
                self._send(entry, now)
            else:
                self.pending.pop(entry.rid, None)
                entry._settle(None, WorkerLost("broker connection lost; outcome unknown"))
        if lost:
            log.info("%d request(s) pending on %s re-sent or failed", len(lost), conn.endpoint)
        if self.on_connection_change is not None:
            self.on_connection_change()

    # -- requests -----------------------------------------------------------------------------

    def start(
        self,
        entry: Entry,
        service: str,
        payload: Any,
        timeout: float | None,
        idempotent: bool,
        key: bytes | str | None,
        now: float,
    ) -> BrokerConn | None:
        """Register ``entry`` and send it; returns the connection used (None: it waits)."""
        if self.closed:
            raise ClientClosed("client is closed")
        if type(service) is not str or not service:
            raise ValueError(f"service must be a non-empty string, got {service!r}")
        if key is not None and not isinstance(key, (bytes, str)):
            raise TypeError(f"key must be bytes, str or None, got {type(key).__name__}")
        if timeout is None:
            timeout = self.timeout
        elif not 0 < timeout <= MAX_TIMEOUT:  # also refuses NaN
            raise ValueError(f"timeout must be > 0 and at most {MAX_TIMEOUT:g} seconds, got {timeout!r}")
        flags, frame = encode_payload(payload)
        size = frame.nbytes if type(frame) is memoryview else len(frame)
        limit = self.max_message_size
        if limit is not None and size > limit:
            raise MessageTooLarge(f"request payload is {size} bytes, over the {limit}-byte limit")
        if size > self._brokers.max_inflight_bytes:
            raise MessageTooLarge(f"request payload is {size} bytes, over max_inflight_bytes "
                                  f"({self._brokers.max_inflight_bytes}): no broker would accept it")
        if idempotent:
            flags |= FLAG_IDEMPOTENT
        rid = self._next_rid
        self._next_rid = rid + 1
        entry.rid = rid
        entry.service = service
        entry.flags = flags
        entry.key = key
        entry.payload = frame
        entry.size = size
        entry.timeout = timeout
        deadline = entry.deadline = now + timeout
        self.pending[rid] = entry
        heap = self._deadlines
        if len(heap) > 64 + 2 * len(self.pending):
            self._compact()
            heap = self._deadlines
        heappush(heap, (deadline, rid, entry))
        if not self._brokers.up and self._brokers.conns:
            # The handshake may have completed since anyone last read the monitors.
            self._brokers.read_monitors(now)
        if self._waiting:
            self._waiting.append(entry)  # behind those waiting for room: in order
            return None
        return self._send(entry, now)

    def _send(self, entry: Entry, now: float) -> BrokerConn | None:
        """Send ``entry`` now, or queue it here (no broker up, or none with room)."""
        conn = self._try_send(entry, now)
        if conn is None:
            self._waiting.append(entry)
        return conn

    def _try_send(self, entry: Entry, now: float) -> BrokerConn | None:
        brokers = self._brokers
        size = entry.size
        conn = brokers.pick(size)
        if conn is None:
            return None
        frames = request_frames(entry, now)
        try:
            send_frames(conn.sock, frames, NOBLOCK)
        except zmq.Again:
            conn = self._send_elsewhere(conn, frames, size)
            if conn is None:
                return None
        entry.conn = conn
        brokers.take(conn, size)
        return conn

    def _send_elsewhere(self, refused: BrokerConn, frames: tuple[bytes, bytes, Any], size: int) -> BrokerConn | None:
        """``refused`` did not take ``frames`` (disconnected a moment ago, its event on the way):
        the first other connection with room that does, or None."""
        brokers = self._brokers
        for other in brokers.up:
            if other is refused or not brokers.has_room(other, size):
                continue
            try:
                send_frames(other.sock, frames, NOBLOCK)
            except zmq.Again:
                continue
            return other
        return None

    def cancel(self, entry: Entry) -> None:
        """Forget ``entry`` (its waiter gave up); a reply that still comes is dropped."""
        if not entry._done:
            self._finish(entry, None, None, hold=True)

    def _finish(self, entry: Entry, value: Any, error: BaseException | None, hold: bool = False) -> None:
        """Settle ``entry``. ``hold``: the broker has not answered it yet, so its place in the
        broker's bounds stays taken until it does (or ``_HOLD_GRACE`` after the deadline)."""
        self.pending.pop(entry.rid, None)
        conn = entry.conn
        if conn is not None:
            entry.conn = None
            if hold:
                until = entry.deadline + _HOLD_GRACE
                self._held[entry.rid] = (conn, entry.size, until)
                if until < self._held_next:
                    self._held_next = until
            else:
                self._brokers.release(conn, entry.size)
        entry._settle(value, error)

    def _unhold(self, rid: int) -> bool:
        """The broker answered a request given up on here: free its place. False if unknown."""
        held = self._held.pop(rid, None)
        if held is None:
            return False
        self._brokers.release(held[0], held[1])
        return True

    def _release_held(self, now: float) -> None:
        """Free the places of requests the broker never answered, ``_HOLD_GRACE`` past their
        deadline."""
        soonest = math.inf
        for rid, (conn, size, until) in list(self._held.items()):
            if until <= now:
                del self._held[rid]
                self._brokers.release(conn, size)
            elif until < soonest:
                soonest = until
        self._held_next = soonest

    def handle_reply(self, frames: Sequence[zmq.Frame]) -> None:
        """Settle the entry a reply is for; drop what cannot be matched to a request."""
        try:
            if len(frames) != 3 or frames[0].bytes != SIGNATURE:  # else check_frames passes
                check_frames(frames, 0)
            reply = decode_reply(frames[1])  # the frame itself: no memoryview per reply
        except BadMessage as exc:
            if exc.kind == "field" and exc.rid in self.pending:
                # That request's reply is broken: fail it with the public error type.
                self._finish(self.pending[exc.rid], None, ProtocolError(f"malformed reply: {exc}"))
            elif exc.kind == "field" and self._unhold(exc.rid):
                pass  # a broken answer to a request given up on here: it frees its place all the same
            else:
                log.warning("dropping a message that is not a valid REPLY: %s", exc)
            return
        entry = self.pending.pop(reply.rid, None)
        if entry is None:
            if self._unhold(reply.rid):
                # The broker's answer to a request given up on here: its place is free again.
                log.debug("dropping reply for unknown request id %d (late or duplicate)", reply.rid)
                return
            if reply.rid == 0:
                # The broker could not read some request of ours (docs/protocol.md: rid 0).
                log.warning("the broker refused a request it could not read: %s", reply.message)
            else:
                # Normal after a local timeout, a cancel or a re-send answered twice.
                log.debug("dropping reply for unknown request id %d (late or duplicate)", reply.rid)
            return
        conn = entry.conn
        if conn is not None:
            entry.conn = None
            self._brokers.release(conn, entry.size)
        self._settle_reply(entry, reply, frames)

    def _settle_reply(self, entry: Entry, reply: Reply, frames: Sequence[zmq.Frame]) -> None:
        """Settle ``entry`` (taken out of the pending table) with ``reply``: its value, or the
        error its status or payload means."""
        try:
            if reply.status != STATUS_OK:
                entry._settle(None, error_for_status(reply.status, reply.message, reply.error_type))
                return
            if len(frames) < 3:
                raise ProtocolError("OK reply without a payload frame")
            body = frames[2]
            limit = self.max_message_size
            if limit is not None and len(body) > limit:
                raise MessageTooLarge(f"reply payload is {len(body)} bytes, over the {limit}-byte limit")
            value = decode_payload(reply.flags, body.bytes)
        except ProtocolError as exc:
            entry._settle(None, exc)
            return
        entry._settle(value, None)

    def expire(self, now: float) -> None:
        """Fail every pending request whose deadline is ``now`` or earlier."""
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            entry = heappop(heap)[2]
            if not entry._done:
                msg = f"no reply from {entry.service!r} within {entry.timeout:g} s"
                self._finish(entry, None, RequestTimeout(msg), hold=True)

    def _compact(self) -> None:
        self._deadlines = [(e.deadline, e.rid, e) for e in self.pending.values()]
        heapify(self._deadlines)

    def next_wakeup(self, now: float) -> float | None:
        """When the core next needs attention without any input (a deadline or a retry)."""
        heap = self._deadlines
        while heap and heap[0][2]._done:
            heappop(heap)
        at = heap[0][0] if heap else None
        if self._held and (at is None or self._held_next < at):
            at = self._held_next
        waiting = self._waiting
        if waiting and self._brokers.up and self._brokers.pick(waiting[0].size) is not None:
            retry = now + _RESEND_RETRY  # room but the send was refused: a disconnect is on its way
            if at is None or retry < at:
                at = retry
        return at

    def _flush(self, now: float) -> None:
        """Send what waits here, in order, while a connection has room for the next one."""
        waiting = self._waiting
        while waiting and self._brokers.up:
            entry = waiting[0]
            if entry._done:
                waiting.popleft()
                continue
            if self._try_send(entry, now) is None:
                return
            waiting.popleft()

    # -- input --------------------------------------------------------------------------------

    def on_readable(self, sock: Any, now: float) -> None:
        """Handle everything queued on one socket (a data socket or a monitor)."""
        item = self._brokers.socks.get(sock)
        if item is None:
            return  # closed earlier in this round
        conn, is_monitor = item
        if is_monitor:
            self._brokers.read_monitor(conn, now)
        else:
            self._drain(conn)

    def _drain(self, conn: BrokerConn) -> None:
        # Pure path: EAGAIN costs ~4 us (pyzmq builds an exception, importing inside it), an EVENTS read
        # ~1.5 us: after the first message ask EVENTS (one-at-a-time traffic stops there), and
        # if more is queued, receive until EAGAIN (one exception for a whole pipelined burst).
        sock = conn.sock
        handle = self.handle_reply
        if _NATIVE:
            # Compiled build (where ClientPath.drain normally stands in for this method; the
            # reference runs in tests/native): an empty receive returns None (~0.9 µs, no
            # exception), less than the EVENTS read (pyzmq wraps it in an enum): read until empty.
            while not conn.closed:
                frames = recv_or_none(sock)
                if frames is None:
                    return
                handle(frames)
            return
        try:
            handle(recv_frames(sock, NOBLOCK))
            if conn.closed or not sock.get(_EVENTS) & _POLLIN:
                return
            while not conn.closed:
                handle(recv_frames(sock, NOBLOCK))
        except zmq.Again:  # drained (or woken for input someone else already took)
            return

    def pump(self, now: float) -> None:
        """Handle all input on every socket, then :meth:`tick` (the async reader's round)."""
        for sock, (conn, is_monitor) in list(self._brokers.socks.items()):
            # EVENTS first: cheaper than a failing recv, and it re-arms the edge-triggered fd.
            if not conn.closed and sock.get(_EVENTS) & _POLLIN:
                if is_monitor:
                    self._brokers.read_monitor(conn, now)
                else:
                    self._drain(conn)
        self.tick(now)

    def readable(self) -> bool:
        """Whether any socket has input queued (a send may have consumed its fd's edge)."""
        return any(sock.get(_EVENTS) & _POLLIN for sock in self._brokers.socks)

    def tick(self, now: float) -> None:
        """Time-driven work: expire deadlines, retry waiting requests, close drained brokers."""
        heap = self._deadlines
        if heap and heap[0][0] <= now:
            self.expire(now)
        if self._held and now >= self._held_next:
            self._release_held(now)
        if self._waiting and self._brokers.up:
            self._flush(now)
        self._brokers.retire_idle()

    def close(self) -> None:
        """Fail every pending request with ClientClosed and close every socket."""
        if self.closed:
            return
        self.closed = True
        entries = list(self.pending.values())
        self.pending.clear()
        self._deadlines.clear()
        self._waiting.clear()
        self._held.clear()
        for entry in entries:
            entry.conn = None
            entry._settle(None, ClientClosed("client closed before the reply arrived"))
        self._brokers.close_all()
