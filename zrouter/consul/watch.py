"""Watching services with blocking queries; discovering brokers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final



if TYPE_CHECKING:
    from typing_extensions import Self

from zrouter.consul._common import (
    _split_tcp,
    DEFAULT_BROKER_SERVICE,
    DEFAULT_WAIT,
    _FAILURES,
    _WILDCARDS,
    _client,
    _describe,
    _seconds,
    log,
)

__all__ = ["BrokerDiscovery", "Instance", "ServiceWatcher", "broker_endpoints", "instances_from_health"]

# -- what a watcher sees -----------------------------------------------------------------------

_SEVERITY: Final = {"passing": 0, "warning": 1, "critical": 2}


@dataclass
class Instance:
    """One instance of a service as Consul's health endpoint reports it."""

    instance_id: str  # Meta["instance"], else the Consul service id
    service: str
    status: str  # worst of its checks (node checks included): "passing" | "warning" | "critical"
    maintenance: bool  # service or node maintenance mode is on
    weight_passing: int
    weight_warning: int
    meta: dict[str, str]
    address: str  # the service's address, else its node's
    port: int
    service_id: str = ""
    tags: tuple[str, ...] = ()
    node: str = ""

    @property
    def effective_weight(self) -> int:
        """Weights.Passing when passing, Weights.Warning when warning, 0 when critical."""
        if self.status == "passing":
            return self.weight_passing
        if self.status == "warning":
            return self.weight_warning
        return 0

    @property
    def routable(self) -> bool:
        return self.status != "critical" and not self.maintenance


def _instance(entry: Mapping[str, Any]) -> Instance:
    svc = entry.get("Service") or {}
    node = entry.get("Node") or {}
    worst, maintenance = 0, False
    for check in entry.get("Checks") or ():
        check_id = str(check.get("CheckID", ""))
        if check_id.startswith(("_service_maintenance:", "_node_maintenance")):
            maintenance = True
        worst = max(worst, _SEVERITY.get(str(check.get("Status", "")), 2))
    weights = svc.get("Weights") or {}
    meta = {str(k): str(v) for k, v in (svc.get("Meta") or {}).items()}
    service_id = str(svc.get("ID", ""))
    return Instance(
        instance_id=meta.get("instance") or service_id,
        service=str(svc.get("Service", "")),
        status=("passing", "warning", "critical")[worst],
        maintenance=maintenance,
        weight_passing=int(weights.get("Passing", 1)),
        weight_warning=int(weights.get("Warning", 1)),
        meta=meta,
        address=str(svc.get("Address") or node.get("Address") or ""),
        port=int(svc.get("Port") or 0),
        service_id=service_id,
        tags=tuple(str(t) for t in svc.get("Tags") or ()),
        node=str(node.get("Node", "")),
    )


def instances_from_health(entries: Iterable[Mapping[str, Any]]) -> list[Instance]:
    """Instances from a ``/v1/health/service/<name>`` answer, sorted by instance id."""
    return sorted((_instance(e) for e in entries), key=lambda i: (i.instance_id, i.service_id))


# -- watching ----------------------------------------------------------------------------------

OnChange = Callable[[str, list[Instance]], None]
OnStatus = Callable[[bool], None]
BACKOFF_MIN: Final = 0.5
BACKOFF_MAX: Final = 5.0


class ServiceWatcher(threading.Thread):
    """Watches services in Consul with blocking queries; a daemon thread.

    *services* is an iterable of names, or a callable returning the names to watch now (asked
    every *refresh* seconds; names it stops returning are no longer watched). ``on_change(service,
    instances)`` is called once per service when its first answer arrives, then whenever the view
    (the sorted :class:`Instance` list) changes; ``on_status(up)`` when Consul becomes reachable or
    unreachable. Both are called from watcher threads, never two at a time, and an exception they
    raise is logged. *wait* is the blocking-query wait (seconds or Go duration): ``stop()`` plus
    ``join()`` take at most about ``wait * 17/16 + 1`` s, so keep it short (default 5 s).

    While Consul is unreachable nothing is delivered (the last view stands; one WARNING, then one
    INFO when it answers again; backoff 0.5 s doubling to 5 s). For *reconnect_grace* seconds
    after it answers again (or after its index went backwards: it restarted), instances missing
    from its answers stay in the view as last seen; 0 delivers Consul's answer as it is.
    """

    def __init__(
        self,
        services: Iterable[str] | Callable[[], Iterable[str]],
        on_change: OnChange,
        consul_addr: str | None = None,
        token: str | None = None,
        wait: float | str = DEFAULT_WAIT,
        *,
        on_status: OnStatus | None = None,
        reconnect_grace: float = 10.0,
        refresh: float = 1.0,
        name: str = "zrouter-consul-watcher",
    ) -> None:
        super().__init__(name=name, daemon=True)
        if isinstance(services, str):
            services = [services]
        self._source: Callable[[], Iterable[str]] | None = services if callable(services) else None
        self._explicit: set[str] = set() if callable(services) else set(services)
        self._on_change = on_change
        self._on_status = on_status
        self._consul_addr = consul_addr
        self._token = token
        self.wait_seconds = _seconds(wait)
        self.reconnect_grace = reconnect_grace
        self.refresh = refresh
        self.address = _describe(consul_addr)
        self._lock = threading.RLock()  # state + callbacks: callbacks run one at a time
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._loops: dict[str, _WatchLoop] = {}
        self._views: dict[str, list[Instance]] = {}
        self._up: bool | None = None

    # -- public --------------------------------------------------------------------------------

    def add_service(self, name: str) -> None:
        """Start watching *name* too (at once if running)."""
        with self._lock:
            self._explicit.add(name)
        self._wake.set()

    def remove_service(self, name: str) -> None:
        """Stop watching *name* (unless the services callable still returns it)."""
        with self._lock:
            self._explicit.discard(name)
        self._wake.set()

    @property
    def services(self) -> frozenset[str]:
        """The services watched now."""
        with self._lock:
            return frozenset(self._loops)

    def view(self, service: str) -> list[Instance] | None:
        """The last view delivered for *service*; None before its first answer."""
        with self._lock:
            v = self._views.get(service)
            return None if v is None else list(v)

    @property
    def up(self) -> bool | None:
        """Whether Consul answered the last query; None before any answer or error."""
        return self._up

    def stop(self, timeout: float | None = None) -> None:
        """Stop watching; with *timeout*, also join for at most that long. No callback runs after
        stop() has returned (except one already running)."""
        self._stopping.set()
        self._wake.set()
        if timeout is not None and self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    # -- supervisor thread ---------------------------------------------------------------------

    def _wanted(self) -> set[str]:
        wanted = set(self._explicit)
        if self._source is not None:
            try:
                wanted |= {str(s) for s in self._source()}
            except Exception:  # a broken callable must not kill the watcher
                log.exception("services callable of %s failed; keeping the current set", self.name)
                wanted |= set(self._loops)
        return wanted

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                with self._lock:
                    wanted = self._wanted()
                    for gone in set(self._loops) - wanted:
                        self._loops.pop(gone).halt()
                        self._views.pop(gone, None)
                    for new in sorted(wanted - set(self._loops)):
                        loop = _WatchLoop(self, new)
                        self._loops[new] = loop
                        loop.start()
                self._wake.wait(self.refresh if self._source is not None else None)
        finally:
            with self._lock:
                loops = list(self._loops.values())
            for loop in loops:
                loop.halt()
            deadline = time.monotonic() + self.wait_seconds * 17 / 16 + 1.0
            for loop in loops:
                loop.join(max(0.0, deadline - time.monotonic()))

    # -- called by the loops -------------------------------------------------------------------

    def _set_up(self, up: bool, error: BaseException | None = None) -> None:
        with self._lock:
            if self._up is up or self._stopping.is_set():
                if error is not None:
                    log.debug("Consul at %s: %s", self.address, error)
                return
            before, self._up = self._up, up
            if not up:
                log.warning("Consul unreachable at %s (%s), keeping last known view", self.address, error)
            elif before is False:
                log.info("Consul reachable again at %s", self.address)
            if self._on_status is not None:
                try:
                    self._on_status(up)
                except Exception:
                    log.exception("on_status callback failed")

    def _deliver(self, service: str, instances: list[Instance], loop: _WatchLoop) -> None:
        with self._lock:
            if self._stopping.is_set() or self._loops.get(service) is not loop:
                return
            if self._views.get(service) == instances:
                return
            self._views[service] = list(instances)
            try:
                self._on_change(service, list(instances))
            except Exception:
                log.exception("on_change callback failed for %s", service)

    def _last_view(self, service: str) -> list[Instance] | None:
        with self._lock:
            return self._views.get(service)


class _WatchLoop(threading.Thread):
    """The blocking-query loop of one service."""

    def __init__(self, watcher: ServiceWatcher, service: str) -> None:
        super().__init__(name=f"{watcher.name}:{service}", daemon=True)
        self.watcher = watcher
        self.service = service
        self._halt = threading.Event()
        self._client = _client(watcher._consul_addr, watcher._token)

    def halt(self) -> None:
        self._halt.set()

    def _halted(self) -> bool:
        return self._halt.is_set() or self.watcher._stopping.is_set()

    def run(self) -> None:
        w = self.watcher
        index = 0  # 0: ask without blocking
        backoff = BACKOFF_MIN
        failed = False  # since the last answer
        grace_until = 0.0
        while not self._halted():
            now = time.monotonic()
            wait = w.wait_seconds if now >= grace_until else min(w.wait_seconds, max(0.1, grace_until - now))
            try:
                if index > 0:
                    new, entries = self._client.health.service(
                        self.service, index=index, wait=f"{max(1, round(wait * 1000))}ms"
                    )
                else:
                    new, entries = self._client.health.service(self.service)
                new_index = int(new or 0)
                instances = instances_from_health(entries or ())
            except _FAILURES as exc:
                if self._halted():
                    return
                w._set_up(False, exc)
                failed, index = True, 0
                self._halt.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            except Exception:  # an answer we cannot read: log it, retry later
                log.exception("watch of %s: unexpected answer from Consul at %s", self.service, w.address)
                index = 0
                self._halt.wait(BACKOFF_MAX)
                continue
            if self._halted():
                return
            w._set_up(True)
            backoff = BACKOFF_MIN
            last = w._last_view(self.service)
            if (failed or new_index < index) and last is not None and w.reconnect_grace > 0:
                # Consul is back (and may have restarted empty): keep missing instances a while.
                grace_until = time.monotonic() + w.reconnect_grace
            failed = False
            index = max(new_index, 1)  # an index must never go back to 0 (it would not block)
            if last is not None and time.monotonic() < grace_until:
                seen = {i.instance_id for i in instances}
                instances = sorted(
                    instances + [i for i in last if i.instance_id not in seen],
                    key=lambda i: (i.instance_id, i.service_id),
                )
            w._deliver(self.service, instances, self)


# -- brokers -----------------------------------------------------------------------------------


def _connectable(endpoint: str, host: str) -> str:
    hp = _split_tcp(endpoint)
    if hp is None or hp[0] not in _WILDCARDS or not host:
        return endpoint
    return f"tcp://[{host}]:{hp[1]}" if ":" in host else f"tcp://{host}:{hp[1]}"


def broker_endpoints(instances: Iterable[Instance]) -> list[tuple[str, str]]:
    """Sorted, distinct (frontend, backend) pairs of the routable broker instances."""
    pairs = {
        (_connectable(i.meta["frontend"], i.address), _connectable(i.meta["backend"], i.address))
        for i in instances
        if i.routable and i.meta.get("frontend") and i.meta.get("backend")
    }
    return sorted(pairs)


class BrokerDiscovery:
    """Watches the broker service and calls ``on_change([(frontend, backend), ...])`` once at
    start and whenever the set of routable brokers changes (see :class:`ServiceWatcher`)."""

    def __init__(
        self,
        on_change: Callable[[list[tuple[str, str]]], None],
        *,
        service: str = DEFAULT_BROKER_SERVICE,
        consul_addr: str | None = None,
        token: str | None = None,
        wait: float | str = DEFAULT_WAIT,
        on_status: OnStatus | None = None,
        reconnect_grace: float = 10.0,
    ) -> None:
        self.service = service
        self._on_change = on_change
        self._endpoints: list[tuple[str, str]] | None = None
        self.watcher = ServiceWatcher(
            [service], self._changed, consul_addr=consul_addr, token=token, wait=wait,
            on_status=on_status, reconnect_grace=reconnect_grace, name="zrouter-broker-discovery",
        )

    @property
    def endpoints(self) -> list[tuple[str, str]] | None:
        """The last pairs delivered; None before Consul first answered."""
        return None if self._endpoints is None else list(self._endpoints)

    @property
    def up(self) -> bool | None:
        return self.watcher.up

    def _changed(self, service: str, instances: list[Instance]) -> None:
        pairs = broker_endpoints(instances)
        if pairs != self._endpoints:
            self._endpoints = pairs
            self._on_change(list(pairs))

    def start(self) -> None:
        self.watcher.start()

    def stop(self, timeout: float | None = None) -> None:
        self.watcher.stop(timeout)

    def join(self, timeout: float | None = None) -> None:
        self.watcher.join(timeout)

    def is_alive(self) -> bool:
        return self.watcher.is_alive()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(self.watcher.wait_seconds * 17 / 16 + 1.0)


