"""Multipart send, pure Python: the reference for zrouter/_native/wire.pyx's ``send_frames``.

Like :func:`zrouter.transport.send_frames` (same arguments and exceptions), but a ``bytes`` frame
below pyzmq's copy threshold is sent by copy, as the broker and worker sent their frames before
the two paths existed: pyzmq's zero-copy bookkeeping costs more than copying a few bytes (about
0.4 µs per 4-frame message). Other frames (received zmq.Frame payloads, large bytes, other
buffers) go by reference. Receiving is :func:`zrouter.transport.recv_frames` itself.

On a plain ``zmq.Socket`` the frames go to pyzmq's low-level ``send`` (the Cython class the
socket derives from) with positional arguments: the ``zmq.Socket.send`` wrapper only adds the
DRAFT ``routing_id``/``group`` handling this protocol never uses, and costs ~0.2 µs a frame.
Any other socket class (zmq.asyncio's, a subclass) gets its own ``send``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import zmq
from zmq.backend import Socket as _LowSocket

from zrouter.transport import SNDMORE

__all__ = ["send_frames"]

_COPY_BELOW: Final = 65536  # pyzmq's default copy_threshold
_Frame: Final = zmq.Frame
_Socket: Final = zmq.Socket
# copy=True (the default) sends bytes by copy and a zmq.Frame by reference.
_low_send: Final[Callable[..., Any]] = _LowSocket.send if issubclass(zmq.Socket, _LowSocket) else zmq.Socket.send


def send_frames(sock: zmq.Socket[Any], frames: list[Any] | tuple[Any, ...], flags: int = 0) -> None:
    """Send a multipart message; ``flags`` (e.g. NOBLOCK) applies to every frame."""
    if type(sock) is not _Socket:
        _send_any(sock, frames, flags)
        return
    send = _low_send
    more = SNDMORE | flags
    last = len(frames) - 1
    i = 0
    for frame in frames:
        t = type(frame)
        if t is _Frame or (t is bytes and len(frame) < _COPY_BELOW):
            send(sock, frame, more if i < last else flags)
        else:
            send(sock, frame, more if i < last else flags, False)
        i += 1


def _send_any(sock: zmq.Socket[Any], frames: list[Any] | tuple[Any, ...], flags: int) -> None:
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
