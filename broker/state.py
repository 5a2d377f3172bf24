"""Broker state records: one request, one worker, one service and its wait queue. No I/O.

Pure logic: time is passed in, nothing here sleeps or touches a socket. The queue lives here,
beside the records it holds, so the two never import each other.

Requests in a service's wait queue (``ServiceQueue``): requests that find a free worker never
enter the queue, so the common path pays nothing for it. A queued request sits in an ordered
dict (dispatch order; removal from anywhere in O(1)) and in a heap keyed by when it must be
looked at again (its deadline, or the end of the unknown-service grace period), so expiring
costs O(log n) per request instead of a scan on every tick. A request answered while queued
leaves the order at once; its heap entry is skipped when popped, and the heap is rebuilt when
such stale entries outnumber live ones, so what a queue holds is bounded by what it has live.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Final

from zrouter import _speedups, limits, protocol
from zrouter.broker.counters import ServiceStats

if TYPE_CHECKING:
    from zrouter.broker.policies.base import Policy

__all__ = [
    "DONE", "INFLIGHT", "QUEUED", "ClientLoad", "PyClientLoad", "PyRequest", "PyService", "PyWorkerState", "Request",
    "Service", "ServiceQueue", "WorkerState",
]

# Request.state values: ints, because they are compared on every dispatch.
QUEUED: Final = 1
INFLIGHT: Final = 2
DONE: Final = 3


class ClientLoad:
    """What one client connection has in the broker: requests accepted and not yet answered
    (queued or held by a worker) and the sum of their payload sizes in bytes."""

    __slots__ = ("bytes", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0


class Request:
    """A request the broker has accepted and owes its client exactly one reply for."""

    __slots__ = (
        "accepted_at",
        "queued_at",
        "attempt",
        "client",
        "crid",
        "deadline",
        "expire_at",
        "flags",
        "key",
        "load",
        "payload",
        "rid",
        "sent_at",
        "service",
        "size",
        "state",
        "worker",
    )

    def __init__(
        self,
        client: bytes,
        crid: int,
        service: Service,
        deadline: float,
        attempt: int,
        flags: int,
        key: bytes | None,
        payload: Any,
        now: float = 0.0,
        size: int = 0,
        load: ClientLoad | None = None,
    ) -> None:
        self.accepted_at = now  # for zrouter_request_duration_seconds
        self.queued_at = now  # last time it entered the queue, for zrouter_queue_wait_seconds
        self.rid = 0  # the broker's id, new for every dispatch so a late reply cannot match
        self.client = client
        self.crid = crid  # the client's own id, echoed in the reply
        self.service = service
        self.deadline = deadline
        self.expire_at = deadline
        self.attempt = attempt
        self.flags = flags
        self.key = key
        self.payload = payload  # kept (a zmq.Frame, not copied) so a requeue can resend it; None once answered
        self.worker: WorkerState | None = None
        self.sent_at = 0.0
        self.state = 0
        self.size = size  # payload bytes, counted in ``load`` until the request is answered
        self.load = load


class WorkerState:
    """One connected worker as the broker sees it; also the policies' ``Endpoint``."""

    __slots__ = (
        "admin_weight",
        "base_weight",
        "beat_at",
        "capacity",
        "counted",
        "credit",
        "declared",
        "draining",
        "expired",
        "fd",
        "health_weight",
        "healthy",
        "heartbeat",
        "held_bytes",
        "ident",
        "in_policy",
        "inflight",
        "joined_at",
        "key",
        "latency_ewma",
        "last_seen",
        "max_bytes",
        "meta",
        "outstanding",
        "served",
        "service",
        "silence_limit",
        "slow_window",
        "weight",
    )

    def __init__(
        self,
        ident: bytes,
        service: Service,
        capacity: int,
        weight: int,
        meta: dict[str, str],
        now: float,
    ) -> None:
        self.ident = ident
        self.key = (meta.get("instance") or ident.hex()).encode()
        self.service = service
        self.capacity = capacity  # what the worker declared (READY, UPDATE)
        self.credit = capacity  # what the broker may have outstanding at it now (slow start)
        self.outstanding = 0
        # Payload bytes of what it holds (``expired`` included); no new work at ``max_bytes``.
        self.held_bytes = 0
        self.max_bytes = limits.MAX_WORKER_BYTES
        self.base_weight = weight  # what the worker declared (or Consul's Weights.Passing)
        self.health_weight: float | None = None  # Consul's say: None = no opinion / no Consul
        self.admin_weight: float | None = None  # an operator's override (PUT .../weight)
        self.weight = float(weight)  # effective: an operator's or Consul's say, then slow start
        self.joined_at = now
        self.slow_window = 0.0  # seconds of slow start, while it lasts (0: at full credit and weight)
        self.latency_ewma = 0.0  # s, for /status: EWMA of reply latency, LATENCY_ALPHA per reply
        self.last_seen = now
        self.draining = False
        self.healthy = True  # False while Consul says critical, maintenance or deregistered
        self.inflight: dict[int, Request] = {}
        # Requests answered TIMEOUT at their deadline while this worker held them (rid -> payload
        # bytes): their credits stay taken until it replies (the reply is dropped) or is lost.
        self.expired: dict[int, int] = {}
        self.in_policy = False
        self.counted = False  # included in its service's n_routable
        self.fd = -1
        self.silence_limit = 0.0  # seconds without a message before the broker gives up on it
        self.heartbeat = 1.0  # seconds between the broker's heartbeats to it: its declared interval
        self.beat_at = 0.0  # when the broker's next heartbeat to it is due
        self.declared: object = None  # the READY it registered with (UPDATE applied): a repeat is a no-op
        self.meta = meta
        self.served = 0

    @property
    def instance(self) -> str:
        return self.key.decode()

    def effective_weight(self) -> float:
        if self.admin_weight is not None:
            return self.admin_weight
        return float(self.base_weight) if self.health_weight is None else self.health_weight

    def routable(self) -> bool:
        """May take new work once it has a free credit."""
        return not self.draining and self.healthy and self.weight > 0

    def has_credit(self) -> bool:
        return self.outstanding < self.credit and self.held_bytes < self.max_bytes

    def eligible(self) -> bool:
        return self.has_credit() and not self.draining and self.healthy and self.weight > 0

    def __repr__(self) -> str:
        return f"<worker {self.instance} {self.service.name} {self.outstanding}/{self.capacity}>"


class Service:
    """A service name with its workers, its policy and its wait queue."""

    __slots__ = ("created_at", "n_routable", "name", "policy", "queue", "stats", "workers")

    def __init__(
        self, name: str, policy: Policy, queue: ServiceQueue, now: float, stats: ServiceStats | None = None
    ) -> None:
        self.name = name
        self.policy = policy
        self.queue = queue
        self.workers: dict[bytes, WorkerState] = {}
        self.created_at = now
        # Workers that could serve a request now or once they have a free credit; kept as a
        # count so deciding "unavailable" never scans the workers.
        self.n_routable = 0
        self.stats = stats or ServiceStats(name)  # counters for metrics; outlive this record


_SEQ: Final = itertools.count()  # heap tie-breaker: requests themselves are not comparable
# Stale heap entries (requests dispatched or answered since) a queue tolerates beyond its live
# ones before rebuilding the heap.
_SLACK: Final = 64


class ServiceQueue:
    """Requests of one service waiting for a worker with a free credit."""

    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self._order: OrderedDict[Request, None] = OrderedDict()
        self._timers: list[tuple[float, int, Request]] = []

    def __len__(self) -> int:
        return len(self._order)

    def __bool__(self) -> bool:
        return bool(self._order)

    def push(self, req: Request, now: float, grace_until: float | None = None) -> bool:
        """Append a new request; False (and nothing queued) when the queue is full.

        ``grace_until`` is set while the service has no routable worker: the request is then
        looked at again at that time, to be answered "unavailable" if still nobody serves it.
        """
        if len(self._order) >= self.maxlen:
            return False
        self._enqueue(req, grace_until)
        self._order[req] = None
        return True

    def push_front(self, req: Request, grace_until: float | None = None) -> None:
        """Requeue a request taken back from a lost worker: first in line, never refused,
        because the broker already accepted it."""
        self._enqueue(req, grace_until)
        self._order[req] = None
        self._order.move_to_end(req, last=False)

    def _enqueue(self, req: Request, grace_until: float | None) -> None:
        req.state = QUEUED
        req.worker = None
        at = req.deadline if grace_until is None or grace_until > req.deadline else grace_until
        req.expire_at = at
        timers = self._timers
        if len(timers) > 2 * len(self._order) + _SLACK:
            self._compact()
        heapq.heappush(timers, (at, next(_SEQ), req))

    def _compact(self) -> None:
        """Rebuild the heap from the live requests (each one's current timer only)."""
        self._timers = [(r.expire_at, next(_SEQ), r) for r in self._order]
        heapq.heapify(self._timers)

    def pop(self) -> Request | None:
        """The next request in dispatch order, or None."""
        if not self._order:
            return None
        req = self._order.popitem(last=False)[0]
        req.state = DONE  # the caller dispatches or answers it now
        return req

    def peek(self) -> Request | None:
        return next(iter(self._order), None)

    def next_timer(self) -> float | None:
        """When ``expire`` next has something to do (for the poll timeout)."""
        timers = self._timers
        while timers and (timers[0][2].state != QUEUED or timers[0][2].expire_at != timers[0][0]):
            heapq.heappop(timers)  # stale: dispatched, answered, or rescheduled since
        return timers[0][0] if timers else None

    def expire(self, now: float, unavailable: bool) -> list[tuple[Request, int]]:
        """Take out the requests that must be answered now, with the status to answer.

        A request past its deadline gets TIMEOUT. One whose grace period ended gets UNAVAILABLE
        if the service still has no routable worker, else waits on until its deadline. What is
        taken out has left the queue: the caller answers it and drops its payload.
        """
        out: list[tuple[Request, int]] = []
        timers = self._timers
        order = self._order
        while timers and timers[0][0] <= now:
            at, _, req = heapq.heappop(timers)
            if req.state != QUEUED or req.expire_at != at:
                continue
            if now >= req.deadline:
                status = protocol.STATUS_TIMEOUT
            elif unavailable:
                status = protocol.STATUS_UNAVAILABLE
            else:
                req.expire_at = req.deadline
                heapq.heappush(timers, (req.deadline, next(_SEQ), req))
                continue
            req.state = DONE
            del order[req]
            out.append((req, status))
        return out

    def start_grace(self, grace_until: float) -> None:
        """The service lost its last routable worker: every queued request is looked at again at
        ``grace_until`` (or sooner, if it was due sooner), like a request that arrives now, so
        all of them are answered together if nobody comes back. O(n): rebuilds the timer heap,
        which also sheds its stale entries."""
        timers = []
        for req in self._order:
            if grace_until < req.expire_at:
                req.expire_at = grace_until
            timers.append((req.expire_at, next(_SEQ), req))
        heapq.heapify(timers)
        self._timers = timers

    def drain_all(self) -> list[Request]:
        """Every queued request, in order, leaving the queue empty (broker shutdown)."""
        out = list(self._order)
        for req in out:
            req.state = DONE
        self._order.clear()
        self._timers.clear()
        return out

    def held(self) -> int:
        """Entries the queue's structures hold, live or stale (for tests of its bound)."""
        return len(self._order) + len(self._timers)


# The records above stay importable as PyRequest, PyClientLoad, PyWorkerState and PyService; when
# the compiled path runs, the names without Py are their twins (zrouter/_native/route.pyx: the same fields and
# constructor), which the compiled routing reads and writes at C speed. One kind of record per
# process: the router, the queue and the compiled path all make and take these.
PyRequest = Request
PyClientLoad = ClientLoad
PyWorkerState = WorkerState
PyService = Service
if _speedups.native():
    _route = _speedups.load_native("route")
    _route.set_stats_factory(ServiceStats)
    Request = _route.Request  # type: ignore[misc,assignment]
    ClientLoad = _route.ClientLoad  # type: ignore[misc,assignment]
    WorkerState = _route.WorkerState  # type: ignore[misc,assignment]
    Service = _route.Service  # type: ignore[misc,assignment]
