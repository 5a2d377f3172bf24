"""The decoders in-process under random input: whatever the bytes, each decoder returns a record
whose every field is within docs/protocol.md's limits, or raises BadMessage; nothing else escapes.

Two generators: arbitrary bytes (mostly not msgpack), and msgpack of random header-shaped arrays
built from every msgpack type at and past each limit (closer to what a buggy or hostile peer
sends). ``derandomize`` fixes the seed so `make test` sees the same inputs every run; `make fuzz`
raises the count (ZROUTER_FUZZ_EXAMPLES) and lets the seed vary.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zrouter import protocol as p

EXAMPLES = int(os.environ.get("ZROUTER_FUZZ_EXAMPLES", "200"))
FIXED = os.environ.get("ZROUTER_FUZZ_RANDOM") != "1"
fuzz = settings(max_examples=EXAMPLES, derandomize=FIXED, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

COMMANDS = [p.REQUEST, p.REPLY, p.READY, p.HEARTBEAT, p.DRAIN, p.DISCONNECT, p.UPDATE, 0, 0x7F, 2**64 - 1]
edge_ints = st.sampled_from([0, 1, -1, 2**31 - 1, 2**32, 2**63, 2**64 - 1, -(2**63), p.MAX_TIMEOUT_MS,
                             p.MAX_TIMEOUT_MS + 1, p.MAX_CAPACITY + 1, p.MAX_ATTEMPT + 1, 10, 60_000, 60_001])
scalars = st.one_of(
    st.none(), st.booleans(), edge_ints, st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=300), st.binary(max_size=300),
    st.sampled_from(["", "echo", "heartbeat_ms", "instance", "9" * 400, "é" * 200]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.one_of(st.text(max_size=70), st.sampled_from(["heartbeat_ms"])),
                                                 inner, max_size=20)), max_leaves=30)
headers = st.builds(lambda cmd, rest: [cmd, *rest], st.sampled_from(COMMANDS), st.lists(values, max_size=9))

DECODERS: list[Callable[[Any], Any]] = [
    p.decode_request, p.decode_reply, p.decode_ready, p.decode_worker_message, p.decode_broker_message,
]


def _text(value: Any, limit: int) -> bool:
    return value is None or (type(value) is str and len(value.encode()) <= limit)


def _within_limits(msg: Any) -> None:
    """Every field of a record a decoder returned is within the page's limits."""
    if type(msg) is p.Request:
        assert type(msg.rid) is int and 1 <= msg.rid <= p.MAX_RID
        assert type(msg.service) is str and 1 <= len(msg.service.encode()) <= p.MAX_SERVICE_LEN
        assert type(msg.timeout_ms) is int and 1 <= msg.timeout_ms <= p.MAX_TIMEOUT_MS
        assert type(msg.attempt) is int and 0 <= msg.attempt <= p.MAX_ATTEMPT
        assert type(msg.flags) is int and 0 <= msg.flags <= p.MAX_FLAGS
        assert msg.key is None or (type(msg.key) is bytes and len(msg.key) <= p.MAX_KEY_LEN) or _text(msg.key, p.MAX_KEY_LEN)
    elif type(msg) is p.Reply:
        assert type(msg.rid) is int and 0 <= msg.rid <= p.MAX_RID
        assert type(msg.status) is int and 0 <= msg.status <= p.MAX_STATUS
        assert _text(msg.message, p.MAX_TEXT_LEN) and _text(msg.error_type, p.MAX_TEXT_LEN)
    elif type(msg) is p.Ready:
        assert type(msg.service) is str and 1 <= len(msg.service.encode()) <= p.MAX_SERVICE_LEN
        assert type(msg.capacity) is int and 0 <= msg.capacity <= p.MAX_CAPACITY
        assert type(msg.weight) is int and 0 <= msg.weight <= p.MAX_WEIGHT
        assert len(msg.meta) <= p.MAX_META_ENTRIES
        assert all(type(k) is str and type(v) is str for k, v in msg.meta.items())
        assert msg.heartbeat_ms is None or p.HEARTBEAT_MS_MIN <= msg.heartbeat_ms <= p.HEARTBEAT_MS_MAX
    elif type(msg) is p.Update:
        assert type(msg.capacity) is int and 0 <= msg.capacity <= p.MAX_CAPACITY
        assert type(msg.weight) is int and 0 <= msg.weight <= p.MAX_WEIGHT
    elif type(msg) is p.Disconnect:
        assert _text(msg.reason, p.MAX_TEXT_LEN)
    else:
        assert type(msg) in (p.Heartbeat, p.Drain), type(msg)


def _check_all(frame: bytes) -> int:
    accepted = 0
    for decode in DECODERS:
        try:
            msg = decode(frame)
        except p.BadMessage as exc:
            assert exc.kind in {"header_size", "not_msgpack", "not_array", "unknown_command", "wrong_command", "field"}
            assert type(exc.rid) is int and 0 <= exc.rid <= p.MAX_RID
            assert len(str(exc)) < 200  # never quotes what the peer sent
        else:
            _within_limits(msg)
            accepted += 1
    return accepted


@fuzz
@given(st.binary(max_size=600))
def test_random_bytes_never_escape_as_anything_but_bad_message(frame: bytes) -> None:
    _check_all(frame)


@fuzz
@given(headers)
def test_random_headers_decode_within_limits_or_are_refused(header: list[Any]) -> None:
    try:
        frame = msgpack.packb(header, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return  # not encodable as msgpack at all (an int past 64 bits): no peer can send it
    _check_all(frame)


@fuzz
@given(st.integers(1, p.MAX_RID), st.text(min_size=1, max_size=60).filter(lambda s: len(s.encode()) <= p.MAX_SERVICE_LEN),
       st.integers(1, p.MAX_TIMEOUT_MS), st.integers(0, p.MAX_ATTEMPT), st.integers(0, p.MAX_FLAGS),
       st.one_of(st.none(), st.binary(max_size=p.MAX_KEY_LEN)))
def test_every_valid_request_round_trips(rid: int, service: str, timeout_ms: int, attempt: int, flags: int,
                                         key: bytes | None) -> None:
    frame = p.encode_request(rid, service, timeout_ms, attempt, flags, key)
    assert p.decode_request(frame) == p.Request(rid, service, timeout_ms, attempt, flags, key)
