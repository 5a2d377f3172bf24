"""The client keeps within the broker's per-client bounds, so the broker never has to refuse a
well-behaved client: what does not fit waits in the client, in order (time passed in)."""

from __future__ import annotations

import pytest

from tests.unit.test_client_core import DOWN, A, B, conn, make_core, reply, set_state, start
from zrouter import errors as err
from zrouter import limits


def test_defaults_are_the_brokers() -> None:
    core, _ = make_core(A)
    assert core.max_message_size == limits.MAX_MESSAGE_SIZE
    assert core._brokers.max_inflight == limits.MAX_CLIENT_REQUESTS
    assert core._brokers.max_inflight_bytes == limits.MAX_CLIENT_BYTES


def test_past_max_inflight_requests_wait_here_in_order_and_go_out_as_replies_come() -> None:
    core, f = make_core(A, max_inflight=3)
    entries = [start(core, bytes([i])) for i in range(6)]
    assert [m[2] for m in f.socks[A].messages] == [b"\x00", b"\x01", b"\x02"]
    assert conn(core, A).pending == 3 and not any(e._done for e in entries)
    core.handle_reply(reply(entries[0].rid))
    core.tick(0.0)
    assert [m[2] for m in f.socks[A].messages][3:] == [b"\x03"]
    later = start(core, b"late")  # behind those already waiting, never ahead of them
    core.handle_reply(reply(entries[1].rid))
    core.handle_reply(reply(entries[2].rid))
    core.tick(0.0)
    assert [m[2] for m in f.socks[A].messages][4:] == [b"\x04", b"\x05"]
    assert later.conn is None and conn(core, A).pending == 3


def test_payload_bytes_in_flight_are_bounded_too() -> None:
    core, f = make_core(A, max_inflight_bytes=10, max_message_size=None)
    e1 = start(core, b"x" * 6)
    start(core, b"y" * 6)
    assert len(f.socks[A].messages) == 1 and conn(core, A).pending_bytes == 6
    core.handle_reply(reply(e1.rid))
    core.tick(0.0)
    assert len(f.socks[A].messages) == 2 and conn(core, A).pending_bytes == 6
    with pytest.raises(err.MessageTooLarge, match="max_inflight_bytes"):
        start(core, b"z" * 11)  # could never be accepted: refused here, not queued forever


def test_a_full_connection_sends_to_one_with_room() -> None:
    core, f = make_core(A, B, max_inflight=1)
    start(core)
    start(core)
    third = start(core)
    assert len(f.socks[A].messages) == len(f.socks[B].messages) == 1 and third.conn is None


def test_a_request_given_up_on_keeps_its_place_until_the_broker_answers_it() -> None:
    core, f = make_core(A, max_inflight=1)
    first = start(core, b"1", timeout=1.0, now=0.0)
    second = start(core, b"2", timeout=10.0, now=0.0)
    core.tick(1.0)
    assert isinstance(first._error, err.RequestTimeout)
    assert len(f.socks[A].messages) == 1 and second.conn is None  # the broker still holds "1"
    core.handle_reply(reply(first.rid, status=2))  # the broker's own TIMEOUT answer
    core.tick(1.001)
    assert second.conn is conn(core, A) and len(f.socks[A].messages) == 2


def test_a_place_held_for_an_answer_that_never_comes_is_freed_after_a_grace_period() -> None:
    core, _ = make_core(A, max_inflight=1)
    first = start(core, b"1", timeout=1.0, now=0.0)
    second = start(core, b"2", timeout=10.0, now=0.0)
    core.tick(1.0)
    assert core.next_wakeup(1.0) == pytest.approx(3.0)
    core.tick(2.9)
    assert second.conn is None
    core.tick(3.0)
    assert first._done and second.conn is conn(core, A)


def test_a_lost_connection_frees_its_places() -> None:
    core, _ = make_core(A, max_inflight=2)
    first = start(core, timeout=1.0)
    start(core, idempotent=False)
    core.tick(1.0)
    set_state(core, A, DOWN, now=1.0)
    assert first._done and conn(core, A).pending == 0 and conn(core, A).pending_bytes == 0
