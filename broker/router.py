"""The broker's routing core, without sockets: accept, dispatch, requeue, expire, heartbeat.

Every method takes ``now`` (a monotonic time in seconds) and sends through a ``Sink``, so the
whole life of a request (credits, requeue when a worker is lost, deadlines, the unknown-service
grace period, drains) is unit-tested without sockets or sleeps. ``zrouter.broker.server`` feeds it from
the ZeroMQ sockets.

Invariants the tests check:
- a worker never holds more than its capacity;
- every accepted request gets exactly one reply: from its worker, or an error from here;
- a late reply (from a worker the request was taken back from) matches nothing and is dropped,
  because every dispatch gets a fresh broker-side request id.
"""

from __future__ import annotations

import heapq
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final, Protocol

import msgpack

from zrouter.broker.policies.base import make_policy
from zrouter.broker.policies.p2c_ewma import update_ewma
from zrouter.broker.state import ServiceQueue
from zrouter.broker.state import DONE, INFLIGHT, ClientLoad, Request, Service, WorkerState
from zrouter import limits, protocol

__all__ = ["Router", "Sink", "Stats"]

log = logging.getLogger("zrouter.broker")

_packb: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack
_REQUEST: Final = protocol.REQUEST
_REPLY: Final = protocol.REPLY
_IDEMPOTENT: Final = protocol.FLAG_IDEMPOTENT
_HEARTBEAT: Final = protocol.encode_heartbeat()
_DRAIN: Final = protocol.encode_drain()
_OVERLOADED: Final = protocol.STATUS_OVERLOADED
# libzmq receives messages of up to its 8 KiB read batch (ZMQ_IN_BATCH_SIZE) into one shared
# buffer of ~18 KiB (the bytes and a reference count per possible message): one such payload kept
# keeps the whole buffer. A payload this small that has to wait in a queue is copied out first,
# so a queued request costs its own size, not the buffer's.
_COMPACT_BELOW: Final = 8192
# Requests workers hold are filed by deadline in slots of 1/_SLOTS_PER_S seconds (a slot is a
# list: filing costs an append, not a heap operation per request); a slot is looked at once its
# end has passed, so the broker answers a held request at most 1/_SLOTS_PER_S s after its
# deadline. Entries of requests answered since are skipped then; when they outnumber live ones
# by more than _HELD_SLACK, the slots are rebuilt from what workers hold.
_SLOTS_PER_S: Final = 100.0
_HELD_SLACK: Final = 1024


class Sink(Protocol):
    """Where the router's messages go. ``to_worker`` returns False if the worker is unreachable."""

    def to_worker(self, ident: bytes, header: bytes, payload: Any) -> bool: ...

    def to_client(self, client: bytes, header: bytes, payload: Any) -> None: ...


@dataclass(slots=True)
class Stats:
    """Counters for logs and metrics; plain ints so the hot path pays one add."""

    accepted: int = 0
    replied: int = 0
    requeued: int = 0
    lost: int = 0
    timeouts: int = 0
    unavailable: int = 0
    overloaded: int = 0
    late: int = 0
    bad: int = 0
    undeliverable: int = 0  # replies ZeroMQ would not queue: the client is gone or reads nothing
    unread_overflow: int = 0  # replies replaced by TOO_LARGE: the client's unread bytes are at the bound
    workers_joined: int = 0
    workers_left: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Router:
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
        self.max_services = max_services
        self.max_client_requests = max_client_requests
        self.max_client_bytes = max_client_bytes
        self.max_capacity = max_capacity
        self.max_worker_bytes = max_worker_bytes
        self.clients: dict[bytes, ClientLoad] = {}  # client routing id -> what it has here
        # Every request a worker holds, by deadline slot: at the deadline the broker answers
        # TIMEOUT itself. Slot numbers in a heap, slots in a dict (see _SLOTS_PER_S).
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

    # -- services ---------------------------------------------------------------------------

    def service(self, name: str, now: float) -> Service:
        svc = self.services.get(name)
        if svc is None:
            policy = make_policy(self.service_policies.get(name, self.default_policy), self.rng)
            svc = self.services[name] = Service(name, policy, ServiceQueue(self.max_queue), now)
        return svc

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
            self.answer(client, crid, protocol.STATUS_UNAVAILABLE, "broker is shutting down")
            return
        load = self.clients.get(client)
        if load is None:
            load = self.clients[client] = ClientLoad()
        size = len(payload)
        if load.requests >= self.max_client_requests or load.bytes + size > self.max_client_bytes:
            self.stats.overloaded += 1
            self.answer(client, crid, _OVERLOADED, self._client_full(load, size))
            return
        svc = self.services.get(service)
        if svc is None:
            if len(self.services) >= self.max_services:
                self.stats.unavailable += 1
                self.answer(client, crid, protocol.STATUS_UNAVAILABLE,
                            f"no worker serves {service!r}, and this broker already keeps "
                            f"{len(self.services)} services (--max-services)")
                return
            svc = self.service(service, now)
        req = Request(client, crid, svc, now + timeout_ms / 1000.0, attempt, flags, key, payload, size, load)
        load.requests += 1
        load.bytes += size
        self.stats.accepted += 1
        if not svc.queue:
            w = svc.policy.pick(key)
            if w is not None:
                self._dispatch(req, w, now)  # type: ignore[arg-type]
                return
        grace_until = None if svc.n_routable else now + self.grace
        if size <= _COMPACT_BELOW:
            data = getattr(payload, "bytes", None)  # a zmq.Frame: its own copy (pyzmq's Frame.bytes)
            if data is not None:
                req.payload = data
        if not svc.queue.push(req, now, grace_until):
            self.stats.overloaded += 1
            self._release(req)
            self.answer(client, crid, _OVERLOADED, f"queue of {service!r} is full")

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

    def _fail(self, req: Request, status: int, message: str) -> None:
        req.state = DONE
        self._release(req)
        if status == protocol.STATUS_TIMEOUT:
            self.stats.timeouts += 1
        elif status == protocol.STATUS_UNAVAILABLE:
            self.stats.unavailable += 1
        elif status == protocol.STATUS_WORKER_LOST:
            self.stats.lost += 1
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
        slot = int(req.deadline * _SLOTS_PER_S) + 1
        entries = self._slots.get(slot)
        if entries is None:
            entries = self._new_slot(slot)
        entries.append(req)
        self._slotted += 1
        svc = req.service
        if w.outstanding >= w.capacity or w.held_bytes >= w.max_bytes:
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
                self._fail(head, protocol.STATUS_TIMEOUT, "deadline passed while queued")
                continue
            w = policy.pick(head.key)
            if w is None:
                break
            queue.pop()
            self._dispatch(head, w, now)  # type: ignore[arg-type]

    # -- workers ----------------------------------------------------------------------------

    def worker_ready(self, ident: bytes, ready: protocol.Ready, now: float, fd: int = -1) -> WorkerState:
        old = self.workers.get(ident)
        if old is not None:
            self.remove_worker(old, "sent READY again", now)
        svc = self.service(ready.service, now)
        w = WorkerState(ident, svc, ready.capacity, ready.weight, ready.meta, now)
        w.fd = fd
        self._limit(w)
        stale = self.by_instance.get(w.instance)
        if stale is not None and stale.ident in self.workers:
            # Same instance on a new connection (it reconnected before we noticed it left).
            self.remove_worker(stale, "replaced by a new connection of the same instance", now)
        w.silence_limit = self._silence_limit(w)
        self.workers[ident] = w
        self.by_instance[w.instance] = w
        svc.workers[ident] = w
        self.stats.workers_joined += 1
        if self.on_join is not None:
            self.on_join(w, now)
        self._apply_weight(w)
        self._refresh(w)
        log.info(
            "worker %s joined service %r (capacity %d, weight %s)", w.instance, svc.name, w.capacity, w.weight
        )
        self._pump(svc, now)
        return w

    def _limit(self, w: WorkerState) -> None:
        """At most ``max_capacity`` credits per worker connection, whatever it declared (it then
        gets fewer requests than it can take, never more), and ``max_worker_bytes``."""
        w.max_bytes = self.max_worker_bytes
        if w.capacity > self.max_capacity:
            log.warning("worker %s declares capacity %d; this broker grants at most %d (--max-capacity)",
                        w.instance, w.capacity, self.max_capacity)
            w.capacity = self.max_capacity

    def _silence_limit(self, w: WorkerState) -> float:
        """The broker's liveness timeout, stretched for a worker that heartbeats more slowly, so a
        misconfigured pair degrades to slower failure detection instead of endless reconnects."""
        try:
            theirs = int(w.meta.get("heartbeat_ms", "0")) / 1000.0
        except ValueError:
            theirs = 0.0
        ours = self.liveness_timeout / self.liveness
        if theirs and abs(theirs - ours) > 1e-3:
            log.warning("worker %s heartbeats every %.3gs but this broker every %.3gs: use one --heartbeat "
                        "for both (a worker expecting faster heartbeats will keep reconnecting)",
                        w.instance, theirs, ours)
        return max(self.liveness_timeout, theirs * self.liveness)

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
                log.debug("dropped a late or unknown reply %d from %s", rid, w.instance)
                return
            # Answered TIMEOUT at its deadline while this worker held it: drop the reply, give
            # the credit back.
            w.held_bytes -= size
        else:
            size = req.size
            w.held_bytes -= size
            req.state = DONE
            load = req.load
            if load is not None:  # _release(), inlined on the hot path
                req.load = None
                load.requests -= 1
                load.bytes -= size
            req.payload = None
            w.served += 1
            w.ewma = update_ewma(w.ewma, now - req.sent_at, now - w.ewma_at)
            w.ewma_at = now
            self.stats.replied += 1
            self.sink.to_client(req.client, _packb((_REPLY, req.crid, status, flags, message, error_type)), payload)
        w.outstanding -= 1
        self.n_inflight -= 1
        svc = w.service
        if w.in_policy:
            svc.policy.changed(w)
        elif w.outstanding < w.capacity and w.held_bytes < w.max_bytes and w.counted:
            svc.policy.add(w)
            w.in_policy = True
        if svc.queue:
            self._pump(svc, now)

    def worker_drain(self, w: WorkerState, now: float) -> None:
        """The worker is leaving: no new work; what it holds may finish. Acknowledged so the
        worker knows nothing more is on its way."""
        if not w.draining:
            log.info("worker %s is draining (%d in flight)", w.instance, w.outstanding)
        w.draining = True
        self._refresh(w)
        self.sink.to_worker(w.ident, _DRAIN, None)

    def worker_update(self, w: WorkerState, capacity: int, weight: int, now: float) -> None:
        w.capacity = capacity
        self._limit(w)
        w.base_weight = weight
        self._apply_weight(w)
        self._refresh(w)
        self._pump(w.service, now)

    def remove_worker(self, w: WorkerState, reason: str, now: float) -> None:
        """Forget a worker and take back what it held: idempotent requests with attempts and time
        left go first in line again; the others get "worker lost, outcome unknown"."""
        if self.workers.get(w.ident) is not w:
            return
        del self.workers[w.ident]
        if self.by_instance.get(w.instance) is w:
            del self.by_instance[w.instance]
        svc = w.service
        svc.workers.pop(w.ident, None)
        if w.in_policy:
            svc.policy.remove(w)
            w.in_policy = False
        if w.counted:
            svc.n_routable -= 1
            w.counted = False
        self.stats.workers_left += 1
        held = list(w.inflight.values())
        w.inflight.clear()
        self.n_inflight -= w.outstanding
        w.outstanding = 0
        requeued = 0
        grace_until = None if svc.n_routable else now + self.grace
        for req in reversed(held):  # reversed + push_front keeps their original order
            if not req.flags & _IDEMPOTENT:
                self._fail(req, protocol.STATUS_WORKER_LOST, "worker lost; request not idempotent, outcome unknown")
            elif req.attempt + 1 >= self.max_attempts:
                self._fail(req, protocol.STATUS_WORKER_LOST, f"worker lost on attempt {req.attempt + 1}; retry budget spent, outcome unknown")
            elif now >= req.deadline:
                self._fail(req, protocol.STATUS_TIMEOUT, "deadline passed; its worker was lost")
            else:
                req.attempt += 1
                svc.queue.push_front(req, grace_until)
                requeued += 1
        self.stats.requeued += requeued
        log.info("worker %s left service %r (%s); %d requests requeued, %d failed",
                 w.instance, svc.name, reason, requeued, len(held) - requeued)
        self._pump(svc, now)

    # -- health from outside (Consul) -------------------------------------------------------

    def set_health(self, w: WorkerState, healthy: bool, weight: float | None, now: float) -> None:
        """Consul's view of one worker: ``healthy`` False drains it (no new work, held requests
        finish); ``weight`` overrides the declared weight (None: no opinion)."""
        changed = w.healthy != healthy or w.health_weight != weight
        w.healthy = healthy
        w.health_weight = weight
        if changed:
            self._apply_weight(w)
            self._refresh(w)
            self._pump(w.service, now)

    def _apply_weight(self, w: WorkerState) -> None:
        w.weight = w.effective_weight()

    def _refresh(self, w: WorkerState) -> None:
        """Bring the policy's membership and the service's routable count up to date."""
        svc = w.service
        routable = w.routable()
        if routable != w.counted:
            svc.n_routable += 1 if routable else -1
            w.counted = routable
        if routable and w.has_credit():
            if w.in_policy:
                svc.policy.changed(w)
            else:
                svc.policy.add(w)
                w.in_policy = True
        elif w.in_policy:
            svc.policy.remove(w)
            w.in_policy = False

    # -- time -------------------------------------------------------------------------------

    def tick(self, now: float, heartbeat: bool = True) -> None:
        """Expire queued requests and silent workers; send heartbeats when asked."""
        for w in [w for w in self.workers.values() if now - w.last_seen > w.silence_limit]:
            self.remove_worker(w, f"no heartbeat for {now - w.last_seen:.1f}s", now)
        if heartbeat:
            for w in list(self.workers.values()):
                if not self.sink.to_worker(w.ident, _HEARTBEAT, None):
                    self.remove_worker(w, "unreachable", now)
        self.expire(now)
        for name in [n for n, s in self.services.items() if not s.workers and not s.queue
                     and now - s.created_at > self.grace]:
            del self.services[name]  # a typo'd service name must not live forever
        for client in [c for c, load in self.clients.items() if not load.requests]:
            del self.clients[client]  # swept here, not per reply: cheaper for one-at-a-time clients

    def expire(self, now: float) -> None:
        """Answer what is due: queued requests past their deadline (TIMEOUT) or grace period
        (UNAVAILABLE), and requests workers hold past their deadline (TIMEOUT: the payload is
        freed now; the worker's credit stays taken until it replies, late, or is lost)."""
        for svc in self.services.values():
            if svc.queue:
                for req, status in svc.queue.expire(now, unavailable=not svc.n_routable):
                    if status == protocol.STATUS_UNAVAILABLE:
                        text = f"no worker serves {svc.name!r}"
                    else:
                        text = "deadline passed while queued"
                    self._fail(req, status, text)
        heap = self._slot_heap
        due = now * _SLOTS_PER_S
        while heap and heap[0] <= due:
            entries = self._slots.pop(heapq.heappop(heap))
            self._slotted -= len(entries)
            for req in entries:
                w = req.worker
                if req.state != INFLIGHT or w is None:
                    continue  # answered since (a request requeued and sent again is filed again)
                w.inflight.pop(req.rid, None)
                w.expired[req.rid] = req.size
                self._fail(req, protocol.STATUS_TIMEOUT, "deadline passed while a worker held the request")

    def _new_slot(self, slot: int) -> list[Request]:
        if self._slotted > 2 * self.n_inflight + _HELD_SLACK:
            self._refile()
            entries = self._slots.get(slot)
            if entries is not None:
                return entries
        entries = self._slots[slot] = []
        heapq.heappush(self._slot_heap, slot)
        return entries

    def _refile(self) -> None:
        """Rebuild the deadline slots from what workers hold, dropping answered entries."""
        slots: dict[int, list[Request]] = {}
        for w in self.workers.values():
            for req in w.inflight.values():
                slots.setdefault(int(req.deadline * _SLOTS_PER_S) + 1, []).append(req)
        self._slots = slots
        self._slot_heap = list(slots)
        heapq.heapify(self._slot_heap)
        self._slotted = sum(len(entries) for entries in slots.values())

    def next_timer(self) -> float | None:
        if self._slotted > 2 * self.n_inflight + _HELD_SLACK:
            self._refile()  # a burst within one slot: rebuilt here, once per turn of the loop
        heap = self._slot_heap
        soonest: float | None = heap[0] / _SLOTS_PER_S if heap else None
        for svc in self.services.values():
            if svc.queue:
                t = svc.queue.next_timer()
                if t is not None and (soonest is None or t < soonest):
                    soonest = t
        return soonest

    def shutdown(self) -> None:
        """Stop accepting; answer every queued request (nothing will serve it here)."""
        self.accepting = False
        for svc in self.services.values():
            for req in svc.queue.drain_all():
                self._fail(req, protocol.STATUS_UNAVAILABLE, "broker is shutting down")

    def abandon_inflight(self) -> None:
        """At exit: whatever workers still hold gets "outcome unknown"."""
        for w in list(self.workers.values()):
            for req in list(w.inflight.values()):
                self._fail(req, protocol.STATUS_WORKER_LOST, "broker stopped before the worker replied; outcome unknown")
            w.inflight.clear()
            self.n_inflight -= w.outstanding
            w.outstanding = 0

    def inflight_count(self) -> int:
        return self.n_inflight

    def idle(self) -> bool:
        """Nothing held by workers and nothing queued: what workers send now is only control
        traffic (heartbeats, READY, goodbyes), none of which a client is waiting on."""
        return not self.n_inflight and not any(svc.queue for svc in self.services.values())
