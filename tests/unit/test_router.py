"""The broker's routing core without sockets: credits, queueing, requeue, late replies,
drains, deadlines, grace and health, with time passed in."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest

from zrouter.broker.router import Router
from zrouter.broker.state import WorkerState
from zrouter import protocol as p

IDEM = p.FLAG_IDEMPOTENT


class Recorder:
    """A Sink that keeps what the router sends; ``dead`` workers are unreachable."""

    def __init__(self) -> None:
        self.to_workers: list[tuple[bytes, list[Any], Any]] = []
        self.to_clients: list[tuple[bytes, list[Any], Any]] = []
        self.dead: set[bytes] = set()

    def to_worker(self, ident: bytes, header: bytes, payload: Any) -> bool:
        if ident in self.dead:
            return False
        self.to_workers.append((ident, msgpack.unpackb(header), payload))
        return True

    def to_client(self, client: bytes, header: bytes, payload: Any) -> None:
        self.to_clients.append((client, msgpack.unpackb(header), payload))

    def requests_to(self, ident: bytes) -> list[list[Any]]:
        return [h for i, h, _ in self.to_workers if i == ident and h[0] == p.REQUEST]

    def replies(self) -> dict[int, list[Any]]:
        """client rid -> reply header; fails if any request got two replies."""
        out: dict[int, list[Any]] = {}
        for _, h, _ in self.to_clients:
            assert h[1] not in out, f"request {h[1]} answered twice"
            out[h[1]] = h
        return out


def make(policy: str = "least-outstanding", **kw: Any) -> tuple[Router, Recorder]:
    sink = Recorder()
    return Router(sink, default_policy=policy, rng=random.Random(1), **kw), sink


def ready(r: Router, ident: bytes, capacity: int = 1, weight: int = 1, now: float = 0.0,
          service: str = "svc") -> WorkerState:
    return r.worker_ready(ident, p.Ready(service, capacity, weight, {"instance": ident.decode()}), now)


def send(r: Router, crid: int, now: float = 0.0, timeout_ms: int = 10_000, flags: int = IDEM,
         service: str = "svc", attempt: int = 0) -> None:
    r.request(b"c", crid, service, timeout_ms, attempt, flags, None, f"payload{crid}".encode(), now)


def reply(r: Router, ident: bytes, worker_rid: int, now: float = 0.0) -> None:
    r.worker_reply(r.workers[ident], worker_rid, p.STATUS_OK, 0, None, None, b"ok", now)


def test_request_goes_to_a_ready_worker_and_reply_comes_back_with_the_client_id() -> None:
    r, sink = make()
    ready(r, b"w1")
    send(r, 42)
    [(ident, header, payload)] = sink.to_workers
    assert ident == b"w1" and header[0] == p.REQUEST and header[2] == "svc" and payload == b"payload42"
    assert 9_000 < header[3] <= 10_000  # the remaining time, in ms
    reply(r, b"w1", header[1])
    assert sink.replies()[42][:3] == [p.REPLY, 42, p.STATUS_OK]


def test_a_worker_never_holds_more_than_its_capacity() -> None:
    r, sink = make()
    w = ready(r, b"w1", capacity=2)
    for i in range(5):
        send(r, i)
    assert len(sink.requests_to(b"w1")) == 2 and w.outstanding == 2
    assert len(r.services["svc"].queue) == 3
    for step in range(5):
        rid = sink.requests_to(b"w1")[step][1]
        reply(r, b"w1", rid)
        assert w.outstanding <= 2
    assert set(sink.replies()) == set(range(5))


def test_full_queue_answers_overloaded_at_once() -> None:
    r, sink = make(max_queue=2)
    ready(r, b"w1")
    for i in range(4):
        send(r, i)  # 1 dispatched, 2 queued, 1 refused
    assert sink.replies()[3][2] == p.STATUS_OVERLOADED
    assert r.stats.overloaded == 1


def test_queued_request_past_its_deadline_gets_timeout_and_is_never_sent() -> None:
    r, sink = make()
    ready(r, b"w1")
    send(r, 1, timeout_ms=10_000)
    send(r, 2, timeout_ms=500)
    r.expire(0.6)
    assert sink.replies()[2][2] == p.STATUS_TIMEOUT
    reply(r, b"w1", sink.requests_to(b"w1")[0][1], now=0.7)
    assert [h[5] for h in sink.requests_to(b"w1")] == [IDEM]  # request 2 never went out
    assert len(sink.requests_to(b"w1")) == 1


def test_unknown_service_is_answered_unavailable_after_the_grace_period() -> None:
    r, sink = make(grace=1.0)
    send(r, 1, service="nobody")
    r.expire(0.99)
    assert sink.to_clients == []
    r.expire(1.0)
    assert sink.replies()[1][2] == p.STATUS_UNAVAILABLE
    assert "nobody" in sink.replies()[1][4]


def test_worker_arriving_within_the_grace_period_gets_the_request() -> None:
    r, sink = make(grace=1.0)
    send(r, 1)
    ready(r, b"w1", now=0.5)
    assert len(sink.requests_to(b"w1")) == 1
    r.expire(2.0)
    assert sink.to_clients == []


def test_lost_worker_requests_are_requeued_first_in_line_in_order() -> None:
    r, sink = make()
    w1 = ready(r, b"w1", capacity=3)
    for i in range(3):
        send(r, i)
    send(r, 3)  # queued behind
    assert w1.outstanding == 3
    r.remove_worker(w1, "test", 1.0)
    ready(r, b"w2", capacity=4, now=1.0)
    got = sink.requests_to(b"w2")
    assert [h[4] for h in got] == [1, 1, 1, 0]  # attempts went up for the requeued ones
    assert [p_ for i, _h, p_ in sink.to_workers if i == b"w2"] == [b"payload0", b"payload1", b"payload2", b"payload3"]
    assert r.stats.requeued == 3


def test_non_idempotent_request_of_a_lost_worker_gets_outcome_unknown() -> None:
    r, sink = make()
    w1 = ready(r, b"w1", capacity=2)
    ready(r, b"w2")
    w2 = r.workers[b"w2"]
    send(r, 1, flags=0)
    send(r, 2, flags=0)
    holder = w1 if w1.outstanding else w2
    r.remove_worker(holder, "killed", 1.0)
    lost = [rid for rid, h in sink.replies().items() if h[2] == p.STATUS_WORKER_LOST]
    assert lost and "outcome unknown" in sink.replies()[lost[0]][4]


def test_requeue_stops_when_the_retry_budget_is_spent() -> None:
    r, sink = make(max_attempts=2)
    w1 = ready(r, b"w1")
    send(r, 1)
    r.remove_worker(w1, "killed", 0.1)
    w2 = ready(r, b"w2", now=0.2)
    assert len(sink.requests_to(b"w2")) == 1
    r.remove_worker(w2, "killed", 0.3)
    assert sink.replies()[1][2] == p.STATUS_WORKER_LOST


def test_requeue_stops_when_the_deadline_passed() -> None:
    r, sink = make()
    w1 = ready(r, b"w1")
    send(r, 1, timeout_ms=100)
    r.remove_worker(w1, "killed", 0.2)
    assert sink.replies()[1][2] == p.STATUS_TIMEOUT


def test_late_reply_from_a_worker_given_up_on_is_dropped_and_client_sees_one_reply() -> None:
    r, sink = make()
    w1 = ready(r, b"w1")
    send(r, 1)
    old_rid = sink.requests_to(b"w1")[0][1]
    # w1 goes silent: the liveness check removes it, and w2 takes the request.
    ready(r, b"w2", now=0.0)
    r.workers[b"w2"].last_seen = 10.0
    r.tick(3.5, heartbeat=False)
    assert b"w1" not in r.workers
    new_rid = sink.requests_to(b"w2")[0][1]
    assert new_rid != old_rid
    # w1 comes back under the same connection and replies late: nothing matches.
    r.workers[b"w1"] = w1
    r.worker_reply(w1, old_rid, p.STATUS_OK, 0, None, None, b"late", 3.6)
    del r.workers[b"w1"]
    reply(r, b"w2", new_rid, now=3.7)
    assert len(sink.to_clients) == 1 and r.stats.late == 1


def test_unreachable_worker_is_removed_and_its_request_goes_elsewhere() -> None:
    r, sink = make("round-robin")
    ready(r, b"w1")
    ready(r, b"w2")
    sink.dead.add(b"w1")
    send(r, 1)
    send(r, 2)
    assert b"w1" not in r.workers
    assert len(sink.requests_to(b"w2")) == 1  # the other waits for w2's credit
    reply(r, b"w2", sink.requests_to(b"w2")[0][1])
    assert len(sink.requests_to(b"w2")) == 2


def test_draining_worker_gets_nothing_new_but_its_replies_still_flow() -> None:
    r, sink = make()
    w1 = ready(r, b"w1", capacity=4)
    send(r, 1)
    r.worker_drain(w1, 0.1)
    assert any(h == [p.DRAIN] for i, h, _ in sink.to_workers if i == b"w1")  # acknowledged
    send(r, 2)
    assert len(sink.requests_to(b"w1")) == 1
    reply(r, b"w1", sink.requests_to(b"w1")[0][1])
    assert sink.replies()[1][2] == p.STATUS_OK
    ready(r, b"w2", now=0.2)
    assert len(sink.requests_to(b"w2")) == 1


def test_unhealthy_worker_drains_and_recovers() -> None:
    r, sink = make()
    w1 = ready(r, b"w1", capacity=4)
    r.set_health(w1, False, None, 0.0)
    send(r, 1)
    assert sink.requests_to(b"w1") == []
    r.set_health(w1, True, None, 0.1)
    assert len(sink.requests_to(b"w1")) == 1


def test_health_weight_overrides_declared_weight() -> None:
    r, _ = make("weighted")
    w1 = ready(r, b"w1", weight=5)
    assert w1.weight == 5.0
    r.set_health(w1, True, 1.0, 0.0)
    assert w1.weight == 1.0
    r.set_health(w1, True, None, 0.0)
    assert w1.weight == 5.0


def test_liveness_removes_silent_workers_and_heartbeats_the_rest() -> None:
    r, sink = make(liveness_timeout=3.0)
    ready(r, b"w1", now=0.0)
    ready(r, b"w2", now=0.0)
    r.seen(b"w2", 2.0)
    r.tick(3.5)
    assert set(r.workers) == {b"w2"}
    assert [i for i, h, _ in sink.to_workers if h == [p.HEARTBEAT]] == [b"w2"]


def test_a_different_ready_on_the_same_connection_replaces_the_old_state() -> None:
    r, sink = make()
    ready(r, b"w1")
    send(r, 1)
    ready(r, b"w1", capacity=2, now=0.5)
    # The request held under the old registration is requeued to the new one.
    assert [h[4] for h in sink.requests_to(b"w1")] == [0, 1]
    assert r.workers[b"w1"].capacity == 2


def test_shutdown_answers_queued_and_refuses_new() -> None:
    r, sink = make()
    send(r, 1)
    r.shutdown()
    send(r, 2)
    replies = sink.replies()
    assert replies[1][2] == p.STATUS_UNAVAILABLE and replies[2][2] == p.STATUS_UNAVAILABLE


def test_unknown_policy_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        make("fastest-please")


@pytest.mark.parametrize("policy", ["least-outstanding", "round-robin", "random", "weighted",
                                    "weighted-least-outstanding", "p2c-ewma", "consistent-hash"])
def test_every_policy_keeps_credits_and_answers_each_request_once(policy: str) -> None:
    """A random storm of requests, replies, joins and losses: capacities hold, and every
    request gets exactly one reply."""
    r, sink = make(policy, max_queue=1000)
    rng = random.Random(7)
    caps = {}
    now = 0.0
    next_crid = 0
    for n in range(4):
        ident = f"w{n}".encode()
        caps[ident] = rng.randint(1, 3)
        ready(r, ident, capacity=caps[ident], weight=rng.randint(1, 3))
    for _ in range(2000):
        now += 0.001
        action = rng.random()
        if action < 0.5:
            send(r, next_crid, now=now)
            next_crid += 1
        elif action < 0.95 and r.workers:
            w = rng.choice(list(r.workers.values()))
            if w.inflight:
                reply(r, w.ident, rng.choice(list(w.inflight)), now=now)
        elif r.workers and len(r.workers) > 1:
            r.remove_worker(rng.choice(list(r.workers.values())), "chaos", now)
        else:
            ident = f"w{rng.randint(10, 99)}".encode()
            caps[ident] = 2
            ready(r, ident, capacity=2, now=now)
        for w in r.workers.values():
            assert w.outstanding == len(w.inflight) <= w.capacity
        assert r.n_inflight == sum(w.outstanding for w in r.workers.values())
    while any(w.inflight for w in r.workers.values()) or any(s.queue for s in r.services.values()):
        now += 0.001
        for w in list(r.workers.values()):
            for rid in list(w.inflight):
                reply(r, w.ident, rid, now=now)
    assert set(sink.replies()) == set(range(next_crid))


def test_each_worker_is_judged_by_the_heartbeat_interval_it_declares() -> None:
    r, _ = make(liveness_timeout=0.6, liveness=3)  # the broker's own interval: 0.2 s
    for name, ms in [("slow", 1000), ("same", 200)]:
        r.worker_ready(name.encode(), p.decode_ready(p.encode_ready("svc", 1, 1, {"instance": name, "heartbeat_ms": str(ms)})), 0.0)
    r.tick(2.0, heartbeat=False)
    assert set(r.workers) == {b"slow"}
    r.tick(3.1, heartbeat=False)
    assert r.workers == {}


def test_replies_report_latency_to_the_policy_and_a_lost_worker_is_forgotten() -> None:
    """The completion hook: the router tells the policy each reply's latency (it keeps no EWMA
    of its own) and tells it when a worker is gone for good."""
    from zrouter.broker.policies.p2c_ewma import P2CEwma

    r, sink = make("p2c-ewma")
    w = ready(r, b"w1", capacity=1)
    policy = r.services["svc"].policy
    assert isinstance(policy, P2CEwma)
    send(r, 1, now=1.0)
    reply(r, b"w1", sink.requests_to(b"w1")[0][1], now=1.25)  # full until this reply
    assert policy.latency.ewma(w) == pytest.approx(0.25)
    r.remove_worker(w, "test", 2.0)
    assert len(policy.latency) == 0
