"""One request as the client core tracks it (:class:`Entry`, which the front ends subclass
with how they wake a waiter), and the frames it goes out as (:func:`request_frames`)."""

from __future__ import annotations

from typing import Any

from zrouter.client._brokers import BrokerConn
from zrouter.protocol import MAX_TIMEOUT_MS, SIGNATURE
# The per-request encoder: compiled when built, else zrouter.protocol's.
from zrouter._speedups import encode_request

__all__ = ["Entry", "request_frames"]


class Entry:
    """One request, from submission to its single outcome (the front ends subclass it)."""

    __slots__ = (
        "_done",
        "_error",
        "_value",
        "attempt",
        "conn",
        "deadline",
        "flags",
        "key",
        "payload",
        "rid",
        "service",
        "size",
        "timeout",
    )

    rid: int
    service: str
    flags: int
    key: bytes | str | None
    payload: Any
    timeout: float
    deadline: float

    def __init__(self) -> None:
        self.attempt = 0
        self.size = 0  # payload bytes
        self.conn: BrokerConn | None = None
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None

    def _settle(self, value: Any, error: BaseException | None) -> None:
        """Record the outcome; called exactly once, by the core. Subclasses also wake a waiter."""
        self._done = True
        self._value = value
        self._error = error
        self.payload = None  # the frame was only kept for a re-send


def request_frames(entry: Entry, now: float) -> tuple[bytes, bytes, Any]:
    """The frames of ``entry``'s REQUEST, telling the broker the time that remains."""
    # Round up (a request with 0.4 ms left must not become timeout_ms=0, invalid on the wire),
    # but not a whole-millisecond timeout that float arithmetic put a hair above its value.
    ms = int((entry.deadline - now) * 1000.0 + 0.999)
    ms = 1 if ms < 1 else MAX_TIMEOUT_MS if ms > MAX_TIMEOUT_MS else ms  # a day's float error: still valid
    header = encode_request(entry.rid, entry.service, ms, entry.attempt, entry.flags, entry.key)
    return (SIGNATURE, header, entry.payload)
