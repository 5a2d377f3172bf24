"""The router's part in surviving peers (issues 7 and 8): a worker is its connection, heartbeats
at each worker's own interval, one answer when the last worker goes, shutdown notices. Time is
passed in; no sockets, no sleeps."""

from __future__ import annotations

import pytest

from tests.unit.test_router import IDEM, make, reply, send
from zrouter import protocol as p
from zrouter.broker.router import Refused, Router
from zrouter.broker.state import WorkerState


def _ready(r: Router, ident: bytes, now: float, instance: str | None = None, hb_ms: int | None = None,
           capacity: int = 1) -> WorkerState:
    meta = {"instance": instance or ident.decode()}
    if hb_ms is not None:
        meta["heartbeat_ms"] = str(hb_ms)
    return r.worker_ready(ident, p.decode_ready(p.encode_ready("svc", capacity, 1, meta)), now)


def _beats(sink: object, ident: bytes) -> int:
    return sum(1 for i, h, _ in sink.to_workers if i == ident and h == [p.HEARTBEAT])  # type: ignore[attr-defined]


# -- a worker is its connection ------------------------------------------------------------------


def test_a_ready_identical_to_the_registration_changes_nothing() -> None:
    r, sink = make()
    w = _ready(r, b"w1", 0.0, capacity=2)
    send(r, 1)
    _ready(r, b"w1", 0.5, capacity=2)
    assert r.workers[b"w1"] is w and len(w.inflight) == 1 and r.stats.requeued == 0
    assert len(sink.requests_to(b"w1")) == 1 and w.last_seen == 0.5
    [(rid, _)] = w.inflight.items()
    reply(r, b"w1", rid, now=0.6)
    assert sink.replies()[1][2] == p.STATUS_OK


def test_an_update_is_part_of_the_registration_a_repeated_ready_is_compared_with() -> None:
    r, _ = make()
    w = _ready(r, b"w1", 0.0, capacity=2)
    r.worker_update(w, 1, 1, 0.1)
    _ready(r, b"w1", 0.2, capacity=2)  # differs from the current registration (capacity 1)
    assert r.workers[b"w1"] is not w and r.workers[b"w1"].capacity == 2


def test_ready_naming_a_live_connections_instance_is_refused_and_evicts_nothing() -> None:
    r, sink = make(liveness_timeout=3.0)  # broker interval 1 s
    w = _ready(r, b"real", 0.0, instance="echo-1", hb_ms=300)
    send(r, 1, flags=0)  # not idempotent: an eviction would fail it
    for n in range(20):  # the attack: READY with the victim's instance every 0.3 s
        now = 0.3 * n
        r.seen(b"real", now)
        with pytest.raises(Refused) as info:
            _ready(r, f"thief{n}".encode(), now + 0.01, instance="echo-1")
        assert info.value.kind == "instance_in_use" and "echo-1" in str(info.value)
    assert r.workers == {b"real": w} and r.by_instance["echo-1"] is w and len(w.inflight) == 1
    assert sink.replies() == {}


def test_a_worker_back_on_a_new_connection_takes_its_place_at_once() -> None:
    r, sink = make(liveness_timeout=3.0)
    old = _ready(r, b"c1", 0.0, instance="echo-1", hb_ms=200)
    send(r, 1)
    # Its old connection closed (the broker saw it): the new one is simply a new worker.
    r.remove_worker(old, "connection closed", 0.1)
    new = _ready(r, b"c2", 0.15, instance="echo-1", hb_ms=200)
    assert r.by_instance["echo-1"] is new and len(new.inflight) == 1  # the requeued request
    # Its old connection went silent without the broker seeing it close (a partition): silent
    # for two of its intervals is enough for the same instance to take its place.
    r.seen(b"c2", 1.0)
    newer = _ready(r, b"c3", 1.41, instance="echo-1", hb_ms=200)
    assert set(r.workers) == {b"c3"} and r.by_instance["echo-1"] is newer
    assert [h[4] for h in sink.requests_to(b"c3")] == [2]  # attempt 2: it went c1, c2, c3


def test_ready_is_refused_while_shutting_down() -> None:
    r, _ = make()
    r.shutdown(0.0)
    with pytest.raises(Refused) as info:
        _ready(r, b"w1", 0.1)
    assert info.value.kind is None and "shutting down" in str(info.value)


# -- heartbeats negotiate ------------------------------------------------------------------------


def test_each_worker_is_heartbeated_at_its_own_interval() -> None:
    r, sink = make(liveness_timeout=3.0, liveness=3)  # broker interval 1 s
    for ident, ms in [(b"fast", 10), (b"quarter", 250), (b"slow", 5000)]:
        _ready(r, ident, 0.0, hb_ms=ms)
    _ready(r, b"silent", 0.0)  # declares nothing: the broker's interval
    assert r.next_heartbeat() == pytest.approx(0.01)
    for ms in range(1, 2001):
        now = ms / 1000
        for ident in (b"fast", b"quarter", b"slow", b"silent"):
            r.seen(ident, now)
        if ms % 1000 == 0:
            r.tick(now)
        else:
            r.send_heartbeats(now)
        nxt = r.next_heartbeat()
        assert nxt is not None and nxt > now
    assert 199 <= _beats(sink, b"fast") <= 200  # (float steps: the 200th may fall just after 2 s)
    assert _beats(sink, b"quarter") == 8
    assert _beats(sink, b"slow") == 0
    assert _beats(sink, b"silent") == 2
    assert set(r.workers) == {b"fast", b"quarter", b"slow", b"silent"}  # nobody judged silent


@pytest.mark.parametrize("ms", [10, 250, 1000, 60_000])
def test_silence_is_judged_by_the_declared_interval(ms: int) -> None:
    r, _ = make(liveness_timeout=3.0, liveness=3)
    _ready(r, b"w", 0.0, hb_ms=ms)
    limit = 3 * ms / 1000
    r.tick(limit * 0.99, heartbeat=False)
    assert b"w" in r.workers
    r.tick(limit * 1.01, heartbeat=False)
    assert b"w" not in r.workers


def test_a_late_loop_sends_one_heartbeat_not_a_burst() -> None:
    r, sink = make()
    _ready(r, b"w", 0.0, hb_ms=10)
    r.send_heartbeats(1.0)  # the loop was away for 100 intervals
    assert _beats(sink, b"w") == 1 and r.next_heartbeat() == pytest.approx(1.01)


def test_an_unreachable_worker_is_removed_when_its_heartbeat_fails() -> None:
    r, sink = make()
    _ready(r, b"w", 0.0, hb_ms=10)
    sink.dead.add(b"w")
    r.send_heartbeats(0.02)
    assert r.workers == {} and r.next_heartbeat() is None


def test_the_heartbeat_schedule_stays_bounded_under_ready_churn() -> None:
    r, _ = make()
    _ready(r, b"stays", 0.0, hb_ms=60_000)
    for n in range(20_000):
        w = _ready(r, f"w{n}".encode(), n * 1e-4, hb_ms=60_000)
        r.remove_worker(w, "churn", n * 1e-4)
    assert len(r._beats) <= 2 * len(r.workers) + 65
    assert r.next_heartbeat() == pytest.approx(60.0)


# -- one situation, one answer -------------------------------------------------------------------


def test_last_worker_lost_answers_held_and_queued_requests_together_at_the_end_of_grace() -> None:
    r, sink = make(grace=1.0, max_queue=100)
    w = _ready(r, b"w", 0.0, capacity=1)
    for crid in range(1, 6):
        send(r, crid, now=0.0, timeout_ms=30_000)  # 1 held, 4 queued behind it
    r.remove_worker(w, "connection closed", 2.0)
    assert sink.replies() == {}
    assert r.next_timer() == pytest.approx(3.0)
    r.expire(2.99)
    assert sink.replies() == {}
    r.expire(3.0)
    replies = sink.replies()
    assert sorted(replies) == [1, 2, 3, 4, 5]
    assert {h[2] for h in replies.values()} == {p.STATUS_UNAVAILABLE}


def test_a_worker_back_within_the_grace_serves_the_queued_requests() -> None:
    r, sink = make(grace=1.0, max_queue=100)
    w = _ready(r, b"w", 0.0, capacity=1)
    for crid in range(1, 4):
        send(r, crid, now=0.0, timeout_ms=30_000)
    r.remove_worker(w, "connection closed", 2.0)
    _ready(r, b"w2", 2.5, capacity=3)
    r.expire(3.5)
    assert sink.replies() == {}
    assert len(sink.requests_to(b"w2")) == 3


def test_a_request_due_before_the_grace_ends_keeps_its_deadline() -> None:
    r, sink = make(grace=1.0)
    w = _ready(r, b"w", 0.0, capacity=1)
    send(r, 1, now=0.0)
    send(r, 2, now=0.0, timeout_ms=2300)
    r.remove_worker(w, "connection closed", 2.0)
    r.expire(2.3)
    assert sink.replies()[2][2] == p.STATUS_TIMEOUT and 1 not in sink.replies()


def test_the_last_worker_draining_starts_the_grace_for_the_queue() -> None:
    r, sink = make(grace=1.0)
    w = _ready(r, b"w", 0.0, capacity=1)
    send(r, 1, now=0.0)
    send(r, 2, now=0.0, timeout_ms=60_000)
    r.worker_drain(w, 1.0)
    r.expire(2.0)
    assert sink.replies()[2][2] == p.STATUS_UNAVAILABLE and 1 not in sink.replies()


# -- shutdown ------------------------------------------------------------------------------------


def test_shutdown_tells_idle_workers_at_once_and_busy_ones_at_exit() -> None:
    r, sink = make()
    _ready(r, b"idle", 0.0)
    busy = _ready(r, b"busy", 0.0)
    send(r, 1, flags=IDEM)
    assert len(busy.inflight) == 1 or len(r.workers[b"idle"].inflight) == 1
    holder = b"busy" if busy.inflight else b"idle"
    other = b"idle" if holder == b"busy" else b"busy"
    r.shutdown(1.0)
    bye = [i for i, h, _ in sink.to_workers if h == [p.DISCONNECT, "shutting down"]]
    assert bye == [other] and set(r.workers) == {holder}
    r.abandon_inflight()
    r.disconnect_all()
    bye = [i for i, h, _ in sink.to_workers if h == [p.DISCONNECT, "shutting down"]]
    assert sorted(bye) == sorted([other, holder])


def test_bad_messages_are_counted_per_port_and_kind() -> None:
    r, _ = make()
    r.count_bad("frontend", "field")
    r.count_bad("frontend", "field")
    r.count_bad("backend", "not_msgpack")
    assert r.bad_messages == {("frontend", "field"): 2, ("backend", "not_msgpack"): 1}
