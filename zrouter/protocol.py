"""The zrouter wire protocol, defined once (docs/protocol.md is its prose twin).

Every message is a ZeroMQ multipart message whose frames are, after any ROUTER envelope:

    frame 0   SIGNATURE        b"ZRT1": dialect and version, checked first
    frame 1   header           a msgpack array whose first element is the command
    frame 2   payload          REQUEST and REPLY only: opaque bytes (raw or msgpack, see flags)

Headers are positional msgpack arrays (cheap to encode and to decode in every language).
Receivers ignore elements past the ones listed here, so later versions may append fields.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, TypeAlias

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
    "BadMessage",
    "BrokerMessage",
    "Buffer",
    "DISCONNECT",
    "DRAIN",
    "DRAIN_MSG",
    "Disconnect",
    "Drain",
    "FLAG_IDEMPOTENT",
    "FLAG_MSGPACK",
    "HEARTBEAT",
    "HEARTBEAT_MSG",
    "HEARTBEAT_MS_MAX",
    "HEARTBEAT_MS_MIN",
    "Heartbeat",
    "MAX_ATTEMPT",
    "MAX_CAPACITY",
    "MAX_FLAGS",
    "MAX_HEADER_SIZE",
    "MAX_KEY_LEN",
    "MAX_META_ENTRIES",
    "MAX_META_KEY_LEN",
    "MAX_META_VALUE_LEN",
    "MAX_RID",
    "MAX_SERVICE_LEN",
    "MAX_STATUS",
    "MAX_TEXT_LEN",
    "MAX_TIMEOUT_MS",
    "MAX_WEIGHT",
    "READY",
    "REPLY",
    "REQUEST",
    "Ready",
    "Reply",
    "Request",
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
    "UnknownCommand",
    "Update",
    "WORKER_STATUSES",
    "WorkerMessage",
    "check_disconnect",
    "check_frames",
    "check_payload_count",
    "check_ready",
    "check_reply",
    "check_request",
    "check_update",
    "clip_text",
    "decode_broker_message",
    "decode_header",
    "decode_payload",
    "decode_ready",
    "decode_reply",
    "decode_request",
    "decode_worker_message",
    "encode_disconnect",
    "encode_drain",
    "encode_heartbeat",
    "encode_payload",
    "encode_ready",
    "encode_reply",
    "encode_request",
    "encode_update",
    "error_for_status",
    "has_payload",
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

# bytes, memoryview or zmq.Frame: anything msgpack can read through the buffer protocol.
Buffer: TypeAlias = Any

# -- limits: every field a peer sends is checked against these before anything else reads it --
# One cap for every header frame, checked on its length before msgpack sees it: with it, no
# header can cost more than a few kB to decode, and nesting (which msgpack-python bounds at
# 1,024 levels on its own) cannot go deep enough to matter.
MAX_HEADER_SIZE: Final = 8192  # bytes
MAX_RID: Final = 2**64 - 1  # rid 0 is reserved: the broker's "some request of yours was malformed"
MAX_SERVICE_LEN: Final = 255  # bytes of UTF-8, like a DNS name
MAX_KEY_LEN: Final = 255  # bytes (bin) or bytes of UTF-8 (str)
MAX_TIMEOUT_MS: Final = 86_400_000  # one day: longer is a job queue's business, not an RPC's
MAX_ATTEMPT: Final = 255
MAX_FLAGS: Final = 2**32 - 1  # unknown bits are ignored and passed on
MAX_STATUS: Final = 255
MAX_TEXT_LEN: Final = 1024  # bytes of UTF-8: REPLY message and error_type, DISCONNECT reason
MAX_CAPACITY: Final = 1_000_000  # the wire's ceiling; a broker may set a lower one (--max-capacity)
MAX_WEIGHT: Final = 1_000_000
MAX_META_ENTRIES: Final = 16
MAX_META_KEY_LEN: Final = 64
MAX_META_VALUE_LEN: Final = 256
HEARTBEAT_MS_MIN: Final = 10  # a worker's declared interval (READY meta "heartbeat_ms")
HEARTBEAT_MS_MAX: Final = 60_000


_packb: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack
_new_tuple: Callable[..., Any] = tuple.__new__
_unpackb: Callable[..., Any] = msgpack.unpackb


class BadMessage(ProtocolError):
    """A message that breaks this protocol, as a decoder found it.

    ``kind`` is a short stable label (for counters and logs): ``signature``, ``frames``,
    ``header_size``, ``not_msgpack``, ``not_array``, ``unknown_command``, ``wrong_command`` or
    ``field``. ``rid`` is the message's request id when one could be read (so the sender can be
    answered about that request), else 0. The text never quotes what the peer sent: it says
    which rule was broken, in this protocol's words.
    """

    def __init__(self, kind: str, text: str, rid: int = 0) -> None:
        super().__init__(text)
        self.kind = kind
        self.rid = rid


class UnknownCommand(BadMessage):
    """A well-formed header whose command this version does not know (``command`` says which).
    Receivers ignore these (docs/protocol.md): later versions may add commands."""

    def __init__(self, command: int) -> None:
        super().__init__("unknown_command", f"unknown command {command}")
        self.command = command


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
    """A READY header: [READY, service, capacity, weight, meta]; ``heartbeat_ms`` is
    ``meta["heartbeat_ms"]`` checked and parsed (None when the worker did not say)."""

    service: str
    capacity: int
    weight: int
    meta: dict[str, str]
    heartbeat_ms: int | None = None


class Update(NamedTuple):
    """An UPDATE header: [UPDATE, capacity, weight]."""

    capacity: int
    weight: int


class Disconnect(NamedTuple):
    """A DISCONNECT header: [DISCONNECT, reason]."""

    reason: str | None


class Heartbeat(NamedTuple):
    """A HEARTBEAT header: [HEARTBEAT]."""


class Drain(NamedTuple):
    """A DRAIN header: [DRAIN]."""


HEARTBEAT_MSG: Final = Heartbeat()
DRAIN_MSG: Final = Drain()

WorkerMessage = Reply | Ready | Heartbeat | Drain | Disconnect | Update
"""What a worker may send a broker."""
BrokerMessage = Request | Heartbeat | Drain | Disconnect
"""What a broker may send a worker."""

# Statuses a worker may put in a REPLY; the others are the broker's to give.
WORKER_STATUSES: Final = frozenset({STATUS_OK, STATUS_REMOTE_ERROR, STATUS_TIMEOUT, STATUS_BAD_REQUEST})


# -- encoders ---------------------------------------------------------------------------------


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
    """A REPLY header. ``message`` and ``error_type`` are cut to MAX_TEXT_LEN so that what we
    send always passes the receiver's decoder."""
    if message is None and error_type is None:  # every OK reply: nothing to cut
        return _packb((REPLY, rid, status, flags, None, None))
    return _packb((REPLY, rid, status, flags, clip_text(message), clip_text(error_type)))


def encode_ready(service: str, capacity: int, weight: int = 1, meta: dict[str, str] | None = None) -> bytes:
    return _packb((READY, service, capacity, weight, meta or {}))


def encode_update(capacity: int, weight: int) -> bytes:
    return _packb((UPDATE, capacity, weight))


def encode_disconnect(reason: str | None = None) -> bytes:
    return _packb((DISCONNECT, clip_text(reason)))


_HEARTBEAT: Final = _packb((HEARTBEAT,))
_DRAIN: Final = _packb((DRAIN,))


def encode_heartbeat() -> bytes:
    return _HEARTBEAT


def encode_drain() -> bytes:
    return _DRAIN


def clip_text(text: str | None, limit: int = MAX_TEXT_LEN) -> str | None:
    """``text`` cut to at most ``limit`` bytes of UTF-8 (on a character boundary)."""
    if text is None or (len(text) <= limit // 4) or len(text.encode()) <= limit:
        return text
    return text.encode()[: limit - 3].decode(errors="ignore") + "..."


# -- decoders: one per message kind, each checks every field's type and range ---------------


_OVERSIZE: Final = object()
_UNREADABLE: Final = object()


def _unpack(frame: Buffer) -> Any:
    """The frame's msgpack value, or _OVERSIZE / _UNREADABLE (decoded once, judged by the caller).

    msgpack's own bounds apply while decoding: the header cap already implies them, but they
    stop a hostile length prefix before any allocation."""
    if len(frame) > MAX_HEADER_SIZE:
        return _OVERSIZE
    try:
        return _unpackb(frame, max_str_len=MAX_HEADER_SIZE, max_bin_len=MAX_HEADER_SIZE, max_array_len=64,
                        max_map_len=MAX_META_ENTRIES * 2, max_ext_len=0)
    except Exception:  # msgpack raises several unrelated types; none may escape as themselves
        return _UNREADABLE


def _as_header(value: Any) -> list[Any]:
    if value is _OVERSIZE:
        raise BadMessage("header_size", f"header frame is over {MAX_HEADER_SIZE} bytes")
    if value is _UNREADABLE:
        raise BadMessage("not_msgpack", "header frame is not one msgpack value within the limits")
    if type(value) is not list or not value or type(value[0]) is not int:
        raise BadMessage("not_array", "header must be a msgpack array whose first element is the command")
    return value


def decode_header(frame: Buffer) -> list[Any]:
    """A header frame's array, size- and shape-checked; fields are not (use the decoders below).

    Raises :class:`BadMessage` (kinds ``header_size``, ``not_msgpack``, ``not_array``).
    """
    return _as_header(_unpack(frame))


def _rid_of(header: list[Any]) -> int:
    """The header's request id if it is a valid one (to address an answer), else 0."""
    rid = header[1] if len(header) > 1 else None
    return rid if type(rid) is int and 0 < rid <= MAX_RID else 0


def _field(what: str, rule: str, header: list[Any] | None = None) -> BadMessage:
    return BadMessage("field", f"{what} {rule}", _rid_of(header) if header is not None else 0)


def _uint(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _text_ok(value: Any, limit: int, empty: bool = True) -> bool:
    """A str of at most ``limit`` bytes of UTF-8 (non-empty unless ``empty``)."""
    if type(value) is not str or (not value and not empty):
        return False
    return len(value) <= limit if value.isascii() else len(value.encode()) <= limit


def _expect(header: list[Any], command: int, n: int, name: str) -> None:
    if header[0] != command:
        if header[0] not in _KNOWN:  # told apart, so that the receiver can ignore it
            raise UnknownCommand(header[0])
        raise BadMessage("wrong_command", f"expected {name}, got command {header[0]}", _rid_of(header))
    if len(header) < n:
        raise BadMessage("field", f"{name} header needs {n} elements, got {len(header)}", _rid_of(header))


def _service_ok(service: Any) -> bool:
    return _text_ok(service, MAX_SERVICE_LEN, empty=False)


def check_request(header: list[Any]) -> Request:
    """A decoded REQUEST header's fields, checked (see docs/protocol.md for each rule)."""
    _expect(header, REQUEST, 7, "REQUEST")
    rid, service, timeout_ms, attempt, flags, key = header[1:7]
    if not _uint(rid, 1, MAX_RID):
        raise _field("REQUEST rid", f"must be an integer in 1..{MAX_RID}")
    if not _service_ok(service):
        raise _field("REQUEST service", f"must be a non-empty str of at most {MAX_SERVICE_LEN} bytes", header)
    if not _uint(timeout_ms, 1, MAX_TIMEOUT_MS):
        raise _field("REQUEST timeout_ms", f"must be an integer in 1..{MAX_TIMEOUT_MS}", header)
    if not _uint(attempt, 0, MAX_ATTEMPT):
        raise _field("REQUEST attempt", f"must be an integer in 0..{MAX_ATTEMPT}", header)
    if not _uint(flags, 0, MAX_FLAGS):
        raise _field("REQUEST flags", f"must be an integer in 0..{MAX_FLAGS}", header)
    if key is not None:
        if type(key) is bytes:
            if len(key) > MAX_KEY_LEN:
                raise _field("REQUEST key", f"must be at most {MAX_KEY_LEN} bytes", header)
        elif not _text_ok(key, MAX_KEY_LEN):
            raise _field("REQUEST key", f"must be nil, bin or str of at most {MAX_KEY_LEN} bytes", header)
    return Request(rid, service, timeout_ms, attempt, flags, key)


def decode_request(frame: Buffer) -> Request:
    """A REQUEST header frame, decoded and checked. Raises :class:`BadMessage` (with ``rid`` set
    when the rid was readable, so the sender can be told which request was refused).

    The broker calls this once per request, so the common case (ASCII service, bin or nil key)
    is checked inline in one pass; anything else takes the field-by-field path, which accepts
    the same inputs and names the rule an input breaks.
    """
    h = _unpack(frame)
    if type(h) is list and len(h) >= 7 and type(h[0]) is int and h[0] == REQUEST:  # True == 1.0 == 1
        req = h[1:7]
        rid, service, timeout_ms, attempt, flags, key = req
        if (type(rid) is int and 0 < rid <= MAX_RID
                and type(service) is str and 0 < len(service) <= MAX_SERVICE_LEN and service.isascii()
                and type(timeout_ms) is int and 0 < timeout_ms <= MAX_TIMEOUT_MS
                and type(attempt) is int and 0 <= attempt <= MAX_ATTEMPT
                and type(flags) is int and 0 <= flags <= MAX_FLAGS
                and (key is None or (type(key) is bytes and len(key) <= MAX_KEY_LEN))):
            fast: Request = _new_tuple(Request, req)  # NamedTuple's own __new__ costs more
            return fast
    return check_request(_as_header(h))  # the same value judged field by field: never decoded twice


def check_reply(header: list[Any]) -> Reply:
    _expect(header, REPLY, 6, "REPLY")
    rid, status, flags, message, error_type = header[1:6]
    if not _uint(rid, 0, MAX_RID):
        raise _field("REPLY rid", f"must be an integer in 0..{MAX_RID}")
    if not _uint(status, 0, MAX_STATUS):
        raise _field("REPLY status", f"must be an integer in 0..{MAX_STATUS}", header)
    if not _uint(flags, 0, MAX_FLAGS):
        raise _field("REPLY flags", f"must be an integer in 0..{MAX_FLAGS}", header)
    if message is not None and not _text_ok(message, MAX_TEXT_LEN):
        raise _field("REPLY message", f"must be nil or a str of at most {MAX_TEXT_LEN} bytes", header)
    if error_type is not None and not _text_ok(error_type, MAX_TEXT_LEN):
        raise _field("REPLY error_type", f"must be nil or a str of at most {MAX_TEXT_LEN} bytes", header)
    return Reply(rid, status, flags, message, error_type)


def decode_reply(frame: Buffer) -> Reply:
    """A REPLY header frame, decoded and checked. Raises :class:`BadMessage`.

    Clients and the broker call this once per reply, so the common case (no message, no
    error type) is checked inline in one pass; anything else takes the field-by-field path,
    which accepts the same inputs and names the rule an input breaks.
    """
    h = _unpack(frame)
    if type(h) is list and len(h) >= 6 and type(h[0]) is int and h[0] == REPLY:
        rep = h[1:6]
        rid, status, flags, message, error_type = rep
        if (type(rid) is int and 0 <= rid <= MAX_RID
                and type(status) is int and 0 <= status <= MAX_STATUS
                and type(flags) is int and 0 <= flags <= MAX_FLAGS
                and message is None and error_type is None):
            fast: Reply = _new_tuple(Reply, rep)
            return fast
    return check_reply(_as_header(h))


def _capacity_weight(what: str, capacity: Any, weight: Any) -> None:
    if not _uint(capacity, 0, MAX_CAPACITY):
        raise _field(f"{what} capacity", f"must be an integer in 0..{MAX_CAPACITY}")
    if not _uint(weight, 0, MAX_WEIGHT):
        raise _field(f"{what} weight", f"must be an integer in 0..{MAX_WEIGHT}")


def check_ready(header: list[Any]) -> Ready:
    _expect(header, READY, 5, "READY")
    service, capacity, weight, meta = header[1:5]
    if not _service_ok(service):
        raise _field("READY service", f"must be a non-empty str of at most {MAX_SERVICE_LEN} bytes")
    _capacity_weight("READY", capacity, weight)
    if meta is None:
        meta = {}
    elif type(meta) is not dict:
        raise _field("READY meta", "must be a map or nil")
    if len(meta) > MAX_META_ENTRIES:
        raise _field("READY meta", f"may have at most {MAX_META_ENTRIES} entries")
    clean: dict[str, str] = {}
    for k, v in meta.items():
        if not _text_ok(k, MAX_META_KEY_LEN, empty=False):
            raise _field("READY meta keys", f"must be non-empty str of at most {MAX_META_KEY_LEN} bytes")
        if type(v) is int and -(2**63) <= v < 2**64:
            v = str(v)
        elif not _text_ok(v, MAX_META_VALUE_LEN):
            raise _field("READY meta values", f"must be str of at most {MAX_META_VALUE_LEN} bytes, or integers")
        clean[k] = v
    heartbeat_ms = None
    hb = clean.get("heartbeat_ms")
    if hb is not None:
        if not (hb.isascii() and hb.isdigit() and len(hb) <= 6) or not HEARTBEAT_MS_MIN <= int(hb) <= HEARTBEAT_MS_MAX:
            raise _field("READY meta heartbeat_ms", f"must be an integer in {HEARTBEAT_MS_MIN}..{HEARTBEAT_MS_MAX}")
        heartbeat_ms = int(hb)
    return Ready(service, capacity, weight, clean, heartbeat_ms)


def decode_ready(frame: Buffer) -> Ready:
    """A READY header frame, decoded and checked. Raises :class:`BadMessage`."""
    return check_ready(decode_header(frame))


def check_update(header: list[Any]) -> Update:
    _expect(header, UPDATE, 3, "UPDATE")
    _capacity_weight("UPDATE", header[1], header[2])
    return Update(header[1], header[2])


def check_disconnect(header: list[Any]) -> Disconnect:
    _expect(header, DISCONNECT, 2, "DISCONNECT")
    reason = header[1]
    if reason is not None and not _text_ok(reason, MAX_TEXT_LEN):
        raise _field("DISCONNECT reason", f"must be nil or a str of at most {MAX_TEXT_LEN} bytes")
    return Disconnect(reason)


def _check_heartbeat(header: list[Any]) -> Heartbeat:
    return HEARTBEAT_MSG


def _check_drain(header: list[Any]) -> Drain:
    return DRAIN_MSG


_FROM_WORKER: Final[dict[int, Callable[[list[Any]], Any]]] = {
    REPLY: check_reply,
    READY: check_ready,
    HEARTBEAT: _check_heartbeat,
    DRAIN: _check_drain,
    DISCONNECT: check_disconnect,
    UPDATE: check_update,
}
_FROM_BROKER: Final[dict[int, Callable[[list[Any]], Any]]] = {
    REQUEST: check_request,
    HEARTBEAT: _check_heartbeat,
    DRAIN: _check_drain,
    DISCONNECT: check_disconnect,
}
_KNOWN: Final = frozenset({REQUEST, REPLY, READY, HEARTBEAT, DRAIN, DISCONNECT, UPDATE})


def _dispatch(frame: Buffer, table: dict[int, Callable[[list[Any]], Any]], side: str) -> Any:
    header = decode_header(frame)
    check = table.get(header[0])
    if check is None:
        if header[0] in _KNOWN:
            raise BadMessage("wrong_command", f"command {header[0]} is not sent by a {side}", _rid_of(header))
        raise UnknownCommand(header[0])
    return check(header)


def decode_worker_message(frame: Buffer) -> WorkerMessage:
    """The header frame of a worker → broker message as its typed record (Reply, Ready,
    Heartbeat, Drain, Disconnect or Update). Raises :class:`UnknownCommand` for a command this
    version does not know, :class:`BadMessage` for anything else wrong."""
    msg: WorkerMessage = _dispatch(frame, _FROM_WORKER, "worker")
    return msg


def decode_broker_message(frame: Buffer) -> BrokerMessage:
    """The header frame of a broker → worker message as its typed record (Request, Heartbeat,
    Drain or Disconnect). Raises :class:`UnknownCommand` / :class:`BadMessage` as above."""
    msg: BrokerMessage = _dispatch(frame, _FROM_BROKER, "broker")
    return msg


def has_payload(msg: object) -> bool:
    """REQUEST and REPLY carry exactly one payload frame after the header; nothing else does."""
    return type(msg) is Request or type(msg) is Reply


def check_frames(frames: Sequence[Any], start: int) -> None:
    """The frames after a ROUTER envelope (``start`` 1) or of a DEALER (``start`` 0): the
    signature, a header, and at most one payload frame. Raises :class:`BadMessage`."""
    n = len(frames) - start
    if n < 2 or n > 3:
        raise BadMessage("frames", "a message is [signature, header] or [signature, header, payload]")
    sig = frames[start]
    if len(sig) != 4 or bytes(sig) != SIGNATURE:
        raise BadMessage("signature", "the first frame must be the signature ZRT1")


def check_payload_count(msg: object, frames: Sequence[Any], start: int) -> None:
    """A decoded message has its payload frame exactly when its kind needs one."""
    want = 3 if has_payload(msg) else 2
    if len(frames) - start != want:
        rid = msg.rid if type(msg) is Request or type(msg) is Reply else 0
        name = type(msg).__name__.upper()
        raise BadMessage("frames", f"{name} needs {want - 2} payload frame(s), got {len(frames) - start - 2}",
                         rid if rid and rid <= MAX_RID else 0)


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
