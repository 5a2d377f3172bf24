"""Worker membership, mixed into :class:`zrouter.broker.router.Router`: a worker joins
(READY: its limits, its heartbeat interval, slow start, and who may not be replaced) and leaves
(what it held goes first in line again, or is answered when it may not be retried).

Every method takes ``now`` and works on the router's state
(:class:`~zrouter.broker.router_types.RouterState`); the request path, which a worker's
messages drive once it has joined, stays in ``zrouter.broker.router``.
"""

from __future__ import annotations

import logging

from zrouter import protocol
from zrouter.broker.router_types import Refused, RouterState
from zrouter.broker.slow_start import starts_slow
from zrouter.broker.state import Service, WorkerState

__all__ = ["Membership"]

log = logging.getLogger("zrouter.broker")


class Membership:
    """Router methods for workers joining and leaving."""

    def worker_ready(
        self: RouterState, ident: bytes, ready: protocol.Ready, now: float, fd: int = -1, user_id: str | None = None
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

    def _limit(self: RouterState, w: WorkerState) -> None:
        """At most ``max_capacity`` credits per worker connection, whatever it declared (it then
        gets fewer requests than it can take, never more), and ``max_worker_bytes``."""
        w.max_bytes = self.max_worker_bytes
        if w.capacity > self.max_capacity:
            log.warning("worker %s declares capacity %d; this broker grants at most %d (--max-capacity)",
                        w.instance, w.capacity, self.max_capacity,
                        extra={"service": w.service.name, "instance": w.instance})
            w.capacity = self.max_capacity

    def _heartbeat_of(self: RouterState, ready: protocol.Ready) -> float:
        """The interval a worker is judged by and heartbeated at: the one it declared (READY
        ``meta.heartbeat_ms``, range-checked by the decoder), else the broker's own. So a
        worker and a broker configured differently neither flap nor need to agree."""
        if ready.heartbeat_ms is not None:
            return ready.heartbeat_ms / 1000.0
        return self.liveness_timeout / self.liveness

    def _grace_if_unserved(self: RouterState, svc: Service, now: float) -> None:
        """With no routable worker left, the queued requests get the grace period a new
        request would: answered together (UNAVAILABLE) when it ends if nobody came back, like
        the requests the last worker held, instead of each waiting out its own deadline."""
        if not svc.n_routable and svc.queue:
            svc.queue.start_grace(now + self.grace)

    def remove_worker(self: RouterState, w: WorkerState, reason: str, now: float) -> None:
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
            if not req.flags & protocol.FLAG_IDEMPOTENT:
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
