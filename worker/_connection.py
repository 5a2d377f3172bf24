"""One broker connection: its DEALER socket, heartbeats, liveness and reconnect backoff.

Only the worker's I/O thread touches a :class:`BrokerConnection`. Life cycle::

    BACKOFF --open()--> ACTIVE --DRAIN sent--> DRAINING --ack and nothing owed--> (removed)
       ^                  |  ^
       +--silent/DISCONNECT  +-- confirmed: the broker sent HEARTBEAT/REQUEST/DRAIN after READY

Every :meth:`BrokerConnection.open` makes a new socket (so a new routing identity at the broker)
and a new ``generation``: replies owed on an older generation are dropped, since the broker
already requeued those requests when it lost the worker.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any, Final

import zmq

from zrouter import limits
from zrouter.protocol import MAX_HEADER_SIZE, SIGNATURE, STATUS_REMOTE_ERROR, decode_reply, encode_heartbeat, encode_reply
from zrouter.transport import NOBLOCK, SNDMORE, send_frames

__all__ = [
    "ACTIVE",
    "BACKOFF",
    "DRAINING",
    "BrokerConnection",
    "backoff_delay",
    "split_capacity",
]

log = logging.getLogger("zrouter.worker")

BACKOFF: Final = 0  # no socket; (re)connect at ``reconnect_at``
ACTIVE: Final = 1  # socket open, READY sent
DRAINING: Final = 2  # DRAIN sent: waiting for the ack and for the replies still owed

BACKOFF_INITIAL: Final = 0.1
BACKOFF_MAX: Final = 2.0

_HEARTBEAT_FRAMES: Final = (SIGNATURE, encode_heartbeat())
_MORE: Final = SNDMORE | NOBLOCK
_COPY_BELOW: Final = 65536  # pyzmq's default copy_threshold


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
        "generation",
        "last_recv",
        "last_send",
        "max_message_size",
        "order",
        "owed",
        "reconnect_at",
        "removed",
        "share",
        "sock",
        "state",
    )

    def __init__(self, endpoint: str, order: int, max_message_size: int = limits.MAX_MESSAGE_SIZE) -> None:
        self.endpoint = endpoint
        # Largest payload frame either way (zrouter.limits; the broker's --max-message-size):
        # a larger request frame makes libzmq drop the connection before it is read, and a
        # larger reply is not sent (REMOTE_ERROR "MessageTooLarge" instead).
        self.max_message_size = max_message_size
        self.order = order  # position in the broker list: who gets the larger share
        self.sock: zmq.Socket[Any] | None = None
        self.generation = 0
        self.state = BACKOFF
        self.confirmed = False  # heard from the broker since the last READY
        self.share = 0  # capacity announced to this broker (READY, then UPDATE)
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

    def open(self, ctx: zmq.Context[Any], ready: bytes, share: int, now: float) -> zmq.Socket[Any]:
        """New socket and generation; READY (announcing ``share``) is queued at once."""
        sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, limits.socket_max_message_size(self.max_message_size, MAX_HEADER_SIZE))
        sock.connect(self.endpoint)
        self.sock = sock
        self.generation += 1
        self.state = ACTIVE
        self.confirmed = False
        self.share = share
        self.owed = 0
        self.drain_acked = False
        self.drain_deadline = math.inf
        self.last_recv = now
        self.send((SIGNATURE, ready), now)
        return sock

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
        """Send a REPLY ``[SIGNATURE, header, payload]`` like :meth:`send`, small frames by copy
        (cheaper than pyzmq's zero-copy bookkeeping below its copy threshold)."""
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
            sock.send(SIGNATURE, _MORE)
        except zmq.Again:
            log.debug("broker %s not reading: reply dropped", self.endpoint)
            return
        sock.send(header, _MORE)  # the first frame is in: the rest of the message is too
        sock.send(payload, NOBLOCK, copy=len(payload) < _COPY_BELOW)
        self.last_send = now

    def heartbeat(self, now: float) -> None:
        if not self.send(_HEARTBEAT_FRAMES, now):
            self.last_send = now  # not sent (HWM): try again next interval, do not spin

    def close(self, linger_ms: int = 0) -> zmq.Socket[Any] | None:
        """Close the socket (if any); returns it so the caller can unregister it first."""
        sock = self.sock
        self.sock = None
        self.confirmed = False
        self.share = 0
        if sock is not None:
            sock.close(linger_ms)
        return sock

    def schedule_reconnect(self, now: float) -> float:
        self.state = BACKOFF
        delay = backoff_delay(self.attempt)
        self.attempt += 1
        self.reconnect_at = now + delay
        return delay
