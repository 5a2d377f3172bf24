"""Which implementation runs the per-message path: compiled (``zrouter._native``) or pure Python.

Decided once per process, when this module is first imported:

- ``ZROUTER_PURE=1`` in the environment: the pure-Python path, always;
- otherwise the compiled modules when they were built (``pip install`` builds them, see
  setup.py) and import cleanly; otherwise the pure-Python path, and :func:`why_pure` says why.

Everything that has two implementations is taken from here, so no caller decides for itself and
a process never mixes the two. The pure-Python functions in :mod:`zrouter.protocol` are the
reference: the compiled ones return the same result on every input (tests/fuzz compares them).

    from zrouter import _speedups
    _speedups.native()          # True when the compiled path runs
    _speedups.decode_request    # zrouter._native.codec.decode_request or protocol.decode_request
    _speedups.recv_frames       # zrouter._native.wire.recv_frames or transport.recv_frames
    _speedups.send_frames       # zrouter._native.wire.send_frames or zrouter._wire.send_frames

The broker's policy containers (``IndexedSet``, ``MinBuckets``), its records (``Request``,
``ClientLoad``) and its per-request routing (``Route``) have their reference in zrouter.broker,
which this package may not import: those modules ask :func:`native` and take the compiled twin
from ``load_native("sets")`` / ``load_native("route")`` themselves.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any, Final

import zmq

from zrouter import _drain, _wire, protocol, transport

__all__ = [
    "PURE_ENV",
    "decode_reply",
    "decode_request",
    "decode_worker_message",
    "drain_replies",
    "drain_requests",
    "encode_reply",
    "encode_request",
    "implementation",
    "load_native",
    "native",
    "recv_frames",
    "recv_or_none",
    "send_frames",
    "why_pure",
]

log = logging.getLogger("zrouter")

PURE_ENV: Final = "ZROUTER_PURE"
_MODULES: Final = ("codec", "wire", "drain", "sets", "route", "client")


def load_native(name: str) -> ModuleType:
    """Import the compiled module ``zrouter._native.NAME`` whatever ZROUTER_PURE says (tests
    compare the two paths with it). Raises ImportError when it was not built or cannot load."""
    if name not in _MODULES:
        raise ImportError(f"no compiled module {name!r}")
    return importlib.import_module(f"zrouter._native.{name}")


def _decide() -> tuple[dict[str, ModuleType], str]:
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return {}, f"{PURE_ENV}={os.environ[PURE_ENV]} in the environment"
    loaded: dict[str, ModuleType] = {}
    for name in _MODULES:
        try:
            loaded[name] = load_native(name)
        except Exception as exc:  # not built, or built against something else: never fatal
            log.debug("compiled zrouter._native.%s unavailable (%s): using pure Python", name, exc)
            return {}, f"zrouter._native.{name} did not import: {exc}"
    return loaded, ""


_LOADED, _WHY_PURE = _decide()


def native() -> bool:
    """True when this process runs the compiled per-message path."""
    return bool(_LOADED)


def implementation() -> str:
    """``"native"`` or ``"pure"`` (for logs, metrics and the bench table)."""
    return "native" if _LOADED else "pure"


def why_pure() -> str:
    """Why the pure-Python path runs ("" when it does not)."""
    return _WHY_PURE


# The functions with two implementations, typed as the reference's.
decode_request: Callable[[protocol.Buffer], protocol.Request]
decode_reply: Callable[[protocol.Buffer], protocol.Reply]
decode_worker_message: Callable[[protocol.Buffer], protocol.WorkerMessage]
encode_request: Callable[..., bytes]
encode_reply: Callable[..., bytes]
recv_frames: Callable[..., list[zmq.Frame]]
recv_or_none: Callable[[zmq.Socket[Any]], list[zmq.Frame] | None]
send_frames: Callable[..., None]
drain_requests: Callable[..., bool]
drain_replies: Callable[..., bool]

if _LOADED:
    _codec, _cwire = _LOADED["codec"], _LOADED["wire"]
    decode_request = _codec.decode_request
    decode_reply = _codec.decode_reply
    decode_worker_message = _codec.decode_worker_message
    encode_request = _codec.encode_request
    encode_reply = _codec.encode_reply
    recv_frames = _cwire.recv_frames
    recv_or_none = _cwire.recv_or_none
    send_frames = _cwire.send_frames
    drain_requests = _LOADED["drain"].drain_requests
    drain_replies = _LOADED["drain"].drain_replies
else:
    decode_request = protocol.decode_request
    decode_reply = protocol.decode_reply
    decode_worker_message = protocol.decode_worker_message
    encode_request = protocol.encode_request
    encode_reply = protocol.encode_reply
    recv_frames = transport.recv_frames
    recv_or_none = transport.recv_or_none
    send_frames = _wire.send_frames
    drain_requests = _drain.drain_requests
    drain_replies = _drain.drain_replies
