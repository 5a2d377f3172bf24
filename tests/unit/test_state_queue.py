"""The per-service queue: bound, FIFO order, requeue at the front, deadlines and grace, with
time passed in."""

from __future__ import annotations

from zrouter.broker.policies.base import make_policy
from zrouter.broker.state import ServiceQueue
from zrouter.broker.state import Request, Service
from zrouter import protocol as p


def _svc() -> Service:
    return Service("svc", make_policy("round-robin"), ServiceQueue(3), 0.0)


def _req(svc: Service, crid: int, deadline: float = 10.0) -> Request:
    return Request(b"client", crid, svc, deadline, 0, p.FLAG_IDEMPOTENT, None, b"")


def test_fifo_and_bound() -> None:
    svc = _svc()
    q = svc.queue
    assert [q.push(_req(svc, i), 0.0) for i in range(4)] == [True, True, True, False]
    assert len(q) == 3
    assert [q.pop().crid for _ in range(3)] == [0, 1, 2]  # type: ignore[union-attr]
    assert q.pop() is None and len(q) == 0


def test_requeue_goes_first_and_is_never_refused() -> None:
    svc = _svc()
    q = svc.queue
    for i in range(3):
        q.push(_req(svc, i), 0.0)
    q.push_front(_req(svc, 99))
    assert len(q) == 4  # over the bound: it was accepted before
    assert q.peek().crid == 99  # type: ignore[union-attr]
    assert [q.pop().crid for _ in range(4)] == [99, 0, 1, 2]  # type: ignore[union-attr]


def test_deadline_expiry_answers_timeout_and_skips_in_pop() -> None:
    svc = _svc()
    q = svc.queue
    q.push(_req(svc, 1, deadline=5.0), 0.0)
    q.push(_req(svc, 2, deadline=2.0), 0.0)
    assert q.next_timer() == 2.0
    assert q.expire(1.9, unavailable=False) == []
    out = q.expire(2.0, unavailable=False)
    assert [(r.crid, s) for r, s in out] == [(2, p.STATUS_TIMEOUT)]
    assert len(q) == 1
    assert q.pop().crid == 1  # type: ignore[union-attr]


def test_grace_ends_unavailable_if_nobody_serves() -> None:
    svc = _svc()
    q = svc.queue
    q.push(_req(svc, 1, deadline=10.0), 0.0, grace_until=1.0)
    assert q.next_timer() == 1.0
    out = q.expire(1.0, unavailable=True)
    assert [(r.crid, s) for r, s in out] == [(1, p.STATUS_UNAVAILABLE)]


def test_grace_end_with_workers_present_waits_until_the_deadline() -> None:
    svc = _svc()
    q = svc.queue
    q.push(_req(svc, 1, deadline=10.0), 0.0, grace_until=1.0)
    assert q.expire(1.0, unavailable=False) == []
    assert q.next_timer() == 10.0 and len(q) == 1
    assert [(r.crid, s) for r, s in q.expire(10.0, unavailable=False)] == [(1, p.STATUS_TIMEOUT)]


def test_grace_never_extends_past_the_deadline() -> None:
    svc = _svc()
    q = svc.queue
    q.push(_req(svc, 1, deadline=0.5), 0.0, grace_until=1.0)
    assert q.next_timer() == 0.5
    assert [s for _, s in q.expire(0.5, unavailable=True)] == [p.STATUS_TIMEOUT]


def test_popped_request_leaves_no_timer_behind() -> None:
    svc = _svc()
    q = svc.queue
    q.push(_req(svc, 1, deadline=5.0), 0.0)
    q.pop()
    assert q.next_timer() is None
    assert q.expire(100.0, unavailable=True) == []


def test_drain_all_empties_in_order() -> None:
    svc = _svc()
    q = svc.queue
    for i in range(3):
        q.push(_req(svc, i), 0.0)
    assert [r.crid for r in q.drain_all()] == [0, 1, 2]
    assert len(q) == 0 and q.next_timer() is None


def test_expired_requests_leave_the_order_at_once() -> None:
    svc = _svc()
    q = svc.queue
    q.push(_req(svc, 1, deadline=1.0), 0.0)
    q.push(_req(svc, 2, deadline=5.0), 0.0)
    q.expire(1.0, unavailable=False)
    assert len(q) == 1 and q.held() == 2  # one in order, one timer: nothing of request 1
    assert q.peek().crid == 2  # type: ignore[union-attr]


def test_timers_of_dispatched_requests_stay_bounded_by_the_live_ones() -> None:
    svc = Service("svc", make_policy("round-robin"), ServiceQueue(10), 0.0)
    q = svc.queue
    for i in range(10_000):
        q.push(_req(svc, i, deadline=86_400.0), 0.0)  # deadlines far off: never popped by time
        q.pop()
    assert q.held() <= 64 + 2
