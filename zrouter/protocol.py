"""The zrouter wire protocol, defined once (docs/protocol.md is its prose twin).

Every message is a ZeroMQ multipart message whose frames are, after any ROUTER envelope:

    frame 0   SIGNATURE        b"ZRT1": dialect and version, checked first
    frame 1   header           a msgpack array whose first element is the command
    frame 2   payload          REQUEST and REPLY only: opaque bytes (raw or msgpack, see flags)

Headers are positional msgpack arrays (cheap to encode and to decode in every language).
Receivers ignore elements past the ones listed here, so later versions may append fields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, NamedTuple

import msgpack

from zrouter.errors import (
    Forbidden,
    MessageTooLarge,
    Overloaded,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    ServiceUnavailable,
    WorkerLost,
    ZRouterError,
)

__all__ = [
    "DISCONNECT",
    "DRAIN",
    "FLAG_IDEMPOTENT",
    "FLAG_MSGPACK",
    "HEARTBEAT",
    "READY",
    "REPLY",
    "REQUEST",
    "SIGNATURE",
    "STATUS_BAD_REQUEST",
    "STATUS_FORBIDDEN",
    "STATUS_NAMES",
    "STATUS_OK",
    "STATUS_OVERLOADED",
    "STATUS_REMOTE_ERROR",
    "STATUS_TIMEOUT",
    "STATUS_TOO_LARGE",
    "STATUS_UNAVAILABLE",
    "STATUS_WORKER_LOST",
    "UPDATE",
    "Ready",
    "Reply",
    "Request",
    "decode_header",
    "decode_payload",
    "encode_disconnect",
    "encode_drain",
    "encode_heartbeat",
    "encode_payload",
    "encode_ready",
    "encode_reply",
    "encode_request",
    "encode_update",
    "error_for_status",
    "parse_ready",
    "parse_reply",
    "parse_request",
]

# Dialect + version in one frame, so a peer speaking anything else is refused before decoding.
SIGNATURE: Final = b"ZRT1"

# Commands: header[0].
REQUEST: Final = 0x01  # client -> broker, broker -> worker
REPLY: Final = 0x02  # worker -> broker, broker -> client
READY: Final = 0x10  # worker -> broker: [READY, service, capacity, weight, meta]
HEARTBEAT: Final = 0x11  # both ways between worker and broker: [HEARTBEAT]
DRAIN: Final = 0x12  # worker -> broker "send me nothing new"; broker -> worker: the acknowledgement
DISCONNECT: Final = 0x13  # worker -> broker "bye"; broker -> worker "I do not know you, READY again"
UPDATE: Final = 0x14  # worker -> broker: [UPDATE, capacity, weight]

# Request and reply flags: a bit field.
FLAG_IDEMPOTENT: Final = 0x01  # safe to run again on another worker if the first one is lost
FLAG_MSGPACK: Final = 0x02  # the payload frame is msgpack; without it, raw bytes

# Reply status: header[2] of a REPLY.
STATUS_OK: Final = 0
STATUS_REMOTE_ERROR: Final = 1  # handler raised: header carries message and exception type
STATUS_TIMEOUT: Final = 2  # deadline passed before any worker could take the request
STATUS_UNAVAILABLE: Final = 3  # no worker for the service after the broker's grace period
STATUS_OVERLOADED: Final = 4  # service queue full
STATUS_WORKER_LOST: Final = 5  # holder vanished; non-idempotent or out of attempts: outcome unknown
STATUS_BAD_REQUEST: Final = 6  # malformed frames or header
STATUS_TOO_LARGE: Final = 7  # payload over the broker's limit
STATUS_FORBIDDEN: Final = 8  # the client's CURVE key may not call this service

STATUS_NAMES: Final = {
    STATUS_OK: "ok",
    STATUS_REMOTE_ERROR: "remote-error",
    STATUS_TIMEOUT: "timeout",
    STATUS_UNAVAILABLE: "unavailable",
    STATUS_OVERLOADED: "overloaded",
    STATUS_WORKER_LOST: "worker-lost",
    STATUS_BAD_REQUEST: "bad-request",
    STATUS_TOO_LARGE: "too-large",
    STATUS_FORBIDDEN: "forbidden",
}

_packb: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack
_unpackb: Callable[..., Any] = msgpack.unpackb


class Request(NamedTuple):
    """A REQUEST header: [REQUEST, rid, service, timeout_ms, attempt, flags, key]."""

    rid: int
    service: str
    timeout_ms: int
    attempt: int
    flags: int
    key: bytes | str | None


class Reply(NamedTuple):
    """A REPLY header: [REPLY, rid, status, flags, message, error_type]."""

    rid: int
    status: int
    flags: int
    message: str | None
    error_type: str | None


class Ready(NamedTuple):
    """A READY header: [READY, service, capacity, weight, meta]."""

    service: str
    capacity: int
    weight: int
    meta: dict[str, str]


def encode_request(
    rid: int,
    service: str,
    timeout_ms: int,
    attempt: int = 0,
    flags: int = FLAG_IDEMPOTENT,
    key: bytes | str | None = None,
) -> bytes:
    return _packb((REQUEST, rid, service, timeout_ms, attempt, flags, key))


def encode_reply(
    rid: int,
    status: int = STATUS_OK,
    flags: int = 0,
    message: str | None = None,
    error_type: str | None = None,
) -> bytes:
    return _packb((REPLY, rid, status, flags, message, error_type))


def encode_ready(service: str, capacity: int, weight: int = 1, meta: dict[str, str] | None = None) -> bytes:
    return _packb((READY, service, capacity, weight, meta or {}))


def encode_update(capacity: int, weight: int) -> bytes:
    return _packb((UPDATE, capacity, weight))


def encode_disconnect(reason: str | None = None) -> bytes:
    return _packb((DISCONNECT, reason))


_HEARTBEAT: Final = _packb((HEARTBEAT,))
_DRAIN: Final = _packb((DRAIN,))


def encode_heartbeat() -> bytes:
    return _HEARTBEAT


def encode_drain() -> bytes:
    return _DRAIN


def decode_header(frame: bytes | memoryview) -> list[Any]:
    """Decode a header frame into its array; anything else is a :class:`ProtocolError`."""
    try:
        header = _unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not msgpack: {exc}") from None
    if type(header) is not list or not header or type(header[0]) is not int:
        raise ProtocolError("header must be a non-empty msgpack array starting with a command")
    return header


def _need(header: list[Any], n: int, what: str) -> None:
    if len(header) < n:
        raise ProtocolError(f"{what} header needs {n} elements, got {len(header)}")


def parse_request(header: list[Any]) -> Request:
    """Validate a decoded REQUEST header (the broker's hot path indexes the list directly)."""
    _need(header, 7, "REQUEST")
    rid, service, timeout_ms, attempt, flags, key = header[1:7]
    if type(rid) is not int or rid < 0:
        raise ProtocolError("request id must be an unsigned integer")
    if type(service) is not str or not service:
        raise ProtocolError("service must be a non-empty string")
    if type(timeout_ms) is not int or timeout_ms <= 0:
        raise ProtocolError("timeout_ms must be a positive integer")
    if type(attempt) is not int or attempt < 0 or type(flags) is not int:
        raise ProtocolError("attempt and flags must be unsigned integers")
    if key is not None and not isinstance(key, (bytes, str)):
        raise ProtocolError("key must be bytes, a string or nil")
    return Request(rid, service, timeout_ms, attempt, flags, key)


def parse_reply(header: list[Any]) -> Reply:
    _need(header, 6, "REPLY")
    rid, status, flags, message, error_type = header[1:6]
    if type(rid) is not int or type(status) is not int or type(flags) is not int:
        raise ProtocolError("reply id, status and flags must be integers")
    return Reply(rid, status, flags, message, error_type)


def parse_ready(header: list[Any]) -> Ready:
    _need(header, 5, "READY")
    service, capacity, weight, meta = header[1:5]
    if type(service) is not str or not service:
        raise ProtocolError("READY service must be a non-empty string")
    if type(capacity) is not int or capacity < 0:
        raise ProtocolError("READY capacity must be an integer >= 0")
    if type(weight) is not int or weight < 0:
        raise ProtocolError("READY weight must be an integer >= 0")
    if not isinstance(meta, dict):
        raise ProtocolError("READY meta must be a map")
    return Ready(service, capacity, weight, {str(k): str(v) for k, v in meta.items()})


def encode_payload(obj: Any) -> tuple[int, Any]:
    """(flags, frame) for a payload: bytes-like objects go raw (no copy), the rest as msgpack."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return 0, obj
    return FLAG_MSGPACK, _packb(obj)


def decode_payload(flags: int, frame: bytes | memoryview) -> Any:
    if flags & FLAG_MSGPACK:
        try:
            return _unpackb(frame, raw=False, strict_map_key=False)
        except Exception as exc:
            raise ProtocolError(f"payload flagged msgpack does not decode: {exc}") from None
    return frame if type(frame) is bytes else bytes(frame)


_ERROR_BY_STATUS: Final[dict[int, type[ZRouterError]]] = {
    STATUS_TIMEOUT: RequestTimeout,
    STATUS_UNAVAILABLE: ServiceUnavailable,
    STATUS_OVERLOADED: Overloaded,
    STATUS_WORKER_LOST: WorkerLost,
    STATUS_BAD_REQUEST: ProtocolError,
    STATUS_TOO_LARGE: MessageTooLarge,
    STATUS_FORBIDDEN: Forbidden,
}


def error_for_status(status: int, message: str | None, error_type: str | None = None) -> ZRouterError:
    """The exception a client raises for a reply whose status is not OK."""
    text = message or STATUS_NAMES.get(status, "error")
    if status == STATUS_REMOTE_ERROR:
        return RemoteError(error_type or "Exception", text)
    cls = _ERROR_BY_STATUS.get(status)
    if cls is None:
        return ProtocolError(f"unknown reply status {status}: {text}")
    return cls(text)
