"""The broker's socket drain loops, pure Python: the reference for zrouter/_native/drain.pyx.

Each takes up to ``batch`` messages from a ROUTER socket and hands each, as its list of frames,
to ``other(frames, now)`` (the broker's full per-message code, which isolates each message's
failure itself). The compiled twins take the same arguments and route the common message (a
valid REQUEST from a client, a valid REPLY from a worker) straight to ``request``/``reply``
with the fields decoded in C, and everything else to ``other`` exactly as here; should
``request``/``reply`` raise, they call ``failed(peer, rid, now)`` from the except clause (the
message alone fails, as in ``other``). The broker's tests run on both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zmq

from zrouter.transport import NOBLOCK, recv_frames

__all__ = ["drain_replies", "drain_requests"]

Other = Callable[[list[zmq.Frame], float], None]
Failed = Callable[[bytes, int, float], None]


def drain_requests(sock: zmq.Socket[Any], batch: int, max_size: int, request: Callable[..., None] | None,
                   other: Other, failed: Failed, now: float) -> bool:
    """Client messages from the front end. ``request(client, rid, service, timeout_ms, attempt,
    flags, key, payload, now)`` is what a valid REQUEST (payload within ``max_size``, ``key``
    bytes or None) leads to; None: every message needs ``other`` (the compiled twin then sends
    them all there too). Returns True when ``batch`` messages were read (more may wait)."""
    return _to_other(sock, batch, other, now)


def drain_replies(sock: zmq.Socket[Any], batch: int, reply: Callable[..., None], other: Other, failed: Failed,
                  now: float) -> bool:
    """Worker messages from the back end. ``reply(worker, rid, status, flags, message,
    error_type, payload, now)`` is what a valid REPLY leads to. Returns True when ``batch``
    messages were read (more may wait)."""
    return _to_other(sock, batch, other, now)


def _to_other(sock: zmq.Socket[Any], batch: int, other: Other, now: float) -> bool:
    """The pure path's one loop: every message to ``other`` (the broker's Python handlers)."""
    for _ in range(batch):
        try:
            frames = recv_frames(sock, NOBLOCK)
        except zmq.Again:
            return False
        other(frames, now)
    return True
