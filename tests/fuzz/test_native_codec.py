"""The compiled codec (zrouter/_native/codec.pyx) and its reference (zrouter.protocol) on the
same random input must agree exactly: the same record, or the same BadMessage kind, rid and
text; the encoders the same bytes, or the same exception type. Same generators and settings as
test_decoders.py (fixed seed in `make test`, ZROUTER_FUZZ_EXAMPLES / ZROUTER_FUZZ_RANDOM for more)."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.test_decoders import fuzz, headers, scalars
from tests.native.test_codec import outcome
from zrouter import _speedups
from zrouter import protocol as p

native = _speedups.load_native("codec")
PAIRS = [(native.decode_request, p.decode_request), (native.decode_reply, p.decode_reply),
         (native.decode_worker_message, p.decode_worker_message)]


def _agree(frame: Any) -> None:
    for ours, ref in PAIRS:
        assert outcome(ours, frame) == outcome(ref, frame), (ref.__name__, frame)


@fuzz
@given(st.binary(max_size=600))
def test_random_bytes_decode_the_same(frame: bytes) -> None:
    _agree(frame)


@fuzz
@given(headers)
def test_random_headers_decode_the_same(header: list[Any]) -> None:
    try:
        frame = msgpack.packb(header, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return
    _agree(frame)
    # The same header with its command set to REQUEST and to REPLY, so the field checks run.
    for cmd in (p.REQUEST, p.REPLY):
        _agree(msgpack.packb([cmd, *header[1:]], use_bin_type=True))


fields = st.one_of(scalars, st.integers(min_value=0, max_value=2**64 - 1), st.sampled_from([0, 1, 255, 256, p.MAX_RID]))
requests = st.tuples(st.sampled_from([p.REQUEST]), fields, st.one_of(fields, st.text(min_size=1, max_size=40)),
                     fields, fields, fields, fields, st.lists(scalars, max_size=2))


@fuzz
@given(requests)
def test_request_shaped_headers_decode_the_same(parts: tuple[Any, ...]) -> None:
    try:
        frame = msgpack.packb([*parts[:7], *parts[7]], use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return
    _agree(frame)
    _agree(frame + b"\x00")  # trailing bytes
    _agree(frame[:-1])  # truncated


@fuzz
@given(st.tuples(fields, fields, fields, fields, fields, fields))
def test_encode_request_writes_the_same(args: tuple[Any, ...]) -> None:
    assert outcome(native.encode_request, *args) == outcome(p.encode_request, *args)


@fuzz
@given(st.tuples(fields, fields, fields, st.one_of(st.none(), st.text(max_size=1500)), fields))
def test_encode_reply_writes_the_same(args: tuple[Any, ...]) -> None:
    assert outcome(native.encode_reply, *args) == outcome(p.encode_reply, *args)
