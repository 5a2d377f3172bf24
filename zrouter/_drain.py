"""The broker's socket drain loops, pure Python: the reference for zrouter/_native/drain.pyx.

Each takes up to ``batch`` messages from a ROUTER socket. The common message (a valid REQUEST
from a client, a valid REPLY from a worker: four frames with the envelope, the signature, a
header its decoder accepts, and for a REQUEST a payload within ``max_size``) goes straight to
``request``/``reply`` with the decoded fields, as the compiled twins do; everything else, to
``other(frames, now)`` (the broker's full per-message code, which isolates each message's
failure itself and decodes it again to say what is wrong). Should ``request``/``reply`` raise,
``failed(peer, rid, now)`` is called from the except clause: the message alone fails, as in
``other``. The broker's tests run on both.

The headers are judged by :func:`zrouter.protocol.decode_request` and
:func:`~zrouter.protocol.decode_reply` themselves (one decoder per kind), so this path accepts
exactly what ``other`` would, and refuses nothing itself: a message its decoder refuses goes to
``other``, which refuses it with the same BadMessage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import zmq

from zrouter.protocol import SIGNATURE, BadMessage, decode_reply, decode_request
from zrouter.transport import recv_or_none

__all__ = ["drain_replies", "drain_requests"]

Other = Callable[[list[zmq.Frame], float], None]
Failed = Callable[[bytes, int, float], None]

_SIG: Final = SIGNATURE


def drain_requests(sock: zmq.Socket[Any], batch: int, max_size: int, request: Callable[..., None] | None,
                   other: Other, failed: Failed, now: float) -> bool:
    """Client messages from the front end. ``request(client, rid, service, timeout_ms, attempt,
    flags, key, payload, now)`` is what a valid REQUEST (payload within ``max_size``, ``key``
    bytes or None: a str key is passed as its UTF-8 bytes) leads to; None: every message needs
    ``other``. Returns True when ``batch`` messages were read (more may wait)."""
    if request is None:
        return _to_other(sock, batch, other, now)
    for _ in range(batch):
        frames = recv_or_none(sock)
        if frames is None:
            return False
        if len(frames) == 4 and frames[1].bytes == _SIG and len(frames[3]) <= max_size:
            try:
                rid, service, timeout_ms, attempt, flags, key = decode_request(frames[2])
            except BadMessage:
                other(frames, now)  # says what is wrong, to the client and the counters
                continue
            if type(key) is str:
                key = key.encode()
            client = frames[0].bytes
            try:
                request(client, rid, service, timeout_ms, attempt, flags, key, frames[3], now)
            except Exception:  # a bug met by this one request: it alone fails
                failed(client, rid, now)
        else:
            other(frames, now)
    return True


def drain_replies(sock: zmq.Socket[Any], batch: int, reply: Callable[..., None], other: Other, failed: Failed,
                  now: float) -> bool:
    """Worker messages from the back end. ``reply(worker, rid, status, flags, message,
    error_type, payload, now)`` is what a valid REPLY leads to. Returns True when ``batch``
    messages were read (more may wait)."""
    for _ in range(batch):
        frames = recv_or_none(sock)
        if frames is None:
            return False
        if len(frames) == 4 and frames[1].bytes == _SIG:
            try:
                rid, status, flags, message, error_type = decode_reply(frames[2])
            except BadMessage:
                other(frames, now)  # another command, or a bad REPLY: the full path says which
                continue
            worker = frames[0].bytes
            try:
                reply(worker, rid, status, flags, message, error_type, frames[3], now)
            except Exception:  # a bug met by this one reply: it alone fails
                failed(worker, rid, now)
        else:
            other(frames, now)
    return True


def _to_other(sock: zmq.Socket[Any], batch: int, other: Other, now: float) -> bool:
    """Every message to ``other`` (the broker's Python handlers)."""
    for _ in range(batch):
        frames = recv_or_none(sock)
        if frames is None:
            return False
        other(frames, now)
    return True
