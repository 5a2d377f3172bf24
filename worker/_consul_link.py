"""The worker's Consul side: its own service registration, and finding brokers through Consul.

:class:`ConsulRegistration` is the ``registration`` hook the worker drives (``register()`` at
start, ``pass_ttl(note)`` once per heartbeat interval while healthy, ``deregister()`` on a clean
exit; see ``_registration``) wrapped around :class:`zrouter.consul.WorkerRegistration`. It adds
what a hook called every heartbeat needs: Consul being away is logged once (and once more when it
is back), not every interval with a traceback.

:class:`BrokerFollower` watches the broker service (``zrouter-broker`` by default) and hands the
routable brokers' back-end endpoints to ``Worker.set_brokers``; the worker then connects to each
and splits its capacity between them, so several brokers can never together overfill it.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Mapping

from zrouter.consul import BrokerDiscovery, ConsulUnavailable, WorkerRegistration

__all__ = ["MIN_TTL", "BrokerFollower", "ConsulRegistration", "consul_ttl"]

log = logging.getLogger("zrouter.worker")

# Floor for the TTL check: a pass is an HTTP round trip to the agent, and a TTL of a few hundred
# milliseconds would turn one slow answer (a GC pause, a busy agent) into a critical check and a
# drained worker.
MIN_TTL = 2.0


def consul_ttl(heartbeat_interval: float, liveness: int) -> float:
    """The TTL check's period: as long as the broker's patience with silent workers
    (``liveness`` heartbeats), so Consul and the broker give up on a hung worker at about the same
    time; the worker passes it every heartbeat, i.e. ``liveness`` times per TTL. At least
    :data:`MIN_TTL`."""
    return max(MIN_TTL, heartbeat_interval * liveness)


class ConsulRegistration:
    """A worker's Consul service instance, as the worker's ``registration`` hook.

    Service id: the worker's instance id when it already names the service (the default
    ``<service>-<host>-<pid>-<random>``), so the id in ``consul maint -service=ID`` is the one in
    the broker's and the worker's logs; else Consul's usual ``<service>-<instance>``.
    """

    def __init__(
        self,
        service: str,
        instance_id: str,
        *,
        consul: str,
        token: str | None,
        weight: int,
        meta: Mapping[str, str],
        tags: Iterable[str],
        heartbeat_interval: float,
        liveness: int,
    ) -> None:
        self.registration = WorkerRegistration(
            service,
            instance_id,
            address=socket.gethostname(),  # informative: workers connect out, nobody dials them
            weight=weight,
            tags=tags,
            meta=meta,
            ttl=consul_ttl(heartbeat_interval, liveness),
            deregister_after="1m",  # Consul's minimum: a SIGKILLed worker's entry is reaped
            service_id=instance_id if instance_id.startswith(f"{service}-") else None,
            consul_addr=consul,
            token=token,
        )
        self._failing = False

    @property
    def service_id(self) -> str:
        return self.registration.service_id

    def _failed(self, exc: ConsulUnavailable) -> None:
        if not self._failing:
            log.warning("Consul registration of %s: %s (retrying every heartbeat)", self.service_id, exc)
        self._failing = True

    def _ok(self) -> None:
        if self._failing:
            log.info("Consul registration of %s restored", self.service_id)
        self._failing = False

    def register(self) -> None:
        r = self.registration
        try:
            r.register()
        except ConsulUnavailable as exc:
            # register() left it marked registered: the next pass_ttl() registers when Consul is back.
            self._failed(exc)
            return
        self._ok()
        log.info("registered in Consul at %s as %s (weight %d, TTL %s)", r.consul_addr, r.service_id, r.weight, r.ttl)

    def pass_ttl(self, note: str = "") -> None:
        try:
            self.registration.pass_ttl(note)  # registers again if the agent forgot us (restart)
        except ConsulUnavailable as exc:
            self._failed(exc)
            return
        self._ok()

    def deregister(self) -> None:
        try:
            self.registration.deregister()
        except ConsulUnavailable as exc:
            # The TTL check goes critical and DeregisterCriticalServiceAfter reaps the entry.
            log.warning("could not deregister %s from Consul: %s", self.service_id, exc)
            return
        log.info("deregistered %s from Consul", self.service_id)


class BrokerFollower:
    """Keeps a worker connected to the brokers Consul lists as routable (their back ends).

    An empty list is not applied: with no broker listed (all of them failing their checks, or
    Consul answering from an empty catalog) the worker keeps the connections it has. A broker that
    is really gone then costs only reconnect attempts, while following the empty list would
    disconnect the worker from brokers that may well be alive.
    """

    def __init__(
        self,
        set_brokers: Callable[[list[str]], None],
        *,
        service: str,
        consul: str,
        token: str | None,
    ) -> None:
        self._set_brokers = set_brokers
        self.service = service
        self._lock = threading.Lock()
        self._applied: list[str] | None = None
        self.discovery = BrokerDiscovery(self._changed, service=service, consul_addr=consul, token=token)

    def _changed(self, pairs: list[tuple[str, str]]) -> None:
        backends = sorted({backend for _, backend in pairs})
        with self._lock:
            if not backends:
                log.warning("Consul lists no routable broker under %r: keeping %s", self.service,
                            ", ".join(self._applied or []) or "none")
                return
            if backends == self._applied:
                return
            self._applied = backends
        log.info("brokers from Consul (%s): %s", self.service, ", ".join(backends))
        self._set_brokers(backends)

    def start(self) -> None:
        log.info("discovering brokers through Consul at %s (service %r)", self.discovery.watcher.address, self.service)
        self.discovery.start()

    def stop(self) -> None:
        # No join: the watcher is a daemon thread and delivers nothing once stop() has returned;
        # joining would hold the worker's exit for up to one blocking-query wait.
        self.discovery.stop()
