"""The wire codec: round trips, refusals of malformed headers, payload encoding, status mapping."""

from __future__ import annotations

import msgpack
import pytest

from zrouter import errors
from zrouter import protocol as p


def test_request_round_trip() -> None:
    header = p.decode_header(p.encode_request(7, "echo", 1500, 2, p.FLAG_IDEMPOTENT | p.FLAG_MSGPACK, b"k"))
    assert header[0] == p.REQUEST
    assert p.parse_request(header) == p.Request(7, "echo", 1500, 2, 3, b"k")


def test_reply_round_trip() -> None:
    header = p.decode_header(p.encode_reply(9, p.STATUS_REMOTE_ERROR, 0, "boom", "ValueError"))
    assert p.parse_reply(header) == p.Reply(9, p.STATUS_REMOTE_ERROR, 0, "boom", "ValueError")


def test_ready_round_trip_and_meta_as_strings() -> None:
    header = p.decode_header(p.encode_ready("svc", 4, 3, {"instance": "a-1", "pid": "12"}))
    assert p.parse_ready(header) == p.Ready("svc", 4, 3, {"instance": "a-1", "pid": "12"})


def test_control_commands_are_one_element_arrays() -> None:
    assert p.decode_header(p.encode_heartbeat()) == [p.HEARTBEAT]
    assert p.decode_header(p.encode_drain()) == [p.DRAIN]
    assert p.decode_header(p.encode_disconnect("bye")) == [p.DISCONNECT, "bye"]
    assert p.decode_header(p.encode_update(2, 5)) == [p.UPDATE, 2, 5]


def test_extra_trailing_fields_are_ignored_for_forward_compatibility() -> None:
    header = msgpack.packb([p.REQUEST, 1, "echo", 100, 0, 1, None, "future-field"])
    assert p.parse_request(p.decode_header(header)).service == "echo"


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc1",  # never-used msgpack byte
        msgpack.packb({"not": "an array"}),
        msgpack.packb([]),
        msgpack.packb(["1", 2]),
    ],
)
def test_decode_header_refuses_garbage(raw: bytes) -> None:
    with pytest.raises(errors.ProtocolError):
        p.decode_header(raw)


@pytest.mark.parametrize(
    "header",
    [
        [p.REQUEST, 1, "echo", 100],  # too short
        [p.REQUEST, -1, "echo", 100, 0, 1, None],
        [p.REQUEST, 1, "", 100, 0, 1, None],
        [p.REQUEST, 1, "echo", 0, 0, 1, None],
        [p.REQUEST, 1, "echo", 100, "0", 1, None],
        [p.REQUEST, 1, "echo", 100, 0, 1, 3.5],
    ],
)
def test_parse_request_refuses_bad_fields(header: list[object]) -> None:
    with pytest.raises(errors.ProtocolError):
        p.parse_request(header)


@pytest.mark.parametrize(
    "header",
    [[p.READY, "svc", -1, 1, {}], [p.READY, "", 1, 1, {}], [p.READY, "svc", 1, 1, []], [p.READY, "svc"]],
)
def test_parse_ready_refuses_bad_fields(header: list[object]) -> None:
    with pytest.raises(errors.ProtocolError):
        p.parse_ready(header)


@pytest.mark.parametrize("value", [b"raw", bytearray(b"raw")])
def test_bytes_payloads_travel_raw(value: bytes) -> None:
    flags, frame = p.encode_payload(value)
    assert flags == 0 and frame is value
    assert p.decode_payload(flags, frame) == b"raw"


@pytest.mark.parametrize("value", [None, 1, "text", [1, 2], {"a": [1, {"b": b"x"}]}, 2.5])
def test_other_payloads_travel_as_msgpack(value: object) -> None:
    flags, frame = p.encode_payload(value)
    assert flags == p.FLAG_MSGPACK
    assert p.decode_payload(flags, frame) == value


def test_payload_flagged_msgpack_that_is_not_is_a_protocol_error() -> None:
    with pytest.raises(errors.ProtocolError):
        p.decode_payload(p.FLAG_MSGPACK, b"\xc1")


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (p.STATUS_TIMEOUT, errors.RequestTimeout),
        (p.STATUS_UNAVAILABLE, errors.ServiceUnavailable),
        (p.STATUS_OVERLOADED, errors.Overloaded),
        (p.STATUS_WORKER_LOST, errors.WorkerLost),
        (p.STATUS_BAD_REQUEST, errors.ProtocolError),
        (p.STATUS_TOO_LARGE, errors.MessageTooLarge),
        (p.STATUS_REMOTE_ERROR, errors.RemoteError),
        (99, errors.ProtocolError),
    ],
)
def test_every_status_maps_to_one_exception(status: int, cls: type[Exception]) -> None:
    exc = p.error_for_status(status, "why", "KeyError")
    assert type(exc) is cls
    assert isinstance(exc, errors.ZRouterError)


def test_remote_error_keeps_type_and_message() -> None:
    exc = p.error_for_status(p.STATUS_REMOTE_ERROR, "boom", "ValueError")
    assert isinstance(exc, errors.RemoteError)
    assert (exc.type, exc.message) == ("ValueError", "boom")


def test_timeout_is_also_a_builtin_timeout_error() -> None:
    assert isinstance(errors.RequestTimeout("x"), TimeoutError)


def test_overloaded_is_a_kind_of_unavailable() -> None:
    assert issubclass(errors.Overloaded, errors.ServiceUnavailable)
