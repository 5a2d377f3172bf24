"""The client's non-waiting core: frames, reply -> value/exception, deadlines, brokers, failover.

No real sockets and no sleeps: brokers are fake sockets that record what is sent, monitor
events are fed by hand, and time is the ``now`` argument.
"""

from __future__ import annotations

import logging
import math
import struct
from typing import Any

import msgpack
import pytest
import zmq

from tests.helpers import STATUS_ERRORS
from zrouter.client._core import DEFAULT_BROKER, ClientCore, Entry, request_frames
from zrouter.client._brokers import BrokerConn, normalize_brokers
from zrouter import errors as err
from zrouter import protocol as p
from zrouter.transport import SNDMORE

UP = int(zmq.EVENT_HANDSHAKE_SUCCEEDED)
DOWN = int(zmq.EVENT_DISCONNECTED)


class FakeSocket:
    """A DEALER that records whole messages and refuses sends (EAGAIN) while ``accept`` is False,
    like IMMEDIATE with no peer; as a monitor, it hands out the events in ``inbox``."""

    def __init__(self) -> None:
        self.accept, self.closed, self.monitor_disabled = True, False, False
        self.messages: list[list[Any]] = []
        self.inbox: list[list[bytes]] = []
        self._partial: list[Any] = []

    def send(self, frame: Any, flags: int = 0, copy: bool = True) -> None:
        if not self._partial and not self.accept:
            raise zmq.Again()
        self._partial.append(frame)
        if not flags & SNDMORE:
            self.messages.append(self._partial)
            self._partial = []

    def recv_multipart(self, flags: int = 0) -> list[bytes]:
        if not self.inbox:
            raise zmq.Again()
        return self.inbox.pop(0)

    def get(self, option: int) -> int:
        return 0  # no input queued: tests call handle_reply directly

    def disable_monitor(self) -> None:
        self.monitor_disabled = True

    def close(self, linger: int | None = None) -> None:
        self.closed = True

    def requests(self) -> list[p.Request]:
        return [p.check_request(p.decode_header(m[1])) for m in self.messages]


class Factory:
    def __init__(self) -> None:
        self.socks: dict[str, FakeSocket] = {}
        self.monitors: dict[str, FakeSocket] = {}

    def __call__(self, endpoint: str) -> tuple[Any, Any]:
        sock, monitor = self.socks[endpoint], self.monitors[endpoint] = FakeSocket(), FakeSocket()
        return sock, monitor


A, B, C = "tcp://a:1", "tcp://b:1", "tcp://c:1"


def make_core(*endpoints: str, up: bool = True, **kwargs: Any) -> tuple[ClientCore, Factory]:
    factory = Factory()
    kwargs.setdefault("timeout", 10.0)
    core = ClientCore(list(endpoints), factory, **kwargs)
    if up:
        for ep in endpoints:
            set_state(core, ep, UP)
    return core, factory


def conn(core: ClientCore, endpoint: str) -> BrokerConn:
    c = core.connection(endpoint)
    assert c is not None
    return c


def set_state(core: ClientCore, endpoint: str, event: int, now: float = 0.0) -> None:
    core.connection_event(conn(core, endpoint), event, now)


def start(core: ClientCore, payload: Any = b"x", now: float = 0.0, **kw: Any) -> Entry:
    entry = Entry()
    args = {"service": "echo", "timeout": None, "idempotent": True, "key": None, **kw}
    core.start(entry, args["service"], payload, args["timeout"], args["idempotent"], args["key"], now)
    return entry


def reply(rid: int, status: int = p.STATUS_OK, payload: bytes = b"", **kw: Any) -> list[zmq.Frame]:
    header = p.encode_reply(rid, status, kw.get("flags", 0), kw.get("message"), kw.get("error_type"))
    return [zmq.Frame(p.SIGNATURE), zmq.Frame(header), zmq.Frame(payload)]


def frames(*parts: bytes) -> list[zmq.Frame]:
    return [zmq.Frame(x) for x in parts]


def outcome(entry: Entry) -> Any:
    assert entry._done
    if entry._error is not None:
        raise entry._error
    return entry._value


# -- request frames -----------------------------------------------------------------------------


def test_request_frames_carry_signature_header_and_payload() -> None:
    core, f = make_core(A, timeout=3.0)
    start(core, b"hello", timeout=2.5, key="user-7", now=100.0)
    [msg] = f.socks[A].messages
    assert msg[0] == p.SIGNATURE and msg[2] == b"hello"
    assert p.check_request(p.decode_header(msg[1])) == p.Request(1, "echo", 2500, 0, p.FLAG_IDEMPOTENT, "user-7")
    entries = [start(core, now=50.0) for _ in range(3)]  # the client's default timeout
    assert [e.rid for e in entries] == [2, 3, 4] and entries[0].deadline == 53.0
    assert [(r.rid, r.timeout_ms) for r in f.socks[A].requests()[1:]] == [(2, 3000), (3, 3000), (4, 3000)]


@pytest.mark.parametrize(
    ("payload", "idempotent", "flags", "frame"),
    [
        (b"raw", True, p.FLAG_IDEMPOTENT, b"raw"),
        (bytearray(b"ba"), True, p.FLAG_IDEMPOTENT, b"ba"),
        (memoryview(b"mv"), True, p.FLAG_IDEMPOTENT, b"mv"),
        ({"a": [1, 2]}, True, p.FLAG_IDEMPOTENT | p.FLAG_MSGPACK, msgpack.packb({"a": [1, 2]})),
        (7, False, p.FLAG_MSGPACK, msgpack.packb(7)),
        (b"raw", False, 0, b"raw"),
    ],
)
def test_payload_encoding_and_flags(payload: Any, idempotent: bool, flags: int, frame: bytes) -> None:
    core, f = make_core(A)
    start(core, payload, idempotent=idempotent)
    [msg] = f.socks[A].messages
    assert p.check_request(p.decode_header(msg[1])).flags == flags
    assert bytes(msg[2]) == frame


@pytest.mark.parametrize(("left", "ms"), [(1.2345, 1235), (0.0004, 1), (0.0, 1), (-5.0, 1), (2.0, 2000), (2.5, 2500),
                                         (86_400.0, p.MAX_TIMEOUT_MS), (86_400.0004, p.MAX_TIMEOUT_MS)])
def test_timeout_ms_is_the_remaining_time_rounded_up_and_never_zero(left: float, ms: int) -> None:
    entry = Entry()
    entry.rid, entry.service, entry.flags, entry.key, entry.payload = 1, "s", 0, None, b""
    entry.deadline = 10.0 + left
    header = p.decode_header(request_frames(entry, 10.0)[1])
    assert header[3] == ms


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"service": ""}, ValueError),
        ({"service": 5}, ValueError),
        ({"timeout": 0}, ValueError),
        ({"timeout": -1.0}, ValueError),
        ({"timeout": math.nan}, ValueError),
        ({"timeout": math.inf}, ValueError),  # the protocol's limit is one day
        ({"timeout": 86_400.5}, ValueError),
        ({"key": 3}, TypeError),
    ],
)
def test_start_refuses_bad_arguments_and_registers_nothing(kwargs: dict[str, Any], error: type) -> None:
    core, f = make_core(A)
    with pytest.raises(error):
        start(core, **kwargs)
    assert not core.pending and not f.socks[A].messages


def test_oversize_request_raises_message_too_large_before_sending() -> None:
    core, f = make_core(A, max_message_size=4)
    start(core, b"1234")
    with pytest.raises(err.MessageTooLarge):
        start(core, b"12345")
    with pytest.raises(err.MessageTooLarge):
        start(core, memoryview(b"12345"))
    assert len(core.pending) == 1 and len(f.socks[A].messages) == 1


# -- replies ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "body", "value"),
    [(0, b"pong", b"pong"), (p.FLAG_MSGPACK, msgpack.packb({"a": [1, "b"]}), {"a": [1, "b"]})],
)
def test_ok_reply_gives_raw_bytes_or_the_msgpack_value(flags: int, body: bytes, value: Any) -> None:
    core, _ = make_core(A)
    entry = start(core)
    core.handle_reply(reply(entry.rid, payload=body, flags=flags))
    assert outcome(entry) == value and type(entry._value) is type(value)
    assert not core.pending and conn(core, A).pending == 0


@pytest.mark.parametrize(("status", "cls"), STATUS_ERRORS)
def test_every_error_status_raises_its_exception(status: int, cls: type[err.ZRouterError]) -> None:
    core, _ = make_core(A)
    entry = start(core)
    core.handle_reply(reply(entry.rid, status, message="went wrong", error_type="KeyError"))
    assert type(entry._error) is cls
    assert "went wrong" in str(entry._error)
    if isinstance(entry._error, err.RemoteError):
        assert entry._error.type == "KeyError" and entry._error.message == "went wrong"


@pytest.mark.parametrize(
    "bad",
    [
        [zmq.Frame(p.SIGNATURE), zmq.Frame(p.encode_reply(1))],  # OK without a payload frame
        frames(p.SIGNATURE, msgpack.packb([p.REPLY, 1, "ok", 0, None, None]), b""),  # status not int
        frames(p.SIGNATURE, msgpack.packb([p.REPLY, 1, 0]), b""),  # header too short
        frames(p.SIGNATURE, p.encode_reply(1, flags=p.FLAG_MSGPACK), b"\xc1"),  # payload not msgpack
    ],
)
def test_malformed_reply_with_a_readable_rid_fails_that_request(bad: list[zmq.Frame]) -> None:
    core, _ = make_core(A)
    entry = start(core)
    core.handle_reply(bad)
    assert type(entry._error) is err.ProtocolError
    assert not core.pending


def test_reply_over_max_message_size_fails_with_message_too_large() -> None:
    core, _ = make_core(A, max_message_size=8)
    entry = start(core)
    core.handle_reply(reply(entry.rid, payload=b"x" * 9))
    assert type(entry._error) is err.MessageTooLarge


@pytest.mark.parametrize(
    "bad",
    [
        frames(b"HTTP", p.encode_reply(1), b""),  # wrong signature
        frames(p.SIGNATURE),  # too few frames
        frames(p.SIGNATURE, b"\xc1\xc1", b""),  # undecodable header
        frames(p.SIGNATURE, p.encode_request(1, "echo", 100), b""),  # not a REPLY
        frames(p.SIGNATURE, msgpack.packb([p.REPLY, "one", 0, 0, None, None]), b""),  # rid unreadable
    ],
)
def test_unattributable_messages_are_dropped_with_a_warning(
    bad: list[zmq.Frame], caplog: pytest.LogCaptureFixture
) -> None:
    core, _ = make_core(A)
    entry = start(core)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zrouter.client"):
        core.handle_reply(bad)
    assert not entry._done and entry.rid in core.pending
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_reply_for_unknown_rid_is_dropped_quietly(caplog: pytest.LogCaptureFixture) -> None:
    core, _ = make_core(A)
    entry = start(core)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="zrouter.client"):
        core.handle_reply(reply(12345, payload=b"?"))
    assert not entry._done
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


def test_duplicate_reply_keeps_the_first_outcome() -> None:
    core, _ = make_core(A)
    entry = start(core)
    core.handle_reply(reply(entry.rid, payload=b"first"))
    core.handle_reply(reply(entry.rid, p.STATUS_WORKER_LOST))
    assert outcome(entry) == b"first"


def test_cancelled_entry_drops_its_reply() -> None:
    core, _ = make_core(A)
    entry = start(core)
    core.cancel(entry)
    assert not core.pending and conn(core, A).pending == 1  # the broker still counts it
    core.handle_reply(reply(entry.rid, payload=b"late"))
    assert entry._value is None and conn(core, A).pending == 0


# -- deadlines ----------------------------------------------------------------------------------


def test_expire_fails_exactly_the_requests_past_their_deadline() -> None:
    core, _ = make_core(A)
    e1 = start(core, timeout=1.0, now=0.0)
    e3 = start(core, timeout=3.0, now=0.0)
    e2 = start(core, timeout=2.0, now=0.0)
    assert core.next_wakeup(0.0) == 1.0
    core.expire(0.999)
    assert not e1._done
    core.expire(1.0)
    assert isinstance(e1._error, err.RequestTimeout) and isinstance(e1._error, TimeoutError)
    assert "within 1 s" in str(e1._error)
    core.handle_reply(reply(e2.rid, payload=b"in time"))
    assert core.next_wakeup(1.5) == 3.0  # e2's deadline is skipped: it is settled
    core.expire(10.0)
    assert outcome(e2) == b"in time"
    assert isinstance(e3._error, err.RequestTimeout)
    # Given up on here, e1 and e3 still count at the broker until it answers them, or for a
    # grace period past their deadlines when it does not.
    assert not core.pending and conn(core, A).pending == 2
    core.tick(10.0)
    assert conn(core, A).pending == 0
    assert core.next_wakeup(10.0) is None


def test_late_reply_after_expiry_is_dropped() -> None:
    core, _ = make_core(A)
    entry = start(core, timeout=1.0)
    core.tick(2.0)
    core.handle_reply(reply(entry.rid, payload=b"late"))
    assert isinstance(entry._error, err.RequestTimeout)


def test_deadline_heap_stays_bounded_by_live_requests() -> None:
    core, _ = make_core(A)
    for i in range(1000):
        entry = start(core, now=float(i))
        core.handle_reply(reply(entry.rid))
    live = [start(core, now=1000.0) for _ in range(3)]
    assert len(core._deadlines) <= 64 + 2 * len(core.pending) + 1
    core.expire(2000.0)
    assert all(isinstance(e._error, err.RequestTimeout) for e in live)


# -- brokers ------------------------------------------------------------------------------------


def test_requests_go_to_the_broker_with_fewest_pending() -> None:
    core, f = make_core(A, B, C)
    entries = [start(core) for _ in range(6)]
    assert sorted(len(f.socks[ep].messages) for ep in (A, B, C)) == [2, 2, 2]
    for e in entries:
        if e.conn is conn(core, A):
            core.handle_reply(reply(e.rid))
    start(core)
    start(core)
    assert len(f.socks[A].messages) == 4


def test_no_broker_connected_the_request_waits_then_goes_out() -> None:
    core, f = make_core(A, up=False)
    entry = start(core, timeout=5.0, now=0.0)
    assert not f.socks[A].messages and not entry._done
    assert core.next_wakeup(0.0) == 5.0
    set_state(core, A, UP, now=2.0)
    [req] = f.socks[A].requests()
    assert req.rid == entry.rid and req.attempt == 0 and req.timeout_ms == 3000


def test_waiting_request_times_out_if_no_broker_comes() -> None:
    core, f = make_core(A, up=False)
    entry = start(core, timeout=1.0)
    core.tick(1.0)
    assert isinstance(entry._error, err.RequestTimeout)
    set_state(core, A, UP, now=1.5)
    assert not f.socks[A].messages


def test_monitor_events_are_read_from_the_monitor_socket() -> None:
    core, f = make_core(A, up=False)
    f.monitors[A].inbox.append([struct.pack("=Hi", UP, 7), A.encode()])
    core.read_monitors(0.0)
    assert core.connected == [A]
    f.monitors[A].inbox.append([struct.pack("=Hi", DOWN, 7), A.encode()])
    core.on_readable(f.monitors[A], 0.0)
    assert core.connected == []


def test_start_reads_monitors_when_no_broker_is_known_up() -> None:
    core, f = make_core(A, up=False)
    f.monitors[A].inbox.append([struct.pack("=Hi", UP, 0), A.encode()])
    start(core)
    assert len(f.socks[A].messages) == 1


def test_lost_connection_resends_idempotent_and_fails_the_others() -> None:
    core, f = make_core(A, B)
    f.socks[B].accept = False  # everything lands on A first
    idem = start(core, b"i", timeout=10.0, now=0.0)
    once = start(core, b"o", idempotent=False, now=0.0)
    assert idem.conn is once.conn is conn(core, A)
    f.socks[B].accept = True
    set_state(core, A, DOWN, now=4.0)
    assert isinstance(once._error, err.WorkerLost)
    assert str(once._error) == "broker connection lost; outcome unknown"
    [req] = f.socks[B].requests()
    assert (req.rid, req.attempt, req.timeout_ms) == (idem.rid, 1, 6000)
    assert f.socks[B].messages[0][2] == b"i"
    assert idem.conn is conn(core, B) and conn(core, A).pending == 0 and conn(core, B).pending == 1
    core.handle_reply(reply(idem.rid, payload=b"from B"))
    core.handle_reply(reply(idem.rid, payload=b"duplicate"))
    assert outcome(idem) == b"from B"


def test_lost_only_broker_requests_wait_for_it_to_come_back() -> None:
    core, f = make_core(A)
    entry = start(core, timeout=10.0, now=0.0)
    set_state(core, A, DOWN, now=1.0)
    assert not entry._done and len(f.socks[A].messages) == 1
    set_state(core, A, UP, now=3.0)
    assert [(r.rid, r.attempt, r.timeout_ms) for r in f.socks[A].requests()] == [
        (entry.rid, 0, 10000),
        (entry.rid, 1, 7000),
    ]


def test_refused_send_tries_other_brokers_then_waits_and_retries() -> None:
    core, f = make_core(A, B)
    f.socks[A].accept = f.socks[B].accept = False
    entry = start(core, now=0.0)
    assert not entry._done and entry.conn is None
    assert core.next_wakeup(0.0) == pytest.approx(0.05)  # a disconnect event is on its way
    f.socks[B].accept = True
    core.tick(0.05)
    assert entry.conn is conn(core, B) and len(f.socks[B].messages) == 1


def test_remove_broker_drains_pending_then_closes() -> None:
    core, f = make_core(A, B)
    f.socks[B].accept = False
    entry = start(core)
    f.socks[B].accept = True
    core.remove_broker(A)
    assert core.brokers == [B] and core.connected == [B]
    assert not f.socks[A].closed
    start(core)
    assert len(f.socks[A].messages) == 1  # nothing new for A
    core.handle_reply(reply(entry.rid, payload=b"ok"))
    core.tick(0.0)
    assert f.socks[A].closed and f.monitors[A].closed and f.socks[A].monitor_disabled
    core.remove_broker("tcp://unknown:1")  # ignored


def test_remove_idle_broker_closes_at_once_and_add_revives_a_draining_one() -> None:
    core, f = make_core(A, B)
    core.remove_broker(B)
    assert f.socks[B].closed
    entry = start(core)
    core.remove_broker(A)
    core.add_broker(A)
    assert core.brokers == [A] and core.connected == [A] and not f.socks[A].closed
    core.handle_reply(reply(entry.rid))
    core.tick(0.0)
    assert not f.socks[A].closed


def test_set_brokers_follows_a_new_list() -> None:
    core, f = make_core(A, B)
    core.set_brokers([B, C, B])
    assert core.brokers == [B, C] and normalize_brokers(DEFAULT_BROKER) == [DEFAULT_BROKER]
    with pytest.raises(TypeError):
        core.set_brokers([A, ""])
    assert f.socks[A].closed and not f.socks[B].closed and C in f.socks


def test_inproc_brokers_count_as_connected_at_once() -> None:
    core, _ = make_core("inproc://broker", up=False)
    assert core.connected == ["inproc://broker"]


def test_close_fails_pending_requests_and_closes_sockets() -> None:
    core, f = make_core(A, B)
    entries = [start(core) for _ in range(3)]
    core.close()
    assert all(type(e._error) is err.ClientClosed for e in entries)
    assert len({id(e._error) for e in entries}) == 3  # one exception object each
    assert all(s.closed for s in f.socks.values()) and all(m.closed for m in f.monitors.values())
    with pytest.raises(err.ClientClosed):
        start(core)
    with pytest.raises(err.ClientClosed):
        core.add_broker(C)
    core.close()  # idempotent


@pytest.mark.parametrize("timeout", [0, -1.0, math.nan, math.inf, 86_400.5])
def test_the_default_timeout_is_checked_when_the_client_is_made(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout must be > 0 and at most 86400 seconds"):
        make_core(A, timeout=timeout)


def test_a_timeout_of_one_day_is_the_longest_accepted() -> None:
    core, f = make_core(A, timeout=86_400.0)
    start(core)
    assert p.check_request(p.decode_header(f.socks[A].messages[0][1])).timeout_ms == p.MAX_TIMEOUT_MS
