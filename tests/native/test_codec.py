"""The compiled codec (zrouter/_native/codec.pyx) against its reference, zrouter.protocol: the
same record, or the same BadMessage (kind, rid, text), for hand-picked inputs at every edge of
the fast path; tests/fuzz/test_native_codec.py does the same on random input."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import zmq

from zrouter import _speedups
from zrouter import protocol as p

native = _speedups.load_native("codec")
R, P = p.REQUEST, p.REPLY


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    """What a call gives, in a form two implementations can be compared by."""
    try:
        value = fn(*args)
    except p.BadMessage as exc:
        return ("bad", type(exc), exc.kind, exc.rid, str(exc))
    except Exception as exc:
        return ("raised", type(exc))
    return ("ok", type(value), value)


def same(name: str, *args: Any) -> tuple[Any, ...]:
    ours, ref = outcome(getattr(native, name), *args), outcome(getattr(p, name), *args)
    assert ours == ref, (name, args)
    return ref


def pack(header: list[Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def test_native_functions_are_the_compiled_ones() -> None:
    assert type(native.decode_request).__name__ == "cython_function_or_method"


VALID_REQUESTS = [
    [R, 1, "echo", 1, 0, 0, None],
    [R, p.MAX_RID, "s" * p.MAX_SERVICE_LEN, p.MAX_TIMEOUT_MS, p.MAX_ATTEMPT, p.MAX_FLAGS, b"k" * p.MAX_KEY_LEN],
    [R, 2**32, "é" * 127, 5000, 3, 3, "clé"],
    [R, 7, "echo", 100, 0, 1, "", "a later field", 1.5, None, True],
    [R, 7, "日本", 100, 0, 1, b""],
]


@pytest.mark.parametrize("header", VALID_REQUESTS)
def test_valid_requests_decode_to_the_same_record(header: list[Any]) -> None:
    kind, cls, value = same("decode_request", pack(header))
    assert kind == "ok" and cls is p.Request and value == p.Request(*header[1:7])


@pytest.mark.parametrize("header", [
    [P, 0, 0, 0, None, None], [P, p.MAX_RID, 255, p.MAX_FLAGS, "m" * 1024, "E" * 1024], [P, 3, 1, 2, "", "é", 9],
])
def test_valid_replies_decode_to_the_same_record(header: list[Any]) -> None:
    kind, cls, value = same("decode_reply", pack(header))
    assert kind == "ok" and cls is p.Reply and value == p.Reply(*header[1:6])


def _int_forms(value: int) -> list[bytes]:
    """Every msgpack form of a non-negative integer, not only the shortest one."""
    forms = []
    for code, fmt, low, high in ((0xcc, ">B", 0, 255), (0xcd, ">H", 0, 2**16 - 1), (0xce, ">I", 0, 2**32 - 1),
                                 (0xcf, ">Q", 0, 2**64 - 1), (0xd0, ">b", -128, 127), (0xd1, ">h", -(2**15), 2**15 - 1),
                                 (0xd2, ">i", -(2**31), 2**31 - 1), (0xd3, ">q", -(2**63), 2**63 - 1)):
        if low <= value <= high:
            forms.append(bytes([code]) + struct.pack(fmt, value))
    return forms


@pytest.mark.parametrize("value", [0, 1, 5, 127, 128, 255, 256, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, -1, -200])
def test_every_integer_form_reads_the_same(value: int) -> None:
    forms = _int_forms(value) + ([pack(value)] if value >= -(2**63) else [])
    for form in forms:
        # the integer as rid, as timeout_ms and as flags
        for pos in (1, 3, 5):
            parts = [pack(x) for x in [R, 9, "echo", 100, 0, 1, None]]
            parts[pos] = form
            same("decode_request", b"\x97" + b"".join(parts))
        parts = [pack(x) for x in [P, 9, 0, 0, None, None]]
        parts[2] = form
        same("decode_reply", b"\x96" + b"".join(parts))


REFUSED = [
    b"", b"\xc1", b"\x97", b"\x91", b"\x92\x01", pack({"a": 1}), pack([]), pack(["1"]), pack([True]), pack(1),
    pack([R, 1, "x" * p.MAX_HEADER_SIZE]), pack([R, 1, "echo", 100, 0, 1, None]) + b"\x00",
    b"\xdd\xff\xff\xff\xff", b"\xdc\x00\x41" + b"\x00" * 0x41, b"\xdc\x00\x07" + pack([R, 1, "echo", 100, 0, 1, None])[1:],
    b"\x91" * 1000 + b"\x01", b"\x91" * 5000 + b"\x01",
    pack([R, 1, "echo", 100]), pack([R, 0, "echo", 100, 0, 1, None]), pack([R, -1, "echo", 100, 0, 1, None]),
    pack([R, True, "echo", 100, 0, 1, None]), pack([R, 1.0, "echo", 100, 0, 1, None]),
    pack([R, 1, "", 100, 0, 1, None]), pack([R, 1, b"echo", 100, 0, 1, None]),
    pack([R, 1, "s" * 256, 100, 0, 1, None]), pack([R, 1, "é" * 128, 100, 0, 1, None]),
    pack([R, 5, "echo", 0, 0, 1, None]), pack([R, 5, "echo", p.MAX_TIMEOUT_MS + 1, 0, 1, None]),
    pack([R, 5, "echo", 100, 256, 1, None]), pack([R, 5, "echo", 100, 0, 2**32, None]),
    pack([R, 5, "echo", 100, 0, -1, None]), pack([R, 5, "echo", 100, 0, 1, 7]), pack([R, 5, "echo", 100, 0, 1, [1]]),
    pack([R, 5, "echo", 100, 0, 1, b"k" * 256]), pack([R, 5, "echo", 100, 0, 1, "k" * 256]),
    pack([R, 5, ["echo"], 100, 0, 1, None]), pack([R, 5, {"s": 1}, 100, 0, 1, None]),
    pack([R, 5, "echo", 100, 0, 1, None, [1, 2]]), pack([R, 5, "echo", 100, 0, 1, None, {1: 2}]),
    pack([R, 5, "echo", 100, 0, 1, msgpack.ExtType(1, b"x")]), b"\x97\x01\x05\xa4echo\x64\x00\x01\xc7\x00\x05",
    b"\x97\x01\x05\xa4ech\xff\x64\x00\x01\xc0",  # invalid UTF-8 in service
    b"\x97\x01\x05\xa4echo\x64\x00\x01\xa2\xed\xa0",  # a surrogate in UTF-8: refused by Python's decoder
    b"\x97\x01\x05\xa4echo\x64\x00\x01\xc4\x05ab",  # bin longer than the frame
    b"\x97\x01\x05\xa4echo\x64\x00\x01\xcf\x00",  # truncated uint64
    pack([P, 5, 0, 0, None, None]), pack([0x7F, 5, "echo", 100, 0, 1, None]), pack([2**64 - 1, 5]),
    pack([-3, 5, "echo", 100, 0, 1, None]),
    pack([True, 5, "echo", 100, 0, 1, None]), pack([1.0, 5, "echo", 100, 0, 1, None]),  # == 1, but no integer
    pack([True, 5, 0, 0, None, None]), pack([2.0, 5, 0, 0, None, None]),
    pack([P, 5, 256, 0, None, None]), pack([P, 5, 0, 0, "m" * 1025, None]), pack([P, 5, 0, 0, None, b"E"]),
    pack([P, -5, 0, 0, None, None]), pack([P, 5, 0, 0, None]), pack([P, 5, 0, 2**32, None, None]),
    pack([R, 5, "echo", 100, 0, 1, None]) + b"",
    pack([P, 5, 0, 0, 1.5, None]), pack([P, 5, False, 0, None, None]),
]


@pytest.mark.parametrize("frame", REFUSED, ids=range(len(REFUSED)))
def test_edge_inputs_give_the_same_outcome(frame: bytes) -> None:
    same("decode_request", frame)
    same("decode_reply", frame)
    same("decode_worker_message", frame)


def test_a_command_that_only_equals_an_integer_is_refused() -> None:
    # docs/protocol.md: "A boolean is not an integer anywhere ... and neither is a float".
    for cmd in (True, 1.0):
        for decode in (p.decode_request, native.decode_request):
            with pytest.raises(p.BadMessage) as info:
                decode(pack([cmd, 5, "echo", 100, 0, 1, None]))
            assert info.value.kind == "not_array"


def test_any_buffer_reads_the_same() -> None:
    frame = pack([R, 7, "echo", 100, 0, 1, b"k"])
    ctx = zmq.Context()
    try:
        a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        a.bind("inproc://codec")
        b.connect("inproc://codec")
        a.send(frame)
        zframe = b.recv(copy=False)
        for arg in (frame, bytearray(frame), memoryview(frame), zframe, zframe.buffer, memoryview(frame).cast("B")):
            assert same("decode_request", arg)[0] == "ok"
        # Not a byte buffer, or no buffer at all: the reference decides.
        for odd in (memoryview(frame[:4]).cast("I"), "a str", 17, None):
            same("decode_request", odd)
            same("decode_reply", odd)
        a.close(0)
        b.close(0)
    finally:
        ctx.term()


ENCODE_REQUESTS: list[tuple[Any, ...]] = [
    (1, "echo", 1), (1, "echo", 1, 0, 0, None), (2**64 - 1, "s" * 255, p.MAX_TIMEOUT_MS, 255, 2**32 - 1, b"k" * 255),
    (127, "x" * 31, 128, 255, 256, "k"), (65535, "x" * 32, 65536, 1, 2**32, "é" * 300), (2**32, "", 0, 0, 0, b""),
    (5, "echo", 100, 0, 1, b"k" * 70000), (5, "é" * 5000, 100), (-1, "echo", 100), (2**64, "echo", 100),
    (5, "echo", -100), (5, b"echo", 100), (5, "echo", 100.0), (True, "echo", 100), (5, "\ud800", 100),
    (5, "echo", 100, 0, 1, "\udcff"), (5, "echo", 100, 0, 1, bytearray(b"k")), (5, "echo", 100, 0, 1, 3),
    (5, "echo", 100, 0, 1, memoryview(b"k")),
]


@pytest.mark.parametrize("args", ENCODE_REQUESTS, ids=range(len(ENCODE_REQUESTS)))
def test_encode_request_writes_the_same_bytes(args: tuple[Any, ...]) -> None:
    same("encode_request", *args)


ENCODE_REPLIES: list[tuple[Any, ...]] = [
    (1,), (1, 0, 0, None, None), (9, 1, 0, "boom", "ValueError"), (2**64 - 1, 255, 2**32 - 1, "m" * 1024, "é" * 512),
    (9, 1, 0, "m" * 1025, None), (9, 1, 0, "é" * 600, "e" * 5000), (9, 1, 0, "\ud800", None), (0, 2, 2, "", ""),
    (-1,), (9, -1), (9, 1, 0, b"bytes", None), (9, 1, 0, 42, None), (9, True, False), (2**64,), (9, 1, 2**64),
]


@pytest.mark.parametrize("args", ENCODE_REPLIES, ids=range(len(ENCODE_REPLIES)))
def test_encode_reply_writes_the_same_bytes(args: tuple[Any, ...]) -> None:
    same("encode_reply", *args)


def test_keyword_arguments_match_the_reference() -> None:
    assert native.encode_request(3, "svc", 10, key=b"k", flags=0) == p.encode_request(3, "svc", 10, key=b"k", flags=0)
    assert native.encode_reply(3, message="m", error_type="E") == p.encode_reply(3, message="m", error_type="E")


def test_the_fast_path_answers_valid_input_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """Valid headers never reach the reference (else the compiled codec would be the slow one),
    and everything it refuses does (so the reference alone words every refusal)."""
    seen: list[Any] = []

    def reference(*args: Any) -> Any:
        seen.append(args)
        raise p.BadMessage("field", "reference called")

    for name in ("_py_decode_request", "_py_decode_reply", "_py_encode_request", "_py_encode_reply"):
        monkeypatch.setattr(native, name, reference)
    for header in VALID_REQUESTS:
        native.decode_request(pack(header))
    native.decode_reply(pack([P, 3, 1, 2, "m", "E"]))
    native.encode_request(5, "echo", 100, 0, 3, b"k")
    native.encode_reply(5, 1, 0, "m", "E")
    assert seen == []
    with pytest.raises(p.BadMessage, match="reference called"):
        native.decode_request(pack([R, 0, "echo", 100, 0, 1, None]))
    with pytest.raises(p.BadMessage, match="reference called"):
        native.encode_reply(5, 1, 0, "m" * 2000)
    assert len(seen) == 2
