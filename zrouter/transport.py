"""Thin helpers over pyzmq's low-level send/recv, shared by broker, worker and client.

pyzmq's ``send_multipart``/``recv_multipart`` cost about twice the low-level calls with plain
int flags (the ``enum.Flag`` arithmetic and ``get(RCVMORE)`` are measurable per message; see
shared/perf-notes.md), so every hot path uses these.
"""

from __future__ import annotations

from typing import Any, Final

import zmq

__all__ = ["NOBLOCK", "SNDMORE", "free_tcp_endpoint", "recv_frames", "recv_or_none", "send_frames"]

SNDMORE: Final = int(zmq.SNDMORE)
NOBLOCK: Final = int(zmq.NOBLOCK)


def recv_frames(sock: zmq.Socket[Any], flags: int = 0) -> list[zmq.Frame]:
    """One whole multipart message as frames (no copies). Raises zmq.Again under NOBLOCK."""
    recv = sock.recv  # positional arguments: pyzmq parses keywords on every call
    frame = recv(flags, False)
    frames = [frame]
    while frame.more:
        frame = recv(0, False)
        frames.append(frame)
    return frames


def recv_or_none(sock: zmq.Socket[Any]) -> list[zmq.Frame] | None:
    """:func:`recv_frames` under NOBLOCK, None when no message is queued (the compiled twin
    saves the zmq.Again it would build; here it is caught)."""
    try:
        return recv_frames(sock, NOBLOCK)
    except zmq.Again:
        return None


def send_frames(sock: zmq.Socket[Any], frames: list[Any] | tuple[Any, ...], flags: int = 0) -> None:
    """Send a multipart message; ``flags`` (e.g. NOBLOCK) applies to every frame."""
    last = len(frames) - 1
    more = SNDMORE | flags
    for i, frame in enumerate(frames):
        sock.send(frame, more if i < last else flags, copy=False)


def free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    """A tcp:// endpoint on a port that was free a moment ago (for tests, benches, the demo)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"
