"""What the broker keeps, and for how long, under each kind of flood: the routing core's memory
bounds with time passed in (no sockets, no sleeps), and the unread-reply accounting."""

from __future__ import annotations

import random
import weakref
from typing import Any

import pytest

from tests.unit.test_router import Recorder, ready
from zrouter import protocol as p
from zrouter.broker.router import Router
from zrouter.broker.unread import UnreadReplies

IDEM = p.FLAG_IDEMPOTENT


class Payload:
    """A payload frame stand-in that says when the broker let go of it."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


class Sink(Recorder):
    """Records headers only: what the sink kept must not hide what the router keeps."""

    def to_worker(self, ident: bytes, header: bytes, payload: Any) -> bool:
        return super().to_worker(ident, header, None)

    def to_client(self, client: bytes, header: bytes, payload: Any) -> None:
        super().to_client(client, header, None)


def make(**kw: Any) -> tuple[Router, Sink]:
    sink = Sink()
    return Router(sink, rng=random.Random(1), **kw), sink


def send(r: Router, crid: int, now: float, payload: Any = None, *, client: bytes = b"c", service: str = "svc",
         timeout_ms: int = 10_000) -> Any:
    payload = Payload() if payload is None else payload
    r.request(client, crid, service, timeout_ms, 0, IDEM, None, payload, now)
    return payload


def statuses(sink: Sink) -> list[int]:
    return [h[2] for _, h, _ in sink.to_clients]


def last_message(sink: Sink) -> str:
    return str(sink.to_clients[-1][1][4])


# -- answered while queued: out of the queue, payload freed, at once ----------------------------


def test_a_request_answered_unavailable_leaves_the_queue_and_frees_its_payload_at_once() -> None:
    r, sink = make(grace=1.0)
    refs = [weakref.ref(send(r, i, 0.0)) for i in range(1, 6)]
    svc = r.services["svc"]
    assert len(svc.queue) == 5 and all(ref() is not None for ref in refs)
    r.expire(1.0)
    assert statuses(sink) == [p.STATUS_UNAVAILABLE] * 5
    assert len(svc.queue) == 0 and svc.queue.held() == 0
    assert all(ref() is None for ref in refs)  # nothing the broker keeps points at them


def test_a_small_payload_that_must_wait_is_copied_out_of_libzmqs_shared_receive_buffer() -> None:
    """libzmq receives small messages into shared ~18 KiB buffers: a queued 4 KB frame would
    keep a whole one. Dispatched at once, it is passed on untouched (no copy)."""
    import zmq

    r, _ = make()
    small, big = zmq.Frame(b"s" * 4096), zmq.Frame(b"b" * 10_000)
    send(r, 1, 0.0, small)
    send(r, 2, 0.0, big)
    queued = list(r.services["svc"].queue._order)
    assert type(queued[0].payload) is bytes and queued[0].payload == b"s" * 4096
    assert queued[1].payload is big
    recorder = Recorder()
    r2 = Router(recorder, rng=random.Random(1))
    ready(r2, b"w1")
    frame = zmq.Frame(b"f" * 100)
    r2.request(b"c", 1, "svc", 1000, 0, IDEM, None, frame, 0.0)
    assert recorder.to_workers[0][2] is frame


@pytest.mark.parametrize("how", ["timeout", "shutdown"])
def test_timeouts_and_shutdown_also_free_queued_payloads(how: str) -> None:
    r, sink = make(grace=30.0)
    ready(r, b"w1", capacity=0)  # connected, no credit: everything queues
    refs = [weakref.ref(send(r, i, 0.0, timeout_ms=500)) for i in range(1, 4)]
    if how == "timeout":
        r.expire(0.5)
        assert statuses(sink) == [p.STATUS_TIMEOUT] * 3
    else:
        r.shutdown()
        assert statuses(sink) == [p.STATUS_UNAVAILABLE] * 3
    assert r.services["svc"].queue.held() == 0
    assert all(ref() is None for ref in refs)


def test_steady_flood_to_a_service_nobody_serves_holds_at_most_a_grace_period_of_requests() -> None:
    """4,000 requests a second for 20 s (80,000), each answered UNAVAILABLE after the 1 s grace
    period, as the broker's loop would drive it (expire at every timer, tick every second)."""
    r, sink = make(grace=1.0, max_client_requests=10_000)
    peak = 0
    for i in range(80_000):
        now = i / 4000.0
        if (t := r.next_timer()) is not None and t <= now:
            r.expire(now)
        if i % 4000 == 0:
            r.tick(now, heartbeat=False)
        send(r, i + 1, now)
        peak = max(peak, r.services["svc"].queue.held())
    assert peak <= 2 * 4000 + 200  # a grace period's worth (order + timers), not the whole flood
    r.expire(25.0)
    r.tick(25.0, heartbeat=False)
    assert statuses(sink).count(p.STATUS_UNAVAILABLE) == 80_000
    assert "svc" not in r.services and not r.clients  # forgotten once answered


# -- services created by naming them ------------------------------------------------------------


def test_services_nobody_serves_are_forgotten_after_grace_and_their_number_is_bounded() -> None:
    r, sink = make(grace=1.0, max_services=3)
    for i, name in enumerate(["a", "b", "c"], 1):
        send(r, i, 0.0, service=name)
    send(r, 4, 0.0, service="d")
    assert sink.to_clients[-1][1][1:3] == [4, p.STATUS_UNAVAILABLE]
    assert "--max-services" in last_message(sink) and "d" not in r.services
    send(r, 5, 0.0, service="a")  # a service it keeps is still served (queued here)
    assert len(r.services["a"].queue) == 2
    r.expire(1.0)
    r.tick(1.5, heartbeat=False)
    assert r.services == {}
    send(r, 6, 2.0, service="d")
    assert "d" in r.services


def test_a_service_with_workers_is_kept_and_workers_may_exceed_the_service_bound() -> None:
    r, _ = make(grace=1.0, max_services=1)
    ready(r, b"w1", service="one")
    ready(r, b"w2", service="two")  # workers are not refused: the bound is on names clients make up
    for ident in (b"w1", b"w2"):
        r.seen(ident, 100.0)
    r.tick(100.0, heartbeat=False)
    assert set(r.services) == {"one", "two"}


# -- requests a worker holds past their deadline ------------------------------------------------


def test_held_past_its_deadline_is_answered_timeout_payload_freed_credit_kept_late_reply_dropped() -> None:
    r, sink = make()
    w = ready(r, b"w1", capacity=2)
    refs = [weakref.ref(send(r, i, 0.0, timeout_ms=1000)) for i in (1, 2)]
    rids = [h[1] for h in sink.requests_to(b"w1")]
    assert r.next_timer() == pytest.approx(1.01)  # deadline slots are 10 ms wide
    r.expire(1.0)
    assert not sink.to_clients
    r.expire(1.01)
    assert [h[1:3] for _, h, _ in sink.to_clients] == [[1, p.STATUS_TIMEOUT], [2, p.STATUS_TIMEOUT]]
    assert "worker held" in last_message(sink)
    assert all(ref() is None for ref in refs)
    assert (w.outstanding, w.inflight, set(w.expired)) == (2, {}, set(rids))  # credits still taken
    assert r.clients[b"c"].requests == 0
    send(r, 3, 1.0)  # no credit: it waits
    assert len(r.services["svc"].queue) == 1
    r.worker_reply(w, rids[0], p.STATUS_OK, 0, None, None, b"late", 1.5)
    assert r.stats.late == 1 and len(sink.to_clients) == 2  # dropped, not forwarded
    assert [h[0] for h in sink.requests_to(b"w1")][-1] == p.REQUEST and len(sink.requests_to(b"w1")) == 3
    assert w.outstanding == 2 and set(w.expired) == {rids[1]}
    sink.replies()  # never two replies to one request


def test_a_lost_worker_does_not_answer_again_what_the_broker_already_timed_out() -> None:
    r, sink = make()
    w = ready(r, b"w1", capacity=1)
    send(r, 1, 0.0, timeout_ms=1000)
    r.expire(1.01)
    assert statuses(sink) == [p.STATUS_TIMEOUT] and "worker held" in last_message(sink)
    r.remove_worker(w, "test", 2.0)
    assert statuses(sink) == [p.STATUS_TIMEOUT] and r.n_inflight == 0
    sink.replies()


def test_a_worker_that_never_replies_pins_no_payload_and_at_most_its_capacity_in_records() -> None:
    r, sink = make(max_capacity=8, max_client_requests=100_000)
    w = r.worker_ready(b"w1", p.Ready("svc", 2**19, 1, {"instance": "w1"}), 0.0)
    assert w.capacity == 8  # clamped to --max-capacity
    refs = [weakref.ref(send(r, i, i / 100.0, timeout_ms=1000)) for i in range(1, 2001)]
    r.expire(100.0)
    assert all(ref() is None for ref in refs)
    assert len(w.inflight) + len(w.expired) == 8 and r.services["svc"].queue.held() == 0
    assert len(sink.replies()) == 2000


def test_a_worker_holding_its_byte_bound_gets_nothing_new_even_after_the_broker_timed_them_out() -> None:
    """A worker that does not read its socket keeps what was sent to it in the broker's send
    queue: payload bytes count against it until it replies, not only until the deadline."""
    r, sink = make(max_worker_bytes=10_000)
    w = ready(r, b"w1", capacity=100)
    for i in range(1, 7):
        send(r, i, 0.0, timeout_ms=1000 if i <= 3 else 5000)
    rids = [h[1] for h in sink.requests_to(b"w1")]
    assert len(rids) == 3 and w.held_bytes == 3 * 4096 and len(r.services["svc"].queue) == 3
    r.expire(1.01)
    assert statuses(sink) == [p.STATUS_TIMEOUT] * 3 and w.held_bytes == 3 * 4096
    assert len(sink.requests_to(b"w1")) == 3  # still nothing new
    r.worker_reply(w, rids[0], p.STATUS_OK, 0, None, None, b"late", 2.0)
    assert len(sink.requests_to(b"w1")) == 4 and w.held_bytes == 3 * 4096  # freed, then one more sent


def test_capacity_updates_are_clamped_too() -> None:
    r, _ = make(max_capacity=4)
    w = ready(r, b"w1", capacity=2)
    r.worker_update(w, 1000, 1, 0.0)
    assert w.capacity == 4


def test_held_deadline_slots_stay_bounded_by_what_workers_hold() -> None:
    r, sink = make()
    w = ready(r, b"w1", capacity=2)
    send(r, 1, 0.0, timeout_ms=86_400_000)  # stuck for a day: the heap's head stays live
    for i in range(2, 20_002):
        send(r, i, 0.0)
        rid = sink.to_workers[-1][1][1]
        r.worker_reply(w, rid, p.STATUS_OK, 0, None, None, b"ok", 0.0)
        r.next_timer()  # as the broker's loop does every turn
    assert r._slotted <= 2 * r.n_inflight + 1024 + 1


# -- per-client bounds --------------------------------------------------------------------------


def test_a_client_past_its_request_bound_is_answered_overloaded_at_once_others_are_not() -> None:
    r, sink = make(max_client_requests=3)
    for i in range(1, 5):
        send(r, i, 0.0)
    assert statuses(sink) == [p.STATUS_OVERLOADED]
    assert sink.to_clients[-1][1][1] == 4 and "--max-client-requests 3" in last_message(sink)
    send(r, 5, 0.0, client=b"other")
    assert len(sink.to_clients) == 1
    w = ready(r, b"w1", capacity=1)
    rid = sink.requests_to(b"w1")[0][1]
    r.worker_reply(w, rid, p.STATUS_OK, 0, None, None, b"ok", 0.1)
    send(r, 6, 0.1)  # room again
    assert statuses(sink).count(p.STATUS_OVERLOADED) == 1


def test_a_client_past_its_byte_bound_is_answered_overloaded() -> None:
    r, sink = make(max_client_bytes=10_000)
    send(r, 1, 0.0, Payload(6000))
    send(r, 2, 0.0, Payload(6000))
    assert sink.to_clients[-1][1][1:3] == [2, p.STATUS_OVERLOADED] and "--max-client-bytes" in last_message(sink)
    send(r, 3, 0.0, Payload(4000))
    assert len(sink.to_clients) == 1 and r.clients[b"c"].bytes == 10_000


def test_refused_by_a_full_queue_gives_its_room_back_and_idle_clients_are_swept() -> None:
    r, sink = make(max_queue=1, grace=5.0)
    send(r, 1, 0.0)
    send(r, 2, 0.0)
    assert statuses(sink) == [p.STATUS_OVERLOADED] and r.clients[b"c"].requests == 1
    r.expire(5.0)
    r.tick(5.0, heartbeat=False)
    assert r.clients == {}


def test_a_client_flood_holds_at_most_its_bound_in_the_broker() -> None:
    r, sink = make(max_client_requests=1000, max_client_bytes=1 << 30)
    ready(r, b"w1", capacity=10)
    refs = [weakref.ref(send(r, i, 0.0)) for i in range(1, 150_001)]
    held = sum(ref() is not None for ref in refs)
    assert held == 1000 and r.clients[b"c"].requests == 1000
    assert statuses(sink).count(p.STATUS_OVERLOADED) == 149_000


# -- unread replies -----------------------------------------------------------------------------


class Tracker:
    def __init__(self) -> None:
        self.done = False


def test_unread_reply_bytes_are_bounded_and_confirmed_by_marks() -> None:
    u = UnreadReplies(max_bytes=1600)  # marks every 100 bytes
    trackers = []
    for _ in range(16):
        verdict = u.add(b"c", 100)
        assert verdict == 1  # every 100 bytes
        trackers.append(Tracker())
        u.track(b"c", trackers[-1])
    assert len(trackers) == 16 and u.unread(b"c") == 1600
    assert u.add(b"c", 101) == -1 and u.unread(b"c") == 1600  # past max_bytes + max_bytes / 16
    assert u.add(b"c", 100) == 1
    u.undo(b"c", 100)  # could not be queued after all
    for t in trackers[:10]:
        t.done = True
    assert u.unread(b"c") == 600 and u.add(b"c", 1100) >= 0
    assert u.add(b"other", 1600) >= 0  # per client


def test_small_replies_are_tracked_once_per_mark_and_records_are_bounded() -> None:
    u = UnreadReplies(max_bytes=16_000, max_clients=4)  # marks every 1,000 bytes
    tracked = sum(u.add(b"c", 10) for _ in range(99))
    assert tracked == 0
    assert u.add(b"c", 10) == 1  # the 1,000th byte
    for i in range(10):
        u.add(bytes([i]), 10)
    assert len(u) <= 4


# -- message sizes ------------------------------------------------------------------------------


class FakeDealer:
    def __init__(self) -> None:
        self.frames: list[Any] = []

    def send(self, frame: Any, flags: int = 0, copy: bool = True) -> None:
        self.frames.append(frame)


def test_a_worker_sends_an_oversize_reply_as_a_remote_error_instead() -> None:
    """The broker would drop the worker's connection for it (ZMQ_MAXMSGSIZE), losing everything
    the worker holds: the client gets RemoteError("MessageTooLarge") for that one request."""
    from zrouter.worker._connection import BrokerConnection

    conn = BrokerConnection("tcp://127.0.0.1:1", 0, max_message_size=10)
    sock = FakeDealer()
    conn.sock = sock  # type: ignore[assignment]
    conn.reply(p.encode_reply(7), b"x" * 10, 0.0)
    conn.reply(p.encode_reply(8), b"x" * 11, 0.0)
    assert sock.frames[:3] == [p.SIGNATURE, p.encode_reply(7), b"x" * 10]
    reply = p.decode_reply(sock.frames[4])
    assert (reply.rid, reply.status, reply.error_type) == (8, p.STATUS_REMOTE_ERROR, "MessageTooLarge")
    assert "11 bytes" in (reply.message or "") and sock.frames[5] == b""
    err = p.error_for_status(reply.status, reply.message, reply.error_type)
    assert type(err).__name__ == "RemoteError"
