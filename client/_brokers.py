"""The broker connections of one client: sockets, up/down state, load, and picking one.

Part of the client's non-waiting base (split from ``_base.py``, which owns the requests): a
:class:`BrokerSet` knows nothing about requests beyond a per-connection pending count; it tells
its owner when a connection comes up or drops, and the owner decides what happens to requests.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any, Final

import zmq

from zrouter import limits
from zrouter.protocol import MAX_HEADER_SIZE
from zrouter.curve import EVENT_HANDSHAKE_FAILED, ClientKeys, HandshakeWatch, apply_client, parse_event

__all__ = [
    "DEFAULT_HEARTBEAT",
    "EVENT_UP",
    "EVENT_DOWN",
    "BrokerConn",
    "BrokerSet",
    "SocketFactory",
    "normalize_brokers",
    "open_broker_sockets",
]

log = logging.getLogger("zrouter.client")

DEFAULT_HEARTBEAT: Final = 1.0  # seconds between ZMTP pings; a silent broker is dropped after 3

EVENT_UP: Final = int(zmq.EVENT_HANDSHAKE_SUCCEEDED)
EVENT_DOWN: Final = int(zmq.EVENT_DISCONNECTED) | int(zmq.EVENT_MONITOR_STOPPED)
# A refused handshake (CURVE key, mechanism mismatch): requests must fail, not wait for it.
EVENT_REFUSED: Final = EVENT_HANDSHAKE_FAILED

# Monitor endpoints must be unique per process: pyzmq's default name reuses the socket's fd,
# which a just-closed socket may still hold in the reaper when a new broker is added.
_monitor_seq = itertools.count()

SocketFactory = Callable[[str], tuple[Any, Any]]


def open_broker_sockets(
    ctx: zmq.Context[Any],
    endpoint: str,
    heartbeat: float | None,
    curve: ClientKeys | None = None,
    max_message_size: int | None = limits.MAX_MESSAGE_SIZE,
) -> tuple[Any, Any]:
    """A DEALER connected to ``endpoint`` (a CURVE client with ``curve``) and the PAIR socket
    receiving its monitor events.

    ``max_message_size`` (bytes, None: no limit) sets ZMQ_MAXMSGSIZE, never below the shared
    default (zrouter.limits.MAX_MESSAGE_SIZE): a frame larger than that from a broker makes
    libzmq drop the connection before it is in memory, while a reply between a lower
    ``max_message_size`` and the default still fails only its own request (MessageTooLarge).
    """
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            apply_client(sock, curve)
        if max_message_size is not None:
            max_message_size = max(max_message_size, limits.MAX_MESSAGE_SIZE)
        sock.setsockopt(zmq.MAXMSGSIZE, limits.socket_max_message_size(max_message_size, MAX_HEADER_SIZE))
        # Without IMMEDIATE a DEALER queues messages for a peer that is not connected yet, so
        # a request could sit unseen in a dead broker's pipe instead of going to a live one.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        # Every message this socket receives answers a request we made, so the queue is bounded
        # by our own in-flight count; a full queue would make the broker drop replies. Sends
        # fail only when no broker is connected (IMMEDIATE), never because of a high-water mark.
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if heartbeat:
            # ZMTP pings detect a broker that vanished without closing TCP (host down, cable).
            ivl = max(1, int(heartbeat * 1000))
            sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ivl)
        addr = f"inproc://zrouter.client.monitor.{next(_monitor_seq)}"
        monitor = sock.get_monitor_socket(EVENT_UP | EVENT_DOWN | EVENT_REFUSED, addr)
    except BaseException:
        sock.close(0)
        raise
    try:
        monitor.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)  # after the monitor, so the handshake event cannot be missed
    except BaseException:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        raise
    return sock, monitor


def normalize_brokers(broker: str | Iterable[str]) -> list[str]:
    """One endpoint or several, deduplicated in order."""
    endpoints = [broker] if isinstance(broker, str) else list(broker)
    for ep in endpoints:
        if not isinstance(ep, str) or not ep:
            raise TypeError(f"broker endpoints must be non-empty strings, got {ep!r}")
    return list(dict.fromkeys(endpoints))


class BrokerConn:
    """One broker endpoint: its DEALER, the monitor that tells when it is up, and its load."""

    __slots__ = ("closed", "endpoint", "monitor", "pending", "pending_bytes", "refused", "refused_at", "removed",
                 "sock", "up", "watch")

    def __init__(self, endpoint: str, sock: Any, monitor: Any) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.monitor = monitor
        self.up = False  # set by the monitor's handshake event, cleared by its disconnect event
        self.refused: str | None = None  # why the broker refused the last handshake (until one succeeds)
        self.refused_at = 0.0
        self.watch = HandshakeWatch()
        # Requests sent on this connection that the broker may still hold (not answered yet,
        # or given up on here but not yet answered there), and the sum of their payload sizes.
        self.pending = 0
        self.pending_bytes = 0
        self.removed = False  # removed: no new requests, closed once pending drains
        self.closed = False

    def __repr__(self) -> str:
        state = "up" if self.up else "down"
        return f"<BrokerConn {self.endpoint} {state} pending={self.pending}>"


ConnHook = Callable[[BrokerConn, float], None]


class BrokerSet:
    """Connections by endpoint; ``up`` lists the active connected ones, where requests go.

    A connection takes a request only while it has room within the broker's per-client bounds
    (``max_inflight`` requests, ``max_inflight_bytes`` of payload: zrouter.limits, the
    broker's --max-client-requests and --max-client-bytes), so the broker never has to refuse
    one of ours as overloaded.
    """

    def __init__(
        self,
        connect: SocketFactory,
        on_up: ConnHook,
        on_down: ConnHook,
        watch: Callable[[Any], None] | None = None,
        unwatch: Callable[[Any], None] | None = None,
        max_inflight: int = limits.MAX_CLIENT_REQUESTS,
        max_inflight_bytes: int = limits.MAX_CLIENT_BYTES,
    ) -> None:
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes
        self._connect = connect
        self._on_up = on_up
        self._on_down = on_down
        self._watch = watch
        self._unwatch = unwatch
        self.conns: dict[str, BrokerConn] = {}  # active, by endpoint
        self.draining: list[BrokerConn] = []  # removed, closed when their last request settles
        self.socks: dict[Any, tuple[BrokerConn, bool]] = {}  # socket -> (conn, is_monitor)
        self.up: list[BrokerConn] = []
        self._rr = 0
        self._retire: list[BrokerConn] = []

    def add(self, endpoint: str) -> None:
        """Connect to one more broker (no-op if already there; revives one being removed)."""
        if endpoint in self.conns:
            return
        for conn in self.draining:
            if conn.endpoint == endpoint:
                self.draining.remove(conn)
                conn.removed = False
                self.conns[endpoint] = conn
                self._rebuild_up()
                return
        sock, monitor = self._connect(endpoint)
        conn = BrokerConn(endpoint, sock, monitor)
        self.conns[endpoint] = conn
        self.socks[sock] = (conn, False)
        self.socks[monitor] = (conn, True)
        if self._watch is not None:
            self._watch(sock)
            self._watch(monitor)
        if endpoint.startswith("inproc://"):
            # inproc has no handshake, so its monitor stays silent: count it up from the start
            # (a send before the peer binds fails with EAGAIN and the request waits and retries).
            conn.up = True
            self._rebuild_up()
        log.debug("connecting to broker %s", endpoint)

    def remove(self, endpoint: str) -> None:
        """Send nothing new to ``endpoint``; close it once its pending requests settle."""
        conn = self.conns.pop(endpoint, None)
        if conn is None:
            return  # unknown: discovery may apply removals blindly
        conn.removed = True
        self._rebuild_up()
        if conn.pending:
            self.draining.append(conn)
        else:
            self._close(conn)

    def set(self, endpoints: str | Iterable[str]) -> None:
        """Follow a new broker list: add the new ones, remove the missing ones."""
        wanted = normalize_brokers(endpoints)
        for endpoint in [ep for ep in self.conns if ep not in wanted]:
            self.remove(endpoint)
        for endpoint in wanted:
            self.add(endpoint)

    def _rebuild_up(self) -> None:
        self.up = [c for c in self.conns.values() if c.up]

    def pick(self, size: int = 0) -> BrokerConn | None:
        """The connected broker with the fewest pending requests (ties: round-robin) among
        those with room for one more request of ``size`` payload bytes; None if none has."""
        up = self.up
        n = len(up)
        if n == 1:
            conn = up[0]
            return conn if self.has_room(conn, size) else None
        if n == 0:
            return None
        start = self._rr = (self._rr + 1) % n  # a rotating start makes ties go round-robin
        best: BrokerConn | None = None
        for i in range(n):
            conn = up[(start + i) % n]
            if (best is None or conn.pending < best.pending) and self.has_room(conn, size):
                best = conn
        return best

    def has_room(self, conn: BrokerConn, size: int) -> bool:
        return conn.pending < self.max_inflight and conn.pending_bytes + size <= self.max_inflight_bytes

    def take(self, conn: BrokerConn, size: int) -> None:
        """A request of ``size`` payload bytes was sent on ``conn``."""
        conn.pending += 1
        conn.pending_bytes += size

    def release(self, conn: BrokerConn, size: int = 0) -> None:
        """A request sent on ``conn`` settled (or moved elsewhere)."""
        conn.pending -= 1
        conn.pending_bytes -= size
        if conn.removed and not conn.pending:
            self._retire.append(conn)  # closed by retire_idle(), never mid-read

    def retire_idle(self) -> None:
        """Close removed connections whose last request settled."""
        if not self._retire:
            return
        retire, self._retire = self._retire, []
        for conn in retire:
            if conn.removed and not conn.pending:
                if conn in self.draining:
                    self.draining.remove(conn)
                self._close(conn)

    def event(self, conn: BrokerConn, event: int, now: float, value: int = 0) -> None:
        """Apply one monitor event to ``conn``'s state and tell the owner about changes."""
        if conn.closed:
            return
        why = conn.watch.feed(event, value)
        if why is not None:
            if conn.refused is None:
                log.error("broker %s refused this client: %s", conn.endpoint, why)
            conn.refused = why
            conn.refused_at = now
            self._on_down(conn, now)  # the owner fails what waits for a broker if none is left
            return
        if event & EVENT_UP:
            conn.refused = None
            if not conn.up:
                conn.up = True
                log.info("broker %s connected", conn.endpoint)
                self._rebuild_up()
                self._on_up(conn, now)
        elif event & EVENT_DOWN:
            if conn.up:
                conn.up = False
                log.warning("broker %s connection lost", conn.endpoint)
                self._rebuild_up()
            self._on_down(conn, now)  # even if never seen up: requests may have gone out on it

    def read_monitor(self, conn: BrokerConn, now: float) -> None:
        while not conn.closed:
            try:
                msg = conn.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(msg) == 2 and len(msg[0]) == 6:
                # First frame: uint16 event id, int32 value, native byte order.
                event, value = parse_event(msg)
                self.event(conn, event, now, value)

    def read_monitors(self, now: float) -> None:
        for conn in [*self.conns.values(), *self.draining]:
            self.read_monitor(conn, now)

    def _close(self, conn: BrokerConn) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.up = False
        for sock in (conn.sock, conn.monitor):
            self.socks.pop(sock, None)
            if self._unwatch is not None:
                self._unwatch(sock)
        try:
            conn.sock.disable_monitor()
        except zmq.ZMQError:  # already stopped: nothing to undo
            pass
        conn.monitor.close(0)
        conn.sock.close(0)
        log.debug("closed connection to broker %s", conn.endpoint)

    def close_all(self) -> None:
        for conn in [*self.conns.values(), *self.draining]:
            self._close(conn)
        self.conns.clear()
        self.draining.clear()
        self._retire.clear()
        self.up = []
