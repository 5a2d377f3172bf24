"""The broker's routing core, without sockets: accept, dispatch, requeue, expire, heartbeat.

Every method takes ``now`` (a monotonic time in seconds) and sends through a ``Sink``, so the
whole life of a request (credits, requeue when a worker is lost, deadlines, the unknown-service
grace period, drains) is unit-tested without sockets or sleeps. ``zrouter.broker.server`` feeds it from
the ZeroMQ sockets. The request path is here; the router's clock (heartbeats, deadlines,
slow-start ramps) is mixed in from ``router_timers``, workers joining and leaving from
``router_members``, its control surface (authorization, health, operator actions, shutdown) from
``router_admin``, and the types they share are in ``router_types``.

Invariants the tests check:
- a worker never holds more than its capacity;
- every accepted request gets exactly one reply: from its worker, or an error from here;
- a late reply (from a worker the request was taken back from) matches nothing and is dropped,
  because every dispatch gets a fresh broker-side request id.
"""

from __future__ import annotations

import itertools
import logging
import random
from bisect import bisect_left
from collections.abc import Callable, Mapping
from typing import Any, Final

import msgpack

from zrouter.broker.policies.base import make_policy
from zrouter.broker.router_admin import Admin
from zrouter.broker.router_members import Membership
from zrouter.broker.router_timers import Timers
from zrouter.broker.router_types import SLOTS_PER_S, Access, Refused, Sink, Stats
from zrouter.broker.counters import BOUNDS, LATENCY_ALPHA, MAX_SERVICES, OTHER_SERVICE, ServiceStats
from zrouter.broker.state import ServiceQueue
from zrouter.broker.state import DONE, INFLIGHT, ClientLoad, Request, Service, WorkerState
from zrouter import _speedups, limits, protocol

__all__ = ["Access", "Refused", "Router", "Sink", "Stats", "routes"]

log = logging.getLogger("zrouter.broker")

_packb: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack
_REQUEST: Final = protocol.REQUEST
_REPLY: Final = protocol.REPLY
_IDEMPOTENT: Final = protocol.FLAG_IDEMPOTENT
_STATUS_OK: Final = protocol.STATUS_OK
_OVERLOADED: Final = protocol.STATUS_OVERLOADED
# libzmq receives messages of up to its 8 KiB read batch (ZMQ_IN_BATCH_SIZE) into one shared
# buffer of ~18 KiB (the bytes and a reference count per possible message): one such payload kept
# keeps the whole buffer. A payload this small that has to wait in a queue is copied out first,
# so a queued request costs its own size, not the buffer's.
_COMPACT_BELOW: Final = 8192


class Router(Membership, Timers, Admin):
    """Workers, services and in-flight requests of one broker."""

    def __init__(
        self,
        sink: Sink,
        *,
        default_policy: str = "least-outstanding",
        service_policies: Mapping[str, str] | None = None,
        max_queue: int = 10_000,
        max_attempts: int = 3,
        grace: float = 1.0,
        liveness_timeout: float = 3.0,
        liveness: int = 3,
        rng: random.Random | None = None,
        slow_start: float = 0.0,
        service_slow_start: Mapping[str, float] | None = None,
        max_services: int = limits.MAX_SERVICES,
        max_client_requests: int = limits.MAX_CLIENT_REQUESTS,
        max_client_bytes: int = limits.MAX_CLIENT_BYTES,
        max_capacity: int = limits.MAX_CAPACITY,
        max_worker_bytes: int = limits.MAX_WORKER_BYTES,
    ) -> None:
        self.sink = sink
        self.default_policy = default_policy
        self.service_policies = dict(service_policies or {})
        for name in (default_policy, *self.service_policies.values()):
            make_policy(name)  # fail at start-up, not on the first request, for a typo
        self.max_queue = max_queue
        self.max_attempts = max_attempts
        self.grace = grace
        self.liveness_timeout = liveness_timeout
        self.liveness = liveness
        self.rng = rng or random.Random()
        # Slow start window (s) of new workers, by service (zrouter.broker.slow_start); 0 = off.
        self.slow_start = slow_start
        self.service_slow_start = dict(service_slow_start or {})
        self._ramping: dict[bytes, WorkerState] = {}  # workers in their slow start, by ident
        # Memory bounds (zrouter.limits).
        self.max_services = max_services
        self.max_client_requests = max_client_requests
        self.max_client_bytes = max_client_bytes
        self.max_capacity = max_capacity
        self.max_worker_bytes = max_worker_bytes
        self.clients: dict[bytes, ClientLoad] = {}  # client routing id -> what it has here
        # Every request a worker holds, by deadline slot: at the deadline the broker answers
        # TIMEOUT itself. Slot numbers in a heap, slots in a dict (see router_types.SLOTS_PER_S).
        self._slots: dict[int, list[Request]] = {}
        self._slot_heap: list[int] = []
        self._slotted = 0  # entries in all slots, live or stale
        self.services: dict[str, Service] = {}
        self.workers: dict[bytes, WorkerState] = {}
        self.by_instance: dict[str, WorkerState] = {}
        self.stats = Stats()
        self._next_rid = 1
        self.n_inflight = 0  # requests held by workers, kept as a count: the loop asks every turn
        self.accepting = True
        # Called with each new worker before it can take work: Consul's verdict applies first.
        self.on_join: Callable[[WorkerState, float], None] | None = None
        # Metrics (zrouter.broker.metrics reads them on this thread): per service name, bounded
        # by MAX_SERVICES; bad messages by (port, kind), kinds being a fixed set of words.
        self.service_stats: dict[str, ServiceStats] = {}
        self.bad_messages: dict[tuple[str, str], int] = {}
        # CURVE brokers: who may serve what, and each worker's key (to re-check on reload).
        self.access: Access | None = None
        self.worker_keys: dict[bytes, str] = {}
        # Heartbeats to workers, each at its own interval: (due, seq, worker), stale entries
        # (worker gone or rescheduled) skipped when popped and shed when they outnumber the live.
        self._beats: list[tuple[float, int, WorkerState]] = []
        self._beat_seq = itertools.count()

    # -- services ---------------------------------------------------------------------------

    def service(self, name: str, now: float) -> Service:
        svc = self.services.get(name)
        if svc is None:
            policy = make_policy(self.service_policies.get(name, self.default_policy), self.rng)
            svc = self.services[name] = Service(name, policy, ServiceQueue(self.max_queue), now,
                                                self.stats_for(name))
        return svc

    # -- metrics ----------------------------------------------------------------------------

    def stats_for(self, name: str) -> ServiceStats:
        """The counters of service ``name`` (those of ``OTHER_SERVICE`` past MAX_SERVICES names)."""
        st = self.service_stats.get(name)
        if st is None:
            if len(self.service_stats) >= MAX_SERVICES:
                name = OTHER_SERVICE
                st = self.service_stats.get(name)
            if st is None:
                st = self.service_stats[name] = ServiceStats(name)
        return st

    def count_status(self, service: str, status: int) -> None:
        """A reply answered before a request reached the router (bad request, too large)."""
        self.stats_for(service).count(status)

    def count_bad(self, port: str, kind: str) -> None:
        """A malformed or unexpected message on ``port`` ("frontend"/"backend")."""
        key = (port, kind)
        self.bad_messages[key] = self.bad_messages.get(key, 0) + 1

    # -- clients ----------------------------------------------------------------------------

    def request(
        self,
        client: bytes,
        crid: int,
        service: str,
        timeout_ms: int,
        attempt: int,
        flags: int,
        key: bytes | None,
        payload: Any,
        now: float,
    ) -> None:
        """A client's request: dispatch it now, queue it, or refuse it with a reply.

        Refused at once: OVERLOADED past the client's bounds (``max_client_requests`` accepted
        and unanswered, or ``max_client_bytes`` of their payloads) or past the service's queue
        bound; UNAVAILABLE when shutting down, or for a service this broker does not know while
        it already keeps ``max_services``.
        """
        if not self.accepting:
            self.count_status(service, protocol.STATUS_UNAVAILABLE)
            self.answer(client, crid, protocol.STATUS_UNAVAILABLE, "broker is shutting down")
            return
        load = self.clients.get(client)
        if load is None:
            load = self.clients[client] = ClientLoad()
        size = len(payload)
        if load.requests >= self.max_client_requests or load.bytes + size > self.max_client_bytes:
            self.stats.overloaded += 1
            self.count_status(service, _OVERLOADED)
            self.answer(client, crid, _OVERLOADED, self._client_full(load, size))
            return
        svc = self.services.get(service)
        if svc is None:
            if len(self.services) >= self.max_services:
                self.stats.unavailable += 1
                self.count_status(service, protocol.STATUS_UNAVAILABLE)
                self.answer(client, crid, protocol.STATUS_UNAVAILABLE,
                            f"no worker serves service {service}, and this broker already keeps "
                            f"{len(self.services)} services (--max-services)")
                return
            svc = self.service(service, now)
        req = Request(client, crid, svc, now + timeout_ms / 1000.0, attempt, flags, key, payload, now, size, load)
        load.requests += 1
        load.bytes += size
        self.stats.accepted += 1
        if not svc.queue:
            w = svc.policy.pick(key)
            if w is not None:
                svc.stats.wait.buckets[0] += 1  # waited 0 s: sum unchanged
                self._dispatch(req, w, now)  # type: ignore[arg-type]
                return
        self._enqueue(req, now)

    def _enqueue(self, req: Request, now: float) -> None:
        """An accepted request no worker can take now: into its service's queue, or OVERLOADED
        when the queue is full."""
        svc = req.service
        grace_until = None if svc.n_routable else now + self.grace
        if req.size <= _COMPACT_BELOW:
            data = getattr(req.payload, "bytes", None)  # a zmq.Frame: its own copy (pyzmq's Frame.bytes)
            if data is not None:
                req.payload = data
        if not svc.queue.push(req, now, grace_until):
            self.stats.overloaded += 1
            self._release(req)
            svc.stats.counts[protocol.STATUS_OVERLOADED] += 1
            self.answer(req.client, req.crid, protocol.STATUS_OVERLOADED, f"the queue of service {svc.name} is full")

    def _client_full(self, load: ClientLoad, size: int) -> str:
        if load.requests >= self.max_client_requests:
            return (f"this client already has {load.requests} requests in this broker "
                    f"(--max-client-requests {self.max_client_requests}); read replies before sending more")
        return (f"this client's requests in this broker already hold {load.bytes} bytes; {size} more would pass "
                f"--max-client-bytes {self.max_client_bytes}")

    def answer(self, client: bytes, crid: int, status: int, message: str) -> None:
        self.sink.to_client(client, protocol.encode_reply(crid, status, 0, message), b"")

    @staticmethod
    def _release(req: Request) -> None:
        """The request is answered: its client may use the room, and its payload is freed."""
        load = req.load
        if load is not None:
            req.load = None
            load.requests -= 1
            load.bytes -= req.size
        req.payload = None

    def _fail(self, req: Request, status: int, message: str, now: float | None = None) -> None:
        """Answer ``req`` with an error; ``now`` (None at shutdown) times it for the metrics."""
        req.state = DONE
        self._release(req)
        if status == protocol.STATUS_TIMEOUT:
            self.stats.timeouts += 1
        elif status == protocol.STATUS_UNAVAILABLE:
            self.stats.unavailable += 1
        elif status == protocol.STATUS_WORKER_LOST:
            self.stats.lost += 1
        st = req.service.stats
        st.counts[status] += 1
        if now is not None:
            st.duration.observe(now - req.accepted_at)
        self.answer(req.client, req.crid, status, message)

    def _dispatch(self, req: Request, w: WorkerState, now: float) -> None:
        rid = self._next_rid
        self._next_rid = rid + 1
        req.rid = rid
        req.worker = w
        req.sent_at = now
        req.state = INFLIGHT
        w.inflight[rid] = req
        w.outstanding += 1
        w.held_bytes += req.size
        self.n_inflight += 1
        slot = int(req.deadline * SLOTS_PER_S) + 1
        entries = self._slots.get(slot)
        if entries is None:
            entries = self._new_slot(slot)
        entries.append(req)
        self._slotted += 1
        svc = req.service
        if w.outstanding >= w.credit or w.held_bytes >= w.max_bytes:
            svc.policy.remove(w)
            w.in_policy = False
        else:
            svc.policy.changed(w)
        remaining = int((req.deadline - now) * 1000.0) or 1
        header = _packb((_REQUEST, rid, svc.name, remaining, req.attempt, req.flags, req.key))
        if not self.sink.to_worker(w.ident, header, req.payload):
            self.remove_worker(w, "unreachable", now)

    def _pump(self, svc: Service, now: float) -> None:
        """Hand queued requests to workers while both exist."""
        queue = svc.queue
        policy = svc.policy
        while queue and len(policy):
            head = queue.peek()
            if head is None:
                break
            if now >= head.deadline:  # before picking: a pick moves round-robin/weighted state
                queue.pop()
                self._fail(head, protocol.STATUS_TIMEOUT, "deadline passed while queued", now)
                continue
            w = policy.pick(head.key)
            if w is None:
                break
            queue.pop()
            svc.stats.wait.observe(now - head.queued_at)
            self._dispatch(head, w, now)  # type: ignore[arg-type]

    # -- workers: joining and leaving are in router_members.Membership -------------------

    def seen(self, ident: bytes, now: float) -> WorkerState | None:
        """Any message from a worker proves it alive; None if we do not know it."""
        w = self.workers.get(ident)
        if w is not None:
            w.last_seen = now
        return w

    def worker_reply(
        self,
        w: WorkerState,
        rid: int,
        status: int,
        flags: int,
        message: str | None,
        error_type: str | None,
        payload: Any,
        now: float,
    ) -> None:
        req = w.inflight.pop(rid, None)
        if req is None:
            self.stats.late += 1
            size = w.expired.pop(rid, None)
            if size is None:
                log.debug("dropped a late or unknown reply %d from %s", rid, w.instance,
                          extra={"service": w.service.name, "instance": w.instance, "rid": rid})
                return
            # Answered TIMEOUT at its deadline while this worker held it: the reply is dropped,
            # the credit given back.
            w.held_bytes -= size
            w.outstanding -= 1
            self.n_inflight -= 1
            self._refresh(w)
            if w.service.queue:
                self._pump(w.service, now)
            return
        size = req.size
        w.held_bytes -= size
        req.state = DONE
        load = req.load
        if load is not None:  # _release(), inlined on the hot path
            req.load = None
            load.requests -= 1
            load.bytes -= size
        req.payload = None
        w.outstanding -= 1
        self.n_inflight -= 1
        w.served += 1
        self.stats.replied += 1
        self.sink.to_client(req.client, _packb((_REPLY, req.crid, status, flags, message, error_type)), payload)
        svc = w.service
        latency = now - req.sent_at
        svc.policy.done(w, latency, now)
        if w.slow_window:
            self._apply_weight(w, now)
        ewma = w.latency_ewma  # for /status only; the first reply sets it
        w.latency_ewma = ewma + (latency - ewma) * LATENCY_ALPHA if ewma else latency
        st = svc.stats
        if status == _STATUS_OK:
            st.counts[0] += 1
        else:
            st.count(status)
        d = now - req.accepted_at
        hist = st.duration
        hist.buckets[bisect_left(BOUNDS, d)] += 1
        hist.sum += d
        if w.in_policy:
            svc.policy.changed(w)
        elif w.outstanding < w.credit and w.held_bytes < w.max_bytes and w.counted:
            svc.policy.add(w)
            w.in_policy = True
        if svc.queue:
            self._pump(svc, now)

    def inflight_count(self) -> int:
        return self.n_inflight

    def idle(self) -> bool:
        """Nothing held by workers and nothing queued: what workers send now is only control
        traffic (heartbeats, READY, goodbyes), none of which a client is waiting on."""
        return not self.n_inflight and not any(svc.queue for svc in self.services.values())


RequestHandler = Callable[[bytes, int, str, int, int, int, "bytes | None", Any, float], None]
ReplyHandler = Callable[[bytes, int, int, int, "str | None", "str | None", Any, float], None]


def routes(router: Router, on_reply: ReplyHandler) -> tuple[RequestHandler, ReplyHandler] | None:
    """The compiled calls for a valid REQUEST and a valid REPLY, or None on the pure path.

    Pure path (None): the drain loops call ``router.request`` and the broker's ``on_reply``
    (find the worker by connection, then ``router.worker_reply``), looked up on every batch so
    a replaced method takes effect at once. Compiled path: their twins in
    zrouter/_native/route.pyx, which do the common case in C on ``router``'s own state and hand
    the rest to those same methods (``on_reply`` gets replies from connections that are not
    registered workers).
    """
    if not _speedups.native():
        return None
    route = _speedups.load_native("route").Route(router, BOUNDS, LATENCY_ALPHA, on_reply)
    return route.request, route.reply
