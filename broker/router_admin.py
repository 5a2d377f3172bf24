"""The router's control surface, mixed into :class:`zrouter.broker.router.Router`: workers
draining or changing capacity themselves, CURVE authorization, Consul's health verdicts, the
operator's actions (the admin HTTP API), effective weights and credits, and shutdown.

Every method takes ``now`` like the rest of the router and works on its state
(:class:`~zrouter.broker.router_types.RouterState`).
"""

from __future__ import annotations

import logging
from typing import Final

from zrouter import protocol
from zrouter.broker.policies.base import make_policy
from zrouter.broker.router_types import RouterState
from zrouter.broker.slow_start import slow_credit, slow_weight
from zrouter.broker.state import Service, WorkerState

__all__ = ["Admin"]

log = logging.getLogger("zrouter.broker")

_DRAIN: Final = protocol.encode_drain()
_SHUTTING_DOWN: Final = protocol.encode_disconnect("shutting down")


class Admin:
    """Router methods that change workers and services from outside the request path."""

    def worker_drain(self: RouterState, w: WorkerState, now: float) -> None:
        """The worker is leaving: no new work; what it holds may finish. Acknowledged so the
        worker knows nothing more is on its way."""
        if not w.draining:
            log.info("worker %s is draining (%d in flight)", w.instance, w.outstanding,
                     extra={"service": w.service.name, "instance": w.instance})
        w.draining = True
        self._refresh(w)
        self._grace_if_unserved(w.service, now)
        self.sink.to_worker(w.ident, _DRAIN, None)

    def worker_update(self: RouterState, w: WorkerState, capacity: int, weight: int, now: float) -> None:
        w.capacity = capacity
        self._limit(w)
        w.base_weight = weight
        if isinstance(w.declared, protocol.Ready):
            w.declared = w.declared._replace(capacity=capacity, weight=weight)
        self._apply_weight(w, now)
        self._refresh(w)
        self._grace_if_unserved(w.service, now)
        self._pump(w.service, now)

    def admit_worker(self: RouterState, ident: bytes, user_id: str | None, service: str, now: float) -> bool:
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

    def recheck_workers(self: RouterState, now: float) -> int:
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

    def forbid(self: RouterState, client: bytes, crid: int, service: str, why: str) -> None:
        """Answer a request its client's key may not make: FORBIDDEN, counted (also per service)."""
        self.stats.forbidden += 1
        self.count_status(service, protocol.STATUS_FORBIDDEN)
        self.answer(client, crid, protocol.STATUS_FORBIDDEN, why)

    def set_health(self: RouterState, w: WorkerState, healthy: bool, weight: float | None, now: float) -> None:
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

    def drain_worker(self: RouterState, instance: str, now: float) -> WorkerState | None:
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

    def set_worker_weight(self: RouterState, instance: str, weight: float, now: float) -> WorkerState | None:
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

    def set_service_policy(self: RouterState, service: str, policy: str, now: float) -> Service | None:
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

    def _apply_weight(self: RouterState, w: WorkerState, now: float) -> None:
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

    def _refresh(self: RouterState, w: WorkerState) -> None:
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

    def shutdown(self: RouterState, now: float = 0.0) -> None:
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

    def disconnect_all(self: RouterState) -> None:
        """At exit: DISCONNECT "shutting down" to every worker still registered."""
        for w in self.workers.values():
            self.sink.to_worker(w.ident, _SHUTTING_DOWN, None)

    def abandon_inflight(self: RouterState) -> None:
        """At exit: whatever workers still hold gets "outcome unknown"."""
        for w in list(self.workers.values()):
            for req in list(w.inflight.values()):
                self._fail(req, protocol.STATUS_WORKER_LOST, "broker stopped before the worker replied; outcome unknown")
            w.inflight.clear()
            self.n_inflight -= w.outstanding
            w.outstanding = 0
