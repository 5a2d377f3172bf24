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
import itertools
import logging
import random
from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final, Protocol

import msgpack

from zrouter.broker.policies.base import make_policy
from zrouter.broker.slow_start import slow_credit, slow_weight, starts_slow
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
_HEARTBEAT: Final = protocol.encode_heartbeat()
_DRAIN: Final = protocol.encode_drain()
_STATUS_OK: Final = protocol.STATUS_OK
_SHUTTING_DOWN: Final = protocol.encode_disconnect("shutting down")
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


class Refused(Exception):
    """A READY the broker will not register. The text is the DISCONNECT reason to send back (in
    the protocol's words, never quoting more than a bounded field); ``kind`` labels the refusal
    for the bad-message counters (None: not the peer's fault, e.g. the broker is stopping)."""

    def __init__(self, kind: str | None, text: str) -> None:
        super().__init__(text)
        self.kind = kind


class Sink(Protocol):
    """Where the router's messages go. ``to_worker`` returns False if the worker is unreachable."""

    def to_worker(self, ident: bytes, header: bytes, payload: Any) -> bool: ...

    def to_client(self, client: bytes, header: bytes, payload: Any) -> None: ...


class Access(Protocol):
    """Which services a worker's CURVE key may serve (``zrouter.broker.auth.Keyring``).

    ``key`` is the connection's User-Id as ZAP set it (its Z85 public key); the answer is the
    reason for a refusal, or None when allowed."""

    def worker_refusal(self, key: str | None, service: str) -> str | None: ...


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
    forbidden: int = 0  # requests and READYs refused by key (CURVE brokers)
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
        slot = int(req.deadline * _SLOTS_PER_S) + 1
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

    # -- workers ----------------------------------------------------------------------------

    def worker_ready(
        self, ident: bytes, ready: protocol.Ready, now: float, fd: int = -1, user_id: str | None = None
    ) -> WorkerState:
        """Register the worker on connection ``ident`` (a worker is its connection; ``user_id``:
        its CURVE key, already checked by :meth:`admit_worker`).

        A READY identical to the connection's current registration changes nothing (a worker
        may repeat it); a different one replaces it (what the worker held is requeued). A READY
        naming the ``meta.instance`` of another registered connection replaces that one only if
        it has been silent for two of its heartbeat intervals (its worker reconnecting after
        losing it); while the other is heard from, the READY is refused, so nobody can evict a
        live worker by naming it. Raises :class:`Refused` with the reason for the DISCONNECT.
        """
        if not self.accepting:
            raise Refused(None, "broker is shutting down")
        old = self.workers.get(ident)
        if old is not None:
            if old.declared == ready:
                old.last_seen = now
                return old
            self.remove_worker(old, "sent READY again", now)
        instance = ready.meta.get("instance") or ident.hex()
        other = self.by_instance.get(instance)
        if other is not None and self.workers.get(other.ident) is other:
            if now - other.last_seen < 2 * other.heartbeat:
                raise Refused("instance_in_use", f"instance {instance} is registered on another live connection")
            self.remove_worker(other, "replaced by a new connection of the same instance", now)
        if user_id is not None:
            self.worker_keys[ident] = user_id
        svc = self.service(ready.service, now)
        w = WorkerState(ident, svc, ready.capacity, ready.weight, ready.meta, now)
        w.fd = fd
        self._limit(w)
        w.declared = ready
        w.heartbeat = self._heartbeat_of(ready)
        w.silence_limit = w.heartbeat * self.liveness
        self.workers[ident] = w
        self.by_instance[w.instance] = w
        svc.workers[ident] = w
        self._schedule_beat(w, now + w.heartbeat)
        self.stats.workers_joined += 1
        if self.on_join is not None:
            self.on_join(w, now)
        window = self.service_slow_start.get(svc.name, self.slow_start)
        if starts_slow(window, now - svc.created_at, svc.n_routable, self.liveness_timeout):
            w.slow_window = window
            self._ramping[ident] = w
        self._apply_weight(w, now)
        self._refresh(w)
        log.info(
            "worker %s joined service %r (capacity %d, weight %s)%s", w.instance, svc.name, w.capacity, w.weight,
            f", slow start over {w.slow_window:g}s" if w.slow_window else "",
            extra={"service": svc.name, "instance": w.instance},
        )
        self._pump(svc, now)
        return w

    def _limit(self, w: WorkerState) -> None:
        """At most ``max_capacity`` credits per worker connection, whatever it declared (it then
        gets fewer requests than it can take, never more), and ``max_worker_bytes``."""
        w.max_bytes = self.max_worker_bytes
        if w.capacity > self.max_capacity:
            log.warning("worker %s declares capacity %d; this broker grants at most %d (--max-capacity)",
                        w.instance, w.capacity, self.max_capacity,
                        extra={"service": w.service.name, "instance": w.instance})
            w.capacity = self.max_capacity

    def _heartbeat_of(self, ready: protocol.Ready) -> float:
        """The interval a worker is judged by and heartbeated at: the one it declared (READY
        ``meta.heartbeat_ms``, range-checked by the decoder), else the broker's own. So a
        worker and a broker configured differently neither flap nor need to agree."""
        if ready.heartbeat_ms is not None:
            return ready.heartbeat_ms / 1000.0
        return self.liveness_timeout / self.liveness

    def _schedule_beat(self, w: WorkerState, at: float) -> None:
        w.beat_at = at
        beats = self._beats
        heapq.heappush(beats, (at, next(self._beat_seq), w))
        if len(beats) > 2 * len(self.workers) + 64:  # READY/leave churn: shed the stale entries
            live = [(x.beat_at, next(self._beat_seq), x) for x in self.workers.values()]
            heapq.heapify(live)
            self._beats = live

    def next_heartbeat(self) -> float | None:
        """When the next heartbeat to a worker is due (for the poll timeout); None: no workers."""
        beats = self._beats
        workers = self.workers
        while beats:
            at, _, w = beats[0]
            if workers.get(w.ident) is w and w.beat_at == at:
                return at
            heapq.heappop(beats)
        return None

    def send_heartbeats(self, now: float) -> None:
        """HEARTBEAT every worker whose interval is up (each at its own interval)."""
        beats = self._beats
        workers = self.workers
        while beats and beats[0][0] <= now:
            at, _, w = heapq.heappop(beats)
            if workers.get(w.ident) is not w or w.beat_at != at:
                continue
            if not self.sink.to_worker(w.ident, _HEARTBEAT, None):
                self.remove_worker(w, "unreachable", now)
                continue
            nxt = at + w.heartbeat
            self._schedule_beat(w, nxt if nxt > now else now + w.heartbeat)

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

    def worker_drain(self, w: WorkerState, now: float) -> None:
        """The worker is leaving: no new work; what it holds may finish. Acknowledged so the
        worker knows nothing more is on its way."""
        if not w.draining:
            log.info("worker %s is draining (%d in flight)", w.instance, w.outstanding,
                     extra={"service": w.service.name, "instance": w.instance})
        w.draining = True
        self._refresh(w)
        self._grace_if_unserved(w.service, now)
        self.sink.to_worker(w.ident, _DRAIN, None)

    def worker_update(self, w: WorkerState, capacity: int, weight: int, now: float) -> None:
        w.capacity = capacity
        self._limit(w)
        w.base_weight = weight
        if isinstance(w.declared, protocol.Ready):
            w.declared = w.declared._replace(capacity=capacity, weight=weight)
        self._apply_weight(w, now)
        self._refresh(w)
        self._grace_if_unserved(w.service, now)
        self._pump(w.service, now)

    def _grace_if_unserved(self, svc: Service, now: float) -> None:
        """With no routable worker left, the queued requests get the grace period a new
        request would: answered together (UNAVAILABLE) when it ends if nobody came back, like
        the requests the last worker held, instead of each waiting out its own deadline."""
        if not svc.n_routable and svc.queue:
            svc.queue.start_grace(now + self.grace)

    def remove_worker(self, w: WorkerState, reason: str, now: float) -> None:
        """Forget a worker and take back what it held: idempotent requests with attempts and time
        left go first in line again; the others get "worker lost, outcome unknown"."""
        if self.workers.get(w.ident) is not w:
            return
        del self.workers[w.ident]
        if self.worker_keys:
            self.worker_keys.pop(w.ident, None)
        if self.by_instance.get(w.instance) is w:
            del self.by_instance[w.instance]
        svc = w.service
        svc.workers.pop(w.ident, None)
        if w.in_policy:
            svc.policy.remove(w)
            w.in_policy = False
        svc.policy.forget(w)
        if self._ramping.get(w.ident) is w:
            del self._ramping[w.ident]
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
        self._grace_if_unserved(svc, now)
        for req in reversed(held):  # reversed + push_front keeps their original order
            if not req.flags & _IDEMPOTENT:
                self._fail(req, protocol.STATUS_WORKER_LOST, "worker lost; request not idempotent, outcome unknown", now)
            elif req.attempt + 1 >= self.max_attempts:
                self._fail(req, protocol.STATUS_WORKER_LOST, f"worker lost on attempt {req.attempt + 1}; retry budget spent, outcome unknown", now)
            elif now >= req.deadline:
                self._fail(req, protocol.STATUS_TIMEOUT, "deadline passed; its worker was lost", now)
            else:
                req.attempt += 1
                req.queued_at = now
                svc.queue.push_front(req, grace_until)
                requeued += 1
        self.stats.requeued += requeued
        svc.stats.requeued += requeued
        log.info("worker %s left service %r (%s); %d requests requeued, %d failed",
                 w.instance, svc.name, reason, requeued, len(held) - requeued,
                 extra={"service": svc.name, "instance": w.instance})
        self._pump(svc, now)

    # -- authorization (CURVE brokers) ------------------------------------------------------

    def admit_worker(self, ident: bytes, user_id: str | None, service: str, now: float) -> bool:
        """May the worker whose key is ``user_id`` register for ``service``? If not, it gets
        DISCONNECT with the reason, and what it held on this connection is taken back."""
        access = self.access
        if access is None:
            return True
        why = access.worker_refusal(user_id, service)
        if why is None:
            return True
        self.stats.forbidden += 1
        old = self.workers.get(ident)
        if old is not None:
            self.remove_worker(old, why, now)
        self.sink.to_worker(ident, protocol.encode_disconnect(why), None)
        return False

    def recheck_workers(self, now: float) -> int:
        """After the keys changed (SIGHUP): every worker whose key no longer allows its service
        is removed (what it held is requeued or failed, as for a lost worker) and told
        DISCONNECT with the reason. Returns how many."""
        access = self.access
        if access is None:
            return 0
        n = 0
        for ident, user_id in list(self.worker_keys.items()):
            w = self.workers.get(ident)
            if w is None:
                continue
            why = access.worker_refusal(user_id, w.service.name)
            if why is not None:
                self.remove_worker(w, f"key revoked: {why}", now)
                self.sink.to_worker(ident, protocol.encode_disconnect(why), None)
                n += 1
        return n

    def forbid(self, client: bytes, crid: int, service: str, why: str) -> None:
        """Answer a request its client's key may not make: FORBIDDEN, counted (also per service)."""
        self.stats.forbidden += 1
        self.count_status(service, protocol.STATUS_FORBIDDEN)
        self.answer(client, crid, protocol.STATUS_FORBIDDEN, why)

    # -- health from outside (Consul) -------------------------------------------------------

    def set_health(self, w: WorkerState, healthy: bool, weight: float | None, now: float) -> None:
        """Consul's view of one worker: ``healthy`` False drains it (no new work, held requests
        finish); ``weight`` overrides the declared weight (None: no opinion)."""
        changed = w.healthy != healthy or w.health_weight != weight
        w.healthy = healthy
        w.health_weight = weight
        if changed and w.admin_weight is not None:
            # Consul is the source of truth: a new verdict there replaces an operator's override.
            log.info("worker %s: Consul's new verdict replaces the weight %g set by an operator",
                     w.instance, w.admin_weight, extra={"service": w.service.name, "instance": w.instance})
            w.admin_weight = None
        if changed:
            self._apply_weight(w, now)
            self._refresh(w)
            self._pump(w.service, now)

    # -- operator actions (the broker's admin HTTP API) ----------------------------------------

    def drain_worker(self, instance: str, now: float) -> WorkerState | None:
        """Give worker ``instance`` no new work; what it holds finishes. It stays connected (it
        did not ask to leave, so it gets no DRAIN) until it reconnects or stops. None: unknown."""
        w = self.by_instance.get(instance)
        if w is None:
            return None
        if not w.draining:
            log.info("worker %s drained by an operator (%d in flight)", w.instance, w.outstanding,
                     extra={"service": w.service.name, "instance": w.instance})
        w.draining = True
        self._refresh(w)
        return w

    def set_worker_weight(self, instance: str, weight: float, now: float) -> WorkerState | None:
        """Override worker ``instance``'s weight (>= 0; 0 takes it out of rotation) until it
        reconnects or Consul's verdict on it changes. None: unknown instance."""
        if not weight >= 0:
            raise ValueError(f"weight must be a number >= 0, got {weight!r}")
        w = self.by_instance.get(instance)
        if w is None:
            return None
        w.admin_weight = float(weight)
        self._apply_weight(w, now)
        self._refresh(w)
        self._pump(w.service, now)
        return w

    def set_service_policy(self, service: str, policy: str, now: float) -> Service | None:
        """Switch ``service`` to dispatch policy ``policy`` now (ValueError: no such policy),
        and for the rest of this broker's life. None: no such service here."""
        svc = self.services.get(service)
        if svc is None:
            return None
        new = make_policy(policy, self.rng)
        for w in svc.workers.values():
            if w.in_policy:
                new.add(w)
        svc.policy = new
        self.service_policies[service] = policy
        self._pump(svc, now)
        return svc

    def _apply_weight(self, w: WorkerState, now: float) -> None:
        """Effective weight and credits: what was declared, Consul's say, then slow start."""
        weight = w.effective_weight()
        credit = w.capacity
        if w.slow_window:
            elapsed = now - w.joined_at
            if elapsed < w.slow_window:
                weight = slow_weight(weight, elapsed, w.slow_window)
                credit = slow_credit(credit, elapsed, w.slow_window)
            else:
                w.slow_window = 0.0
                if self._ramping.get(w.ident) is w:
                    del self._ramping[w.ident]
        w.weight = weight
        w.credit = credit

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
        """Expire queued requests and silent workers (each judged by its own interval); send the
        heartbeats that are due when asked."""
        for w in [w for w in self.workers.values() if now - w.last_seen > w.silence_limit]:
            self.remove_worker(w, f"no heartbeat for {now - w.last_seen:.1f}s", now)
        if heartbeat:
            self.send_heartbeats(now)
        self.expire(now)
        self._ramp(now)
        for name in [n for n, s in self.services.items() if not s.workers and not s.queue
                     and now - s.created_at > self.grace]:
            del self.services[name]  # a typo'd service name must not live forever
        for client in [c for c, load in self.clients.items() if not load.requests]:
            del self.clients[client]  # swept here, not per reply: cheaper for one-at-a-time clients

    def _ramp(self, now: float) -> None:
        """Move the workers in slow start along their ramp (more credit may free queued work)."""
        for w in list(self._ramping.values()):
            if self._ramping.get(w.ident) is not w:
                continue  # removed by an earlier worker's pump (unreachable)
            self._apply_weight(w, now)
            self._refresh(w)
            if w.service.queue:
                self._pump(w.service, now)

    def expire(self, now: float) -> None:
        """Answer what is due: queued requests past their deadline (TIMEOUT) or grace period
        (UNAVAILABLE), and requests workers hold past their deadline (TIMEOUT: the payload is
        freed now; the worker's credit stays taken until it replies, late, or is lost)."""
        for svc in self.services.values():
            if svc.queue:
                for req, status in svc.queue.expire(now, unavailable=not svc.n_routable):
                    if status == protocol.STATUS_UNAVAILABLE:
                        text = f"no worker serves service {svc.name}"
                    else:
                        text = "deadline passed while queued"
                    self._fail(req, status, text, now)
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
                self._fail(req, protocol.STATUS_TIMEOUT, "deadline passed while a worker held the request", now)

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

    def shutdown(self, now: float = 0.0) -> None:
        """Stop accepting; answer every queued request (nothing will serve it here); tell the
        idle workers DISCONNECT "shutting down" so they reconnect (with back-off) at once rather
        than after ``liveness`` intervals of silence. Workers still holding requests are told by
        :meth:`disconnect_all` once those are answered; new READYs are refused meanwhile."""
        self.accepting = False
        for svc in self.services.values():
            for req in svc.queue.drain_all():
                self._fail(req, protocol.STATUS_UNAVAILABLE, "broker is shutting down")
        for w in [w for w in self.workers.values() if not w.outstanding]:
            self.sink.to_worker(w.ident, _SHUTTING_DOWN, None)
            self.remove_worker(w, "broker shutting down", now)

    def disconnect_all(self) -> None:
        """At exit: DISCONNECT "shutting down" to every worker still registered."""
        for w in self.workers.values():
            self.sink.to_worker(w.ident, _SHUTTING_DOWN, None)

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
