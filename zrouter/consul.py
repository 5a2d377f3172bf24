"""Consul integration: workers and brokers register themselves, brokers and clients watch.

Built on py-consul (``import consul``); every call that reaches Consul raises
:class:`ConsulUnavailable` on failure (connection refused, timeout, HTTP error, no leader, ACL
refusal), so callers can log it and go on: Consul is advisory, ZeroMQ heartbeats stay the
source of truth for liveness.

Where Consul is
    ``consul_addr`` arguments take ``"host:port"``, ``"http://host:port"`` or
    ``"https://host:port"``; when absent, ``CONSUL_HTTP_ADDR`` is used, and when that is absent
    too, Consul's own default ``127.0.0.1:8500``. :func:`consul_address` returns ``None`` in that
    last case, so a program can decide not to use Consul at all. The ACL token is the ``token``
    argument, else ``CONSUL_HTTP_TOKEN``.

Registering (:class:`WorkerRegistration`, :class:`BrokerRegistration`)
    One Consul service instance per (service, instance): service id ``"<service>-<instance>"``,
    ``Meta["instance"] = instance`` (what the broker matches against the instance its workers
    send in READY), ``Weights = {"Passing": weight, "Warning": 1}``, and one TTL check
    ``"zrouter-ttl:<service id>"`` with ``DeregisterCriticalServiceAfter``. The owner calls
    ``pass_ttl()`` more often than the TTL (e.g. from its heartbeat); if the local agent does
    not know the check (never registered, or it restarted and forgot), ``pass_ttl`` registers.
    Consul wants ``Weights.Passing >= 1``: take an instance out with maintenance or deregister().

Watching (:class:`ServiceWatcher`, :class:`BrokerDiscovery`)
    One blocking query (``/v1/health/service/<name>?index=..&wait=..``) loop per service, in its
    own thread; ``on_change(service, instances)`` is called once at start and then whenever the
    view changes. While Consul is unreachable the last view is kept (one WARNING is logged, then
    INFO when Consul is back). Just after Consul comes back, for ``reconnect_grace`` seconds, an
    instance that is missing from Consul's answer is kept in the view, so an agent that restarted
    empty does not take every worker out of rotation before they have re-registered.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

import consul

from zrouter.errors import ZRouterError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DEFAULT_BROKER_SERVICE",
    "DEFAULT_PORT",
    "DEFAULT_TTL",
    "DEFAULT_WAIT",
    "BrokerDiscovery",
    "BrokerRegistration",
    "ConsulUnavailable",
    "Instance",
    "ServiceWatcher",
    "WorkerRegistration",
    "broker_endpoints",
    "consul_address",
    "consul_token",
    "instances_from_health",
]

log = logging.getLogger(__name__)

DEFAULT_PORT: Final = 8500
DEFAULT_BROKER_SERVICE: Final = "zrouter-broker"
DEFAULT_TTL: Final = 10.0  # seconds; owners pass it every ttl/3 or so
DEFAULT_WAIT: Final = "5s"  # blocking-query wait: also bounds how long stop() takes
REQUEST_TIMEOUT: Final = 5.0  # seconds, for every non-blocking call (added to a blocking one's wait)

_T = TypeVar("_T")


class ConsulUnavailable(ZRouterError):
    """Consul could not be reached or refused the call; the message says which call and why."""


# -- addresses and durations ------------------------------------------------------------------


def _endpoint(addr: str | None) -> tuple[str, str, int] | None:
    """(scheme, host, port) from an argument or CONSUL_HTTP_ADDR; None when neither is set."""
    raw = addr if addr is not None else os.environ.get("CONSUL_HTTP_ADDR")
    if raw is None or not raw.strip():
        return None
    raw = raw.strip()
    parsed = urllib.parse.urlsplit(raw if "://" in raw else "//" + raw)
    scheme = parsed.scheme or ("https" if os.environ.get("CONSUL_HTTP_SSL", "").lower() == "true" else "http")
    try:
        port = parsed.port or DEFAULT_PORT
    except ValueError as exc:
        raise ValueError(f"invalid Consul address {raw!r}: {exc}") from None
    if scheme not in ("http", "https") or not parsed.hostname or parsed.path not in ("", "/"):
        raise ValueError(f"invalid Consul address {raw!r}: want host:port or http(s)://host:port")
    return scheme, parsed.hostname, port


def consul_address(addr: str | None = None) -> tuple[str, int] | None:
    """(host, port) of Consul's HTTP API from *addr* or CONSUL_HTTP_ADDR; None if neither is set.

    Accepts ``host``, ``host:port``, ``http://host:port``, ``https://host:port`` and
    ``[v6addr]:port``; the port defaults to 8500. Raises ValueError for anything else.
    """
    ep = _endpoint(addr)
    return None if ep is None else (ep[1], ep[2])


def consul_token(token: str | None = None) -> str | None:
    """The ACL token: *token*, else CONSUL_HTTP_TOKEN, else None."""
    return token if token else (os.environ.get("CONSUL_HTTP_TOKEN") or None)


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS: Final = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(value: float | str) -> float:
    """Seconds in a number of seconds or a Go duration ("5s", "1m30s", "250ms")."""
    if isinstance(value, str):
        parts = _DURATION.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise ValueError(f"invalid duration {value!r}: want e.g. '5s', '250ms', '1m'")
        return sum(float(n) * _UNITS[u] for n, u in parts)
    return float(value)


def _duration(value: float | str) -> str:
    """A Go duration for Consul, from seconds or a Go duration."""
    seconds = _seconds(value)
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    return value if isinstance(value, str) else f"{max(1, round(seconds * 1000))}ms"


def _client(consul_addr: str | None, token: str | None, timeout: float = REQUEST_TIMEOUT) -> Any:
    scheme, host, port = _endpoint(consul_addr) or ("http", "127.0.0.1", DEFAULT_PORT)
    client = consul.Consul(host=host, port=port, scheme=scheme, connections_timeout=timeout)
    # py-consul prefers CONSUL_HTTP_TOKEN over its token argument; ours is the other way round.
    client.token = consul_token(token)
    return client


def _describe(consul_addr: str | None) -> str:
    scheme, host, port = _endpoint(consul_addr) or ("http", "127.0.0.1", DEFAULT_PORT)
    return f"{scheme}://{host}:{port}"


# Transport errors from requests are OSErrors (RequestException derives from IOError); HTTP
# errors and undecodable answers are consul.ConsulException.
_FAILURES: Final = (OSError, consul.ConsulException)


def _call(what: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    try:
        return fn(*args, **kwargs)
    except _FAILURES as exc:
        raise ConsulUnavailable(f"{what}: {exc}") from exc


def _unknown_check(exc: BaseException) -> bool:
    text = str(exc)
    return "does not have associated TTL" in text or "nknown check" in text or text.startswith("404")


# -- registration ------------------------------------------------------------------------------


class _Registration:
    """One service instance and its TTL check on the local Consul agent."""

    def __init__(
        self,
        service: str,
        instance_id: str,
        *,
        address: str | None,
        port: int | None,
        weight: int,
        tags: Iterable[str],
        meta: Mapping[str, str],
        ttl: float | str,
        deregister_after: float | str,
        service_id: str | None,
        consul_addr: str | None,
        token: str | None,
        timeout: float,
    ) -> None:
        if not service or not instance_id:
            raise ValueError("service and instance_id must be non-empty")
        self.service = service
        self.instance_id = instance_id
        self.service_id = service_id or f"{service}-{instance_id}"
        self.check_id = f"zrouter-ttl:{self.service_id}"
        self.address = address
        self.port = port
        self.weight = self._check_weight(weight)
        self.tags = list(tags)
        self.meta = {"instance": instance_id, **{str(k): str(v) for k, v in meta.items()}}
        self.ttl = _duration(ttl)
        self.ttl_seconds = _seconds(ttl)
        self.deregister_after = _duration(deregister_after)
        self.consul_addr = _describe(consul_addr)
        self._client = _client(consul_addr, token, timeout)
        self._lock = threading.RLock()
        self._status = "passing"
        self._state = "new"  # "on" after register() or pass_ttl(), "off" after deregister()

    @staticmethod
    def _check_weight(weight: int) -> int:
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            # Consul rejects Weights.Passing < 1: take an instance out with maintenance or deregister.
            raise ValueError(f"weight must be an integer >= 1, got {weight!r}")
        return weight

    @property
    def registered(self) -> bool:
        """True between register() (or the first pass_ttl()) and deregister(), whether or not
        Consul answered: while True, pass_ttl() registers again if Consul lost the instance."""
        return self._state == "on"

    def _register(self) -> None:
        check = {
            "CheckID": self.check_id,
            "Name": f"zrouter {self.service} TTL",
            "TTL": self.ttl,
            "Status": self._status,
            "DeregisterCriticalServiceAfter": self.deregister_after,
        }
        _call(
            f"register {self.service_id} with Consul at {self.consul_addr}",
            self._client.agent.service.register,
            self.service,
            service_id=self.service_id,
            address=self.address,
            port=self.port,
            tags=self.tags,
            meta=self.meta,
            weights={"Passing": self.weight, "Warning": 1},
            check=check,
            replace_existing_checks=True,
        )

    def register(self) -> None:
        """Register (or register again) the instance and its TTL check, passing at once."""
        with self._lock:
            self._state = "on"
            self._status = "passing"
            self._register()

    def _update_ttl(self, status: str, note: str) -> bool:
        """Set the TTL check; register again first if the agent does not know it. True if it did."""
        with self._lock:
            if self._state == "off":
                return False
            self._state = "on"
            self._status = status
            update = {
                "passing": self._client.agent.check.ttl_pass,
                "warning": self._client.agent.check.ttl_warn,
                "critical": self._client.agent.check.ttl_fail,
            }[status]
            what = f"update TTL check {self.check_id} on Consul at {self.consul_addr}"
            try:
                known = bool(update(self.check_id, note or None))
            except consul.ConsulException as exc:
                if not _unknown_check(exc):
                    raise ConsulUnavailable(f"{what}: {exc}") from exc
                known = False
            except OSError as exc:
                raise ConsulUnavailable(f"{what}: {exc}") from exc
            if known:
                return False
            log.info("Consul at %s does not know %s (not registered yet, or the agent restarted): "
                     "registering", self.consul_addr, self.service_id)
            self._register()
            _call(what, update, self.check_id, note or None)
            return True

    def pass_ttl(self, note: str = "") -> bool:
        """Mark the TTL check passing. Registers (again) if the agent does not know the check: not
        registered yet, or the agent restarted and forgot it; returns True then. Does nothing
        after deregister() until register() is called again."""
        return self._update_ttl("passing", note)

    def warn_ttl(self, note: str = "") -> bool:
        """Mark the TTL check warning (the instance then weighs Weights.Warning = 1)."""
        return self._update_ttl("warning", note)

    def fail_ttl(self, note: str = "") -> bool:
        """Mark the TTL check critical (the instance is then not routable)."""
        return self._update_ttl("critical", note)

    def set_weight(self, weight: int) -> None:
        """Change Weights.Passing (registers the service again, keeping the check's status)."""
        with self._lock:
            self.weight = self._check_weight(weight)
            if self._state == "on":
                self._register()

    def deregister(self) -> None:
        """Remove the instance and its check from the agent."""
        with self._lock:
            self._state = "off"
            _call(
                f"deregister {self.service_id} from Consul at {self.consul_addr}",
                self._client.agent.service.deregister,
                self.service_id,
            )

    def close(self) -> None:
        """deregister(), logging instead of raising if Consul cannot be reached."""
        try:
            self.deregister()
        except ConsulUnavailable as exc:
            log.warning("%s", exc)

    def __enter__(self) -> Self:
        self.register()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.service_id} weight={self.weight} ttl={self.ttl}>"


class WorkerRegistration(_Registration):
    """A worker instance of *service* in Consul.

    *address*/*port* are informative (workers connect out to the broker); *weight* becomes
    ``Weights.Passing`` (``Weights.Warning`` is 1); *meta* is added to ``{"instance": instance_id}``;
    *ttl* is in seconds or a Go duration and should be a few heartbeat intervals (pass_ttl every
    heartbeat or so); after *deregister_after* critical, Consul removes the instance itself
    (Consul raises anything under 1 minute to 1 minute, and reaps every 30 s or so).
    """

    def __init__(
        self,
        service: str,
        instance_id: str,
        *,
        address: str,
        port: int = 0,
        weight: int = 1,
        tags: Iterable[str] = (),
        meta: Mapping[str, str] | None = None,
        ttl: float | str = DEFAULT_TTL,
        deregister_after: float | str = "1m",
        service_id: str | None = None,
        consul_addr: str | None = None,
        token: str | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        super().__init__(
            service, instance_id, address=address, port=port or None, weight=weight, tags=tags,
            meta=meta or {}, ttl=ttl, deregister_after=deregister_after, service_id=service_id,
            consul_addr=consul_addr, token=token, timeout=timeout,
        )


def _split_tcp(endpoint: str) -> tuple[str, int] | None:
    """(host, port) of a ``tcp://host:port`` endpoint, else None."""
    if not endpoint.startswith("tcp://"):
        return None
    host, sep, port = endpoint[6:].rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


_WILDCARDS: Final = frozenset({"*", "0.0.0.0", "::", ""})


class BrokerRegistration(_Registration):
    """A broker in Consul: service *service* (default ``zrouter-broker``) with
    ``Meta = {"frontend": ..., "backend": ..., "instance": ...}``.

    Advertise endpoints others can connect to; a wildcard host (``tcp://*:5555``) is replaced by
    the instance's address when discovered. *address*/*port* default to the frontend's host and
    port (the agent's address when the host is a wildcard). *instance_id* defaults to
    ``<hostname>-<pid>``.
    """

    def __init__(
        self,
        frontend: str,
        backend: str,
        *,
        instance_id: str | None = None,
        service: str = DEFAULT_BROKER_SERVICE,
        address: str | None = None,
        port: int | None = None,
        weight: int = 1,
        tags: Iterable[str] = (),
        meta: Mapping[str, str] | None = None,
        ttl: float | str = DEFAULT_TTL,
        deregister_after: float | str = "1m",
        consul_addr: str | None = None,
        token: str | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.frontend = frontend
        self.backend = backend
        hp = _split_tcp(frontend)
        if address is None and hp is not None and hp[0] not in _WILDCARDS:
            address = hp[0]
        if port is None and hp is not None:
            port = hp[1]
        super().__init__(
            service, instance_id or f"{socket.gethostname()}-{os.getpid()}", address=address,
            port=port or None, weight=weight, tags=tags,
            meta={**(meta or {}), "frontend": frontend, "backend": backend}, ttl=ttl,
            deregister_after=deregister_after, service_id=None, consul_addr=consul_addr, token=token,
            timeout=timeout,
        )


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

