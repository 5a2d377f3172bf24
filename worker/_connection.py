"""One broker connection: its DEALER socket, heartbeats, liveness and reconnect backoff.

Only the worker's I/O thread touches a :class:`BrokerConnection`. Life cycle::

    BACKOFF --open()--> ACTIVE --DRAIN sent--> DRAINING --ack and nothing owed--> (removed)
       ^                  |  ^
       +--silent/DISCONNECT  +-- confirmed: the broker sent HEARTBEAT/REQUEST/DRAIN after READY

Every :meth:`BrokerConnection.open` makes a new socket (so a new routing identity at the broker)
and a new ``generation``: replies owed on an older generation are dropped, since the broker
already requeued those requests when it lost the worker.

Capacity shares (:func:`ready_share`, :func:`rebalance`). A worker connected to several brokers
splits its capacity between them, and the brokers together must never have more requests at
the worker than its capacity, at any instant, even while the split changes. What a broker may
have at the worker (:meth:`BrokerConnection.bound`) is the largest of: the share last announced
to it; what it holds there now (``owed``); and, after a share was lowered, the old share (the
``excess``) until that broker must have seen the lower one. The UPDATE travels behind every
message sent before it, so the broker may still send under the old share until it reads the
UPDATE; but each reply sent after the UPDATE is read after it, frees a credit the broker then
cannot reuse beyond the new share, and so lowers the excess by one; and ``settle`` seconds after
the UPDATE (a heartbeat interval, while a broker reads its workers within milliseconds) whatever
it sent before has arrived and is counted in ``owed``. A share is lowered at once, and raised
only into room no broker may still hold: capacity minus every connection's bound minus the
requests of closed connections still running. A new broker's READY announces only that room.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Sequence
from typing import Any, Final

import zmq

from zrouter import limits
from zrouter.curve import EVENT_HANDSHAKE_FAILED, EVENT_HANDSHAKE_SUCCEEDED, ClientKeys, HandshakeWatch, apply_client, parse_event
from zrouter.protocol import MAX_HEADER_SIZE, SIGNATURE, STATUS_REMOTE_ERROR, decode_reply, encode_heartbeat, encode_reply
from zrouter.transport import NOBLOCK
# Compiled when built, else zrouter.transport's.
from zrouter._speedups import send_frames

__all__ = [
    "ACTIVE",
    "BACKOFF",
    "DRAINING",
    "BrokerConnection",
    "backoff_delay",
    "ready_share",
    "rebalance",
    "split_capacity",
]

log = logging.getLogger("zrouter.worker")

BACKOFF: Final = 0  # no socket; (re)connect at ``reconnect_at``
ACTIVE: Final = 1  # socket open, READY sent
DRAINING: Final = 2  # DRAIN sent: waiting for the ack and for the replies still owed

BACKOFF_INITIAL: Final = 0.1
BACKOFF_MAX: Final = 2.0
REFUSED_RETRY: Final = 30.0  # a broker that refused our CURVE key is asked again this much later

_monitor_seq = itertools.count()  # monitor endpoints must be unique in the process

_HEARTBEAT_FRAMES: Final = (SIGNATURE, encode_heartbeat())


def backoff_delay(
    attempt: int,
    initial: float = BACKOFF_INITIAL,
    cap: float = BACKOFF_MAX,
    rng: random.Random | None = None,
) -> float:
    """Exponential backoff with jitter: ``min(cap, initial * 2**attempt)`` scaled by [0.5, 1)."""
    base = min(cap, initial * (2.0 ** min(attempt, 32)))
    return base * (0.5 + 0.5 * (rng or random).random())


def split_capacity(total: int, n: int) -> list[int]:
    """``total`` split into ``n`` shares differing by at most one, larger ones first (may be 0)."""
    if n <= 0:
        return []
    base, extra = divmod(max(total, 0), n)
    return [base + 1 if i < extra else base for i in range(n)]


class BrokerConnection:
    """The state of the link to one broker endpoint (I/O thread only)."""

    __slots__ = (
        "attempt",
        "confirmed",
        "drain_acked",
        "drain_deadline",
        "endpoint",
        "excess",
        "generation",
        "last_recv",
        "last_send",
        "max_message_size",
        "monitor",
        "order",
        "owed",
        "reconnect_at",
        "refused",
        "removed",
        "settle_at",
        "share",
        "sock",
        "state",
        "watch",
    )

    def __init__(self, endpoint: str, order: int, max_message_size: int = limits.MAX_MESSAGE_SIZE) -> None:
        self.endpoint = endpoint
        # Largest payload frame either way (zrouter.limits; the broker's --max-message-size):
        # a larger request frame makes libzmq drop the connection before it is read, and a
        # larger reply is not sent (REMOTE_ERROR "MessageTooLarge" instead).
        self.max_message_size = max_message_size
        self.order = order  # position in the broker list: who gets the larger share
        self.sock: zmq.Socket[Any] | None = None
        self.monitor: zmq.Socket[Any] | None = None  # with CURVE: handshake failures
        self.watch = HandshakeWatch()
        self.refused: str | None = None  # why the broker refused our key on this connection
        self.generation = 0
        self.state = BACKOFF
        self.confirmed = False  # heard from the broker since the last READY
        self.share = 0  # capacity announced to this broker (READY, then UPDATE)
        self.excess = 0  # a lowered share's old value, while the broker may not have seen it
        self.settle_at = 0.0  # when the broker must have seen the lowered share
        self.owed = 0  # requests of this generation not yet answered (running or queued)
        self.last_send = 0.0
        self.last_recv = 0.0
        self.reconnect_at = 0.0  # connect at once the first time
        self.attempt = 0  # reconnects since the broker last confirmed us
        self.drain_acked = False
        self.drain_deadline = math.inf
        self.removed = False  # dropped by set_brokers (or the worker is stopping): no reconnect

    def __repr__(self) -> str:
        return f"<BrokerConnection {self.endpoint} gen={self.generation} state={self.state}>"

    def open(
        self, ctx: zmq.Context[Any], ready: bytes, share: int, now: float, curve: ClientKeys | None = None
    ) -> zmq.Socket[Any]:
        """New socket and generation; READY (announcing ``share``) is queued at once. With
        ``curve`` the socket is a CURVE client and :attr:`monitor` reports its handshakes."""
        sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, limits.socket_max_message_size(self.max_message_size, MAX_HEADER_SIZE))
        self.refused = None
        if curve is not None:
            apply_client(sock, curve)
            self.watch = HandshakeWatch()
            self.monitor = sock.get_monitor_socket(EVENT_HANDSHAKE_FAILED | EVENT_HANDSHAKE_SUCCEEDED,
                                                   f"inproc://zrouter.worker.monitor.{next(_monitor_seq)}")
            self.monitor.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        self.sock = sock
        self.start(share, now)
        self.send((SIGNATURE, ready), now)
        return sock

    def start(self, share: int, now: float) -> None:
        """The bookkeeping of a new connection announcing ``share`` (no socket work)."""
        self.generation += 1
        self.state = ACTIVE
        self.confirmed = False
        self.share = share
        self.excess = 0
        self.owed = 0
        self.drain_acked = False
        self.drain_deadline = math.inf
        self.last_recv = now

    def bound(self) -> int:
        """The most requests this broker may have at the worker, now or later, under what it
        has been told so far (see the module docstring)."""
        share, excess, owed = self.share, self.excess, self.owed
        return share if share >= excess and share >= owed else max(excess, owed)

    def set_share(self, share: int, settle_at: float) -> None:
        """Record ``share`` as announced (the caller sends the UPDATE, or DRAIN for 0). A lower
        share leaves the old one counted as ``excess`` until ``settle_at``, or until as many
        replies have gone out."""
        if share < self.share:
            self.excess = max(self.excess, self.share)
            self.settle_at = settle_at
        self.share = share

    def replied(self) -> None:
        """A REPLY went out on this connection: the broker will free a credit after any UPDATE
        sent before it, so one fewer request can still come beyond the current share."""
        if self.excess:
            self.excess -= 1

    def send(self, frames: list[Any] | tuple[Any, ...], now: float) -> bool:
        """Send without blocking; a message over the high-water mark is dropped (the broker is
        unreachable: liveness will replace the socket)."""
        sock = self.sock
        if sock is None:
            return False
        try:
            send_frames(sock, frames, NOBLOCK)
        except zmq.Again:
            log.debug("broker %s not reading: message dropped", self.endpoint)
            return False
        self.last_send = now
        return True

    def reply(self, header: bytes, payload: Any, now: float) -> None:
        """Send a REPLY ``[SIGNATURE, header, payload]`` like :meth:`send` (small frames are
        copied, large ones passed by reference: cheaper than pyzmq's zero-copy bookkeeping
        below its copy threshold)."""
        sock = self.sock
        if sock is None:
            return
        if len(payload) > self.max_message_size:
            # The broker would drop our connection for it (its ZMQ_MAXMSGSIZE), and everything
            # we hold with it: answer this one request with the reason instead.
            size = len(payload)
            log.warning("reply of %d bytes is over the %d-byte limit: sent as an error", size, self.max_message_size)
            header = encode_reply(decode_reply(header).rid, STATUS_REMOTE_ERROR, 0,
                                  f"the handler's reply is {size} bytes, over the {self.max_message_size}-byte limit",
                                  "MessageTooLarge")
            payload = b""
        try:
            send_frames(sock, (SIGNATURE, header, payload), NOBLOCK)
        except zmq.Again:
            log.debug("broker %s not reading: reply dropped", self.endpoint)
            return
        self.last_send = now
        if self.excess:
            self.excess -= 1

    def heartbeat(self, now: float) -> None:
        if not self.send(_HEARTBEAT_FRAMES, now):
            self.last_send = now  # not sent (HWM): try again next interval, do not spin

    def close(self, linger_ms: int = 0) -> zmq.Socket[Any] | None:
        """Close the socket (if any); returns it so the caller can unregister it first."""
        sock = self.sock
        self.sock = None
        self.confirmed = False
        self.share = 0
        self.excess = 0  # a new connection is a new registration: the broker forgets the old one
        monitor, self.monitor = self.monitor, None
        if sock is not None:
            if monitor is not None:
                sock.disable_monitor()
                monitor.close(0)
            sock.close(linger_ms)
        return sock

    def read_monitor(self) -> str | None:
        """Handle the handshake events queued on :attr:`monitor`; returns (and records in
        :attr:`refused`) the reason when the broker refused this connection's handshake."""
        monitor = self.monitor
        while monitor is not None:
            try:
                msg = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            why = self.watch.feed(*parse_event(msg))
            if why is not None:
                self.refused = why
        return self.refused

    def schedule_retry_refused(self, now: float) -> None:
        """After a refused handshake: no socket until ``REFUSED_RETRY`` seconds from now (libzmq
        does not retry a refused handshake, and asking at once would only be refused again)."""
        self.state = BACKOFF
        self.reconnect_at = now + REFUSED_RETRY

    def schedule_reconnect(self, now: float) -> float:
        self.state = BACKOFF
        delay = backoff_delay(self.attempt)
        self.attempt += 1
        self.reconnect_at = now + delay
        return delay


def ready_share(capacity: int, held: int, conns: Sequence[BrokerConnection]) -> int:
    """The share a new connection may announce in READY: ``capacity`` less what every open
    connection may have at the worker and less the requests of closed connections still held
    (``held`` counts every request the worker holds, running or waiting, of any connection)."""
    open_ = [c for c in conns if c.sock is not None]
    stale = held - sum(c.owed for c in open_)
    return max(0, capacity - stale - sum(c.bound() for c in open_))


def rebalance(
    capacity: int, held: int, conns: Sequence[BrokerConnection], now: float, settle: float
) -> tuple[list[tuple[BrokerConnection, int]], bool]:
    """New shares for the confirmed connections, towards an even split of what the unconfirmed
    ones (their READY share) leave, never letting the brokers together have more than
    ``capacity`` at the worker (see the module docstring; ``held`` as for :func:`ready_share`).

    Returns the UPDATEs to send, in order (decreases first), already recorded on the
    connections, and whether a share is still below its target: then call again when room may
    have appeared (a reply went out, a held request finished, ``settle_at`` passed).
    """
    for c in conns:
        if c.excess and now >= c.settle_at:
            c.excess = 0
    active = sorted((c for c in conns if c.state == ACTIVE), key=lambda c: c.order)
    confirmed = [c for c in active if c.confirmed]
    if not confirmed:
        return [], False
    reserved = sum(c.share for c in active if not c.confirmed)
    targets = split_capacity(capacity - reserved, len(confirmed))
    changes: list[tuple[BrokerConnection, int]] = []
    for c, target in zip(confirmed, targets, strict=True):
        if target < c.share:
            c.set_share(target, now + settle)
            changes.append((c, target))
    open_ = [c for c in conns if c.sock is not None]
    room = capacity - (held - sum(c.owed for c in open_)) - sum(c.bound() for c in open_)
    short = False
    for c, target in zip(confirmed, targets, strict=True):
        if target > c.share:
            bound = c.bound()
            share = min(target, bound + room)  # up to its own bound costs nothing more
            if share > c.share:
                room -= max(0, share - bound)
                c.set_share(share, now + settle)
                changes.append((c, share))
            short = short or share < target
    return changes, short
