"""Multipart send, pure Python: the reference for zrouter/_native/wire.pyx's ``send_frames``.

Like :func:`zrouter.transport.send_frames` (same arguments and exceptions), but a ``bytes`` frame
below pyzmq's copy threshold is sent by copy, as the broker and worker sent their frames before
the two paths existed: pyzmq's zero-copy bookkeeping costs more than copying a few bytes (about
0.4 µs per 4-frame message). Other frames (received zmq.Frame payloads, large bytes, other
buffers) go by reference. Receiving is :func:`zrouter.transport.recv_frames` itself.
"""

from __future__ import annotations

from typing import Any, Final

import zmq

from zrouter.transport import SNDMORE

__all__ = ["send_frames"]

_COPY_BELOW: Final = 65536  # pyzmq's default copy_threshold


def send_frames(sock: zmq.Socket[Any], frames: list[Any] | tuple[Any, ...], flags: int = 0) -> None:
    """Send a multipart message; ``flags`` (e.g. NOBLOCK) applies to every frame."""
    send = sock.send
    more = SNDMORE | flags
    for frame in frames[:-1]:
        if type(frame) is bytes and len(frame) < _COPY_BELOW:
            send(frame, more)
        else:
            send(frame, more, copy=False)
    frame = frames[-1]
    if type(frame) is bytes and len(frame) < _COPY_BELOW:
        send(frame, flags)
    else:
        send(frame, flags, copy=False)
