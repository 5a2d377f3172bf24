# cython: language_level=3
"""The broker's per-request routing, compiled: the common path of ``Router.request`` (accept,
pick, dispatch) and of a worker's REPLY (settle, answer, give the credit back).

The reference is zrouter/broker/router.py (``Router.request``, ``Router._dispatch``,
``Router.worker_reply``) with its records in zrouter/broker/state.py; this module keeps their
effects, field by field, on the same router object, and hands everything else back to them
before changing anything: a request for a service the broker does not know yet, a client at
its bounds, a service with a queue, a broker shutting down, an unknown rid, a status that is
not an int. tests/native/test_route.py drives a router through this module and another
through the reference with the same random traffic and compares every frame sent and every
counter.

``Request``, ``ClientLoad``, ``WorkerState`` and ``Service`` are compiled twins of the records of
the same names in zrouter/broker/state.py (same fields, same constructors, same methods): when the
compiled path runs, state.py hands these out, so Python and compiled code share one kind of
record, and this module reads and writes their fields as C struct members.
"""

from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject

from zrouter import limits as _limits
from zrouter._native.codec import encode_reply as _encode_reply
from zrouter._native.codec import encode_request as _encode_request

__all__ = ["ClientLoad", "Request", "Route", "SLOTS_PER_S", "STATES", "Service", "WorkerState", "set_stats_factory"]

# Router's request states and deadline slots (zrouter/broker/state.py, router_types.py: tests/native
# checks they agree).
cdef enum:
    QUEUED = 1
    INFLIGHT = 2
    DONE = 3

SLOTS_PER_S = 100.0
STATES = (QUEUED, INFLIGHT, DONE)
cdef double _SLOTS_PER_S = 100.0
STATES = (QUEUED, INFLIGHT, DONE)


cdef class ClientLoad:
    """Twin of zrouter.broker.state.ClientLoad."""

    cdef public Py_ssize_t requests
    cdef public Py_ssize_t bytes

    def __init__(self):
        self.requests = 0
        self.bytes = 0


cdef class Request:
    """Twin of zrouter.broker.state.Request (see there for what each field means)."""

    cdef public double accepted_at, queued_at, deadline, expire_at, sent_at
    cdef public object rid, client, crid, flags, key, payload, service, worker, load
    cdef public long attempt, state
    cdef public Py_ssize_t size

    def __init__(self, client, crid, service, double deadline, long attempt, flags, key, payload,
                 double now=0.0, Py_ssize_t size=0, load=None):
        self.accepted_at = now
        self.queued_at = now
        self.rid = 0
        self.client = client
        self.crid = crid
        self.service = service
        self.deadline = deadline
        self.expire_at = deadline
        self.attempt = attempt
        self.flags = flags
        self.key = key
        self.payload = payload
        self.worker = None
        self.sent_at = 0.0
        self.state = 0
        self.size = size
        self.load = load


cdef class WorkerState:
    """Twin of zrouter.broker.state.WorkerState (see there for what each field means)."""

    cdef public object ident, key, meta, declared, base_weight, health_weight, admin_weight
    cdef public Service service
    cdef public Py_ssize_t capacity, credit, outstanding, held_bytes, max_bytes, served
    cdef public double weight, joined_at, slow_window, latency_ewma, last_seen, silence_limit, heartbeat, beat_at
    cdef public bint draining, healthy, in_policy, counted
    cdef public dict inflight, expired
    cdef public int fd

    def __init__(self, ident, Service service, Py_ssize_t capacity, weight, meta, double now):
        self.ident = ident
        self.key = (meta.get("instance") or ident.hex()).encode()
        self.service = service
        self.capacity = capacity
        self.credit = capacity
        self.outstanding = 0
        self.held_bytes = 0
        self.max_bytes = _limits.MAX_WORKER_BYTES
        self.base_weight = weight
        self.health_weight = None
        self.admin_weight = None
        self.weight = float(weight)
        self.joined_at = now
        self.slow_window = 0.0
        self.latency_ewma = 0.0
        self.last_seen = now
        self.draining = False
        self.healthy = True
        self.inflight = {}
        self.expired = {}
        self.in_policy = False
        self.counted = False
        self.fd = -1
        self.silence_limit = 0.0
        self.heartbeat = 1.0
        self.beat_at = 0.0
        self.declared = None
        self.meta = meta
        self.served = 0

    @property
    def instance(self):
        return self.key.decode()

    def effective_weight(self):
        if self.admin_weight is not None:
            return self.admin_weight
        return float(self.base_weight) if self.health_weight is None else self.health_weight

    def routable(self):
        """May take new work once it has a free credit."""
        return not self.draining and self.healthy and self.weight > 0

    def has_credit(self):
        return self.outstanding < self.credit and self.held_bytes < self.max_bytes

    def eligible(self):
        return self.has_credit() and not self.draining and self.healthy and self.weight > 0

    def __repr__(self):
        return f"<worker {self.instance} {self.service.name} {self.outstanding}/{self.capacity}>"


cdef class Service:
    """Twin of zrouter.broker.state.Service."""

    cdef public object name, policy, queue, stats
    cdef public dict workers
    cdef public double created_at
    cdef public Py_ssize_t n_routable

    def __init__(self, name, policy, queue, double now, stats=None):
        self.name = name
        self.policy = policy
        self.queue = queue
        self.workers = {}
        self.created_at = now
        self.n_routable = 0
        self.stats = _new_stats(name) if stats is None else stats  # the reference's default


_new_stats = None


def set_stats_factory(factory):
    """The broker's ServiceStats class (zrouter/broker/counters.py: this package may not import
    it), for a Service made without ``stats`` as the reference does; state.py sets it."""
    global _new_stats
    _new_stats = factory


cdef class Route:
    """``Route(router, bounds, latency_alpha)``: ``request`` and ``reply`` with the signatures the
    drain loops call (zrouter/_native/drain.pyx); ``bounds`` is the duration histogram's bucket
    bounds (zrouter.broker.counters.BOUNDS), ``latency_alpha`` the /status EWMA's weight."""

    cdef object router, services, clients, workers, stats, unknown_reply
    cdef tuple bounds
    cdef double alpha

    def __init__(self, router, tuple bounds, double latency_alpha, unknown_reply):
        self.router = router
        # Held rather than looked up per call: the router makes these once and never replaces
        # them (its _slots it does replace, so that one is read per dispatch).
        self.services = router.services
        self.clients = router.clients
        self.workers = router.workers
        self.stats = router.stats
        self.bounds = bounds
        self.alpha = latency_alpha
        self.unknown_reply = unknown_reply  # (ident, rid, status, flags, message, error_type, payload, now)

    def request(self, client, crid, service, timeout_ms, attempt, flags, key, payload, double now):
        """Router.request's arguments and effects."""
        router = self.router
        cdef PyObject *found
        cdef ClientLoad load
        cdef Request req
        cdef Service svc
        cdef Py_ssize_t size
        if not router.accepting:
            return router.request(client, crid, service, timeout_ms, attempt, flags, key, payload, now)
        found = PyDict_GetItem(self.services, service)
        if found is NULL:  # a service not known yet: the reference creates it, or refuses
            return router.request(client, crid, service, timeout_ms, attempt, flags, key, payload, now)
        if type(<object>found) is not Service:
            return router.request(client, crid, service, timeout_ms, attempt, flags, key, payload, now)
        svc = <Service>found
        found = PyDict_GetItem(self.clients, client)
        if found is NULL or type(<object>found) is not ClientLoad:
            return router.request(client, crid, service, timeout_ms, attempt, flags, key, payload, now)
        load = <ClientLoad>found
        size = len(payload)
        if load.requests >= router.max_client_requests or load.bytes + size > router.max_client_bytes:
            return router.request(client, crid, service, timeout_ms, attempt, flags, key, payload, now)
        queue = svc.queue
        policy = svc.policy
        if queue or not len(policy):  # the queue's order comes first / nobody to pick: the reference queues
            return router.request(client, crid, service, timeout_ms, attempt, flags, key, payload, now)
        req = Request(client, crid, svc, now + timeout_ms / 1000.0, attempt, flags, key, payload, now, size, load)
        load.requests += 1
        load.bytes += size
        self.stats.accepted += 1
        w = policy.pick(key)
        if w is None:
            router._enqueue(req, now)
            return
        svc.stats.wait.buckets[0] += 1  # waited 0 s: sum unchanged
        self._dispatch(router, req, svc, policy, <WorkerState?>w, now)

    cdef _dispatch(self, router, Request req, Service svc, policy, WorkerState w, double now):
        """Router._dispatch."""
        cdef long long slot, remaining
        cdef PyObject *found
        rid = router._next_rid
        router._next_rid = rid + 1
        req.rid = rid
        req.worker = w
        req.sent_at = now
        req.state = INFLIGHT
        w.inflight[rid] = req
        w.outstanding += 1
        w.held_bytes += req.size
        router.n_inflight += 1
        slot = <long long>(req.deadline * _SLOTS_PER_S) + 1  # int(): truncation, as the reference
        found = PyDict_GetItem(router._slots, slot)
        if found is NULL:
            entries = router._new_slot(slot)
        else:
            entries = <object>found
        entries.append(req)
        router._slotted += 1
        if w.outstanding >= w.credit or w.held_bytes >= w.max_bytes:
            policy.remove(w)
            w.in_policy = False
        else:
            policy.changed(w)
        remaining = <long long>((req.deadline - now) * 1000.0)
        if remaining == 0:
            remaining = 1
        header = _encode_request(rid, svc.name, remaining, req.attempt, req.flags, req.key)
        if not router.sink.to_worker(w.ident, header, req.payload):
            router.remove_worker(w, "unreachable", now)

    def reply(self, ident, rid, status, flags, message, error_type, payload, double now):
        """Broker._on_reply then Router.worker_reply: arguments and effects."""
        cdef PyObject *found = PyDict_GetItem(self.workers, ident)
        cdef Request req
        cdef WorkerState w
        cdef Service svc
        cdef double latency, ewma, d
        cdef Py_ssize_t size
        if found is NULL or type(<object>found) is not WorkerState:
            return self.unknown_reply(ident, rid, status, flags, message, error_type, payload, now)
        w = <WorkerState>found
        w.last_seen = now
        router = self.router
        inflight = w.inflight
        found = PyDict_GetItem(inflight, rid)
        if w.service is None:
            return router.worker_reply(w, rid, status, flags, message, error_type, payload, now)
        if found is NULL or type(<object>found) is not Request or type(status) is not int:
            return router.worker_reply(w, rid, status, flags, message, error_type, payload, now)
        req = <Request>found
        del inflight[rid]
        size = req.size
        w.held_bytes -= size
        req.state = DONE
        if req.load is not None:
            load = <ClientLoad>req.load
            req.load = None
            load.requests -= 1
            load.bytes -= size
        req.payload = None
        w.outstanding -= 1
        router.n_inflight -= 1
        w.served += 1
        self.stats.replied += 1
        router.sink.to_client(req.client, _encode_reply(req.crid, status, flags, message, error_type), payload)
        svc = w.service
        policy = svc.policy
        latency = now - req.sent_at
        policy.done(w, latency, now)
        if w.slow_window:
            router._apply_weight(w, now)
        ewma = w.latency_ewma
        w.latency_ewma = ewma + (latency - ewma) * self.alpha if ewma else latency
        st = svc.stats
        if status == 0:
            st.counts[0] += 1
        else:
            st.count(status)
        d = now - req.accepted_at
        hist = st.duration
        hist.buckets[_bisect_left(self.bounds, d)] += 1
        hist.sum += d
        if w.in_policy:
            policy.changed(w)
        elif w.outstanding < w.credit and w.held_bytes < w.max_bytes and w.counted:
            policy.add(w)
            w.in_policy = True
        if svc.queue:
            router._pump(svc, now)


cdef inline Py_ssize_t _bisect_left(tuple bounds, double x):
    """bisect.bisect_left over a sorted tuple of floats (the histogram's bounds)."""
    cdef Py_ssize_t lo = 0, hi = len(bounds), mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if <double>bounds[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo
