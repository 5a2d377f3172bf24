"""The wire codec: round trips, refusals of malformed headers, payload encoding, status mapping."""

from __future__ import annotations

import msgpack
import pytest

from tests.helpers import STATUS_ERRORS
from zrouter import errors
from zrouter import protocol as p


def test_request_round_trip() -> None:
    frame = p.encode_request(7, "echo", 1500, 2, p.FLAG_IDEMPOTENT | p.FLAG_MSGPACK, b"k")
    assert p.decode_request(frame) == p.Request(7, "echo", 1500, 2, 3, b"k")
    assert p.decode_broker_message(frame) == p.Request(7, "echo", 1500, 2, 3, b"k")


def test_reply_round_trip() -> None:
    frame = p.encode_reply(9, p.STATUS_REMOTE_ERROR, 0, "boom", "ValueError")
    assert p.decode_reply(frame) == p.Reply(9, p.STATUS_REMOTE_ERROR, 0, "boom", "ValueError")
    assert p.decode_worker_message(frame) == p.Reply(9, p.STATUS_REMOTE_ERROR, 0, "boom", "ValueError")


def test_ready_round_trip_meta_as_strings_and_heartbeat_parsed() -> None:
    frame = p.encode_ready("svc", 4, 3, {"instance": "a-1", "pid": "12", "heartbeat_ms": "250"})
    assert p.decode_ready(frame) == p.Ready("svc", 4, 3, {"instance": "a-1", "pid": "12", "heartbeat_ms": "250"}, 250)
    assert p.decode_ready(msgpack.packb([p.READY, "svc", 1, 1, {"heartbeat_ms": 40}])).heartbeat_ms == 40
    assert p.decode_ready(msgpack.packb([p.READY, "svc", 1, 1, None])).meta == {}


def test_control_commands_decode_to_their_records() -> None:
    assert p.decode_worker_message(p.encode_heartbeat()) == p.Heartbeat()
    assert p.decode_broker_message(p.encode_drain()) == p.Drain()
    assert p.decode_worker_message(p.encode_disconnect("bye")) == p.Disconnect("bye")
    assert p.decode_broker_message(p.encode_disconnect(None)) == p.Disconnect(None)
    assert p.decode_worker_message(p.encode_update(2, 5)) == p.Update(2, 5)


def test_extra_trailing_fields_are_ignored_for_forward_compatibility() -> None:
    header = msgpack.packb([p.REQUEST, 1, "echo", 100, 0, 1, None, "future-field"])
    assert p.decode_request(header).service == "echo"
    assert p.decode_worker_message(msgpack.packb([p.HEARTBEAT, "future"])) == p.Heartbeat()


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"\xc1", "not_msgpack"),  # never-used msgpack byte
        (msgpack.packb({"not": "an array"}), "not_array"),
        (msgpack.packb([]), "not_array"),
        (msgpack.packb(["1", 2]), "not_array"),
        (msgpack.packb([True]), "not_array"),
        (b"\x91" * 1000 + b"\x01", "not_array"),  # nested 1,000 deep: decoded, refused by shape
        (b"\x91" * 5000 + b"\x01", "not_msgpack"),  # past msgpack's own nesting limit
        (msgpack.packb([1, "x" * p.MAX_HEADER_SIZE]), "header_size"),
        (b"\xdd\xff\xff\xff\xff", "not_msgpack"),  # array32 claiming 4 billion elements
        (msgpack.packb([1]) + b"\x00", "not_msgpack"),  # trailing bytes
    ],
)
def test_decode_header_refuses_garbage(raw: bytes, kind: str) -> None:
    with pytest.raises(p.BadMessage) as info:
        p.decode_header(raw)
    assert info.value.kind == kind and info.value.rid == 0


R = p.REQUEST


@pytest.mark.parametrize(
    "header",
    [
        [R, 1, "echo", 100],  # too short
        [R, 0, "echo", 100, 0, 1, None],  # rid 0 is reserved
        [R, -1, "echo", 100, 0, 1, None],
        [R, True, "echo", 100, 0, 1, None],
        [R, 1.0, "echo", 100, 0, 1, None],
        [R, 1, "", 100, 0, 1, None],
        [R, 1, b"echo", 100, 0, 1, None],  # a service name is str only
        [R, 1, "s" * (p.MAX_SERVICE_LEN + 1), 100, 0, 1, None],
        [R, 1, "é" * 128, 100, 0, 1, None],  # 256 bytes of UTF-8
        [R, 1, "echo", 0, 0, 1, None],
        [R, 1, "echo", p.MAX_TIMEOUT_MS + 1, 0, 1, None],
        [R, 1, "echo", 2**64 - 1, 0, 3, None],  # the OverflowError of issue 7
        [R, 1, "echo", 100, "0", 1, None],
        [R, 1, "echo", 100, -1, 1, None],
        [R, 1, "echo", 100, p.MAX_ATTEMPT + 1, 1, None],
        [R, 1, "echo", 100, 0, -1, None],
        [R, 1, "echo", 100, 0, 2**32, None],
        [R, 1, "echo", 100, 0, 1, 3.5],
        [R, 1, "echo", 100, 0, 1, [1]],
        [R, 1, "echo", 100, 0, 1, b"k" * (p.MAX_KEY_LEN + 1)],
        [R, 1, "echo", 100, 0, 1, "k" * (p.MAX_KEY_LEN + 1)],
        [R, 1, "echo", 100, 0, 1, {"a": 1}],
        [R, 1, [[[[]]]], 100, 0, 1, None],
    ],
)
def test_decode_request_refuses_bad_fields(header: list[object]) -> None:
    with pytest.raises(p.BadMessage):
        p.decode_request(msgpack.packb(header))


def test_a_refused_request_names_its_rid_when_readable() -> None:
    with pytest.raises(p.BadMessage) as info:
        p.decode_request(msgpack.packb([R, 42, "echo", 0, 0, 1, None]))
    assert info.value.rid == 42 and info.value.kind == "field"
    assert "timeout_ms" in str(info.value)


def test_limits_are_inclusive() -> None:
    big = p.decode_request(msgpack.packb(
        [R, p.MAX_RID, "s" * p.MAX_SERVICE_LEN, p.MAX_TIMEOUT_MS, p.MAX_ATTEMPT, p.MAX_FLAGS, b"k" * p.MAX_KEY_LEN]))
    assert big.rid == p.MAX_RID and len(big.service) == p.MAX_SERVICE_LEN
    ready = p.decode_ready(msgpack.packb([p.READY, "svc", p.MAX_CAPACITY, p.MAX_WEIGHT, {"heartbeat_ms": "60000"}]))
    assert (ready.capacity, ready.weight, ready.heartbeat_ms) == (p.MAX_CAPACITY, p.MAX_WEIGHT, 60000)


@pytest.mark.parametrize(
    "header",
    [
        [p.READY, "svc", -1, 1, {}],
        [p.READY, "", 1, 1, {}],
        [p.READY, "svc", 1, 1, []],
        [p.READY, "svc"],
        [p.READY, "svc", 2**63, 1, {}],
        [p.READY, "svc", 1, float("inf"), {}],
        [p.READY, "svc", 1, 1, {"heartbeat_ms": "1" * 400}],  # issue 7: a 400-digit interval
        [p.READY, "svc", 1, 1, {"heartbeat_ms": "5"}],
        [p.READY, "svc", 1, 1, {"heartbeat_ms": "60001"}],
        [p.READY, "svc", 1, 1, {"heartbeat_ms": "1e3"}],
        [p.READY, "svc", 1, 1, {"heartbeat_ms": 2.5}],
        [p.READY, "svc", 1, 1, {str(i): "v" for i in range(p.MAX_META_ENTRIES + 1)}],
        [p.READY, "svc", 1, 1, {"instance": "v" * (p.MAX_META_VALUE_LEN + 1)}],
        [p.READY, "svc", 1, 1, {"k" * (p.MAX_META_KEY_LEN + 1): "v"}],
        [p.READY, "svc", 1, 1, {"instance": ["nested"]}],
        [p.UPDATE, float("inf"), 1],  # issue 7: [0x14, inf, 1]
        [p.UPDATE, 1],
        [p.UPDATE, 1, -1],
        [p.UPDATE, 1, p.MAX_WEIGHT + 1],
        [p.DISCONNECT],
        [p.DISCONNECT, 5],
        [p.REPLY, 1, 0, 0, None],
        [p.REPLY, -1, 0, 0, None, None],
        [p.REPLY, 1, 256, 0, None, None],
        [p.REPLY, 1, 1, 0, "m" * (p.MAX_TEXT_LEN + 1), None],
        [p.REPLY, 1, 1, 0, None, b"KeyError"],
        [p.REQUEST, 1, "echo", 100, 0, 1, None],  # a worker never sends REQUEST
    ],
)
def test_decode_worker_message_refuses_bad_fields(header: list[object]) -> None:
    with pytest.raises(p.BadMessage):
        p.decode_worker_message(msgpack.packb(header))


def test_unknown_commands_are_told_apart_so_receivers_can_ignore_them() -> None:
    with pytest.raises(p.UnknownCommand) as info:
        p.decode_worker_message(msgpack.packb([0x7F, 1, 2]))
    assert info.value.command == 0x7F
    with pytest.raises(p.BadMessage) as wrong:
        p.decode_broker_message(p.encode_ready("svc", 1))
    assert type(wrong.value) is p.BadMessage and wrong.value.kind == "wrong_command"


def test_frames_are_checked_before_the_header() -> None:
    p.check_frames([b"id", p.SIGNATURE, b"h", b"payload"], 1)
    p.check_frames([p.SIGNATURE, b"h"], 0)
    for frames, kind in [([b"id", b"ZRT2", b"h"], "signature"), ([b"id", p.SIGNATURE], "frames"),
                         ([p.SIGNATURE, b"h", b"p", b"extra"], "frames")]:
        with pytest.raises(p.BadMessage) as info:
            p.check_frames(frames, 1 if frames[0] == b"id" else 0)
        assert info.value.kind == kind
    req = p.decode_request(p.encode_request(5, "echo", 100))
    with pytest.raises(p.BadMessage) as missing:
        p.check_payload_count(req, [p.SIGNATURE, b"h"], 0)
    assert missing.value.rid == 5
    with pytest.raises(p.BadMessage):
        p.check_payload_count(p.Heartbeat(), [p.SIGNATURE, b"h", b"payload"], 0)


def test_what_we_send_always_passes_the_receivers_decoder() -> None:
    long = "é" * 5000
    assert p.decode_reply(p.encode_reply(1, p.STATUS_REMOTE_ERROR, 0, long, long)).message is not None
    assert p.decode_worker_message(p.encode_disconnect(long)) != p.Disconnect(long)


def test_error_texts_never_quote_the_peer() -> None:
    marker = "MARKER" * 10
    for header in ([R, 1, marker * 10, 100, 0, 1, None], [p.READY, marker * 10, 1, 1, {}],
                   [p.READY, "svc", 1, 1, {marker: marker * 50}], [p.REPLY, 1, 0, 0, marker * 500, None]):
        with pytest.raises(p.BadMessage) as info:
            p.decode_worker_message(msgpack.packb(header)) if header[0] != R else p.decode_request(msgpack.packb(header))
        assert "MARKER" not in str(info.value) and len(str(info.value)) < 200


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


@pytest.mark.parametrize(("status", "cls"), STATUS_ERRORS)
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
