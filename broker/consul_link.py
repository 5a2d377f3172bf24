"""The broker's Consul link: membership, health and weights from Consul, combined with heartbeats.

With Consul configured, a worker gets new work only while it is connected and heartbeating
(the router's own registry) **and** Consul lists it routable: its checks pass or warn, it is not
in maintenance, it is registered. Warning lowers its weight to ``Weights.Warning``; critical,
maintenance or deregistration drain it (what it holds finishes). Weights changed in Consul take
effect on the next blocking-query answer.

Consul flapping must never take every worker down: the watcher keeps the last known view while
Consul is unreachable, and a worker that connects during an outage is judged by heartbeats
alone until Consul answers again.

Threads: Consul answers arrive on watcher threads and are handed to the broker loop with
``Broker.call_soon``; the broker's own TTL check is passed from a small thread of its own, so
no HTTP call ever runs on the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from zrouter.consul import BrokerRegistration, ConsulUnavailable, Instance, ServiceWatcher

from zrouter.broker.state import WorkerState
from zrouter.broker.router import Router

__all__ = ["ConsulLink"]

log = logging.getLogger("zrouter.broker.consul")


class BrokerLoop(Protocol):
    """What the link needs of the broker it serves (``zrouter.broker.server.Broker``); named
    here so this module does not import the one that imports it."""

    router: Router
    frontend_endpoint: str
    backend_endpoint: str

    def call_soon(self, fn: Callable[[], None]) -> None: ...


class ConsulLink:
    def __init__(
        self,
        broker: BrokerLoop,
        consul_addr: str | None,
        token: str | None = None,
        *,
        broker_service: str = "zrouter-broker",
        advertise_frontend: str | None = None,
        advertise_backend: str | None = None,
        register: bool = True,
        ttl: float = 10.0,
        wait: str = "5s",
    ) -> None:
        self.broker = broker
        self.router = broker.router
        self.consul_addr = consul_addr
        self.token = token
        self.broker_service = broker_service
        self.advertise = (advertise_frontend, advertise_backend)
        self.register = register
        self.ttl = ttl
        self.views: dict[str, dict[str, Instance]] = {}
        self.up: bool | None = None
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self.registration: BrokerRegistration | None = None
        self.watcher = ServiceWatcher(
            [], self._on_change_threadsafe, consul_addr, token, wait, on_status=self._on_status_threadsafe
        )
        self._ttl_thread = threading.Thread(target=self._keep_registered, name="zrouter-broker-ttl", daemon=True)
        self.router.on_join = self._on_join

    def start(self) -> None:
        for name in self.router.services:
            self.watcher.add_service(name)
        self.watcher.start()
        if self.register:
            front = self.advertise[0] or self.broker.frontend_endpoint
            back = self.advertise[1] or self.broker.backend_endpoint
            self.registration = BrokerRegistration(
                front, back, service=self.broker_service, ttl=self.ttl, consul_addr=self.consul_addr, token=self.token
            )
            self._ttl_thread.start()
        log.info("tracking workers through Consul at %s", self.watcher.address)

    def stop(self) -> None:
        self._stop.set()
        self.watcher.stop()
        if self._ttl_thread.is_alive():
            self._ttl_thread.join(timeout=5)
        if self.registration is not None:
            self.registration.close()  # deregisters; logs rather than raises

    def _keep_registered(self) -> None:
        assert self.registration is not None
        interval = max(self.ttl / 3.0, 0.2)  # three chances per TTL before the check goes critical
        failing = False
        first = True
        while not self._stop.is_set():
            try:
                # register() first: pass_ttl() would register too, but log it as an agent that
                # forgot us. After that pass_ttl() re-registers if the agent restarts empty.
                if first:
                    self.registration.register()
                    log.info("registered in Consul as %s (%s)", self.registration.service_id, self.broker_service)
                    first = False
                else:
                    self.registration.pass_ttl()
                if failing:
                    log.info("broker registration in Consul restored")
                failing = False
            except ConsulUnavailable as exc:
                if not failing:
                    log.warning("cannot refresh the broker's Consul registration: %s", exc)
                failing = True
            self._stop.wait(interval)

    # -- watcher threads -> broker loop -------------------------------------------------------

    def _on_change_threadsafe(self, service: str, instances: list[Instance]) -> None:
        self.broker.call_soon(lambda: self._apply_view(service, instances))

    def _on_status_threadsafe(self, up: bool) -> None:
        self.broker.call_soon(lambda: self._apply_status(up))

    # -- on the broker loop -------------------------------------------------------------------

    def _apply_view(self, service: str, instances: list[Instance]) -> None:
        self.views[service] = {i.instance_id: i for i in instances}
        svc = self.router.services.get(service)
        if svc is not None:
            now = time.monotonic()
            for w in list(svc.workers.values()):
                self._judge(w, now)

    def _apply_status(self, up: bool) -> None:
        before, self.up = self.up, up
        if not up:
            log.warning("Consul unreachable: routing on heartbeats with the last known view")
        elif before is False:  # not on the first answer: nothing was "again" about it
            log.info("Consul reachable again: following its view")
        now = time.monotonic()
        for w in list(self.router.workers.values()):
            self._judge(w, now)

    def _on_join(self, w: WorkerState, now: float) -> None:
        self.watcher.add_service(w.service.name)
        self._judge(w, now, apply=False)

    def _judge(self, w: WorkerState, now: float, apply: bool = True) -> None:
        """Combine Consul's view of one worker with its connection state."""
        view = self.views.get(w.service.name)
        inst = view.get(w.instance) if view is not None else None
        if inst is not None:
            healthy = inst.routable
            weight: float | None = float(inst.effective_weight) if healthy else None
            self._warned.discard(w.instance)
        elif self.up is False:
            healthy, weight = True, None  # Consul is away: heartbeats alone decide
        else:
            healthy, weight = False, None
            if view is not None and w.instance not in self._warned:
                self._warned.add(w.instance)
                log.info("worker %s is connected but not (yet) registered in Consul: no new work until it is", w.instance)
        changed = (healthy, weight) != (w.healthy, w.health_weight)
        if apply:
            self.router.set_health(w, healthy, weight, now)
        else:  # joining: the router applies weight and membership right after on_join
            w.healthy = healthy
            w.health_weight = weight
        if changed and inst is not None:
            # One line per change (not per answer), at join too: operators see maintenance,
            # warnings and weight edits take effect, and tests can wait for them.
            log.info("worker %s: Consul says %s%s: %s", w.instance, inst.status,
                     " (maintenance)" if inst.maintenance else "",
                     f"routable, weight {weight:g}" if weight is not None else "no new work")
