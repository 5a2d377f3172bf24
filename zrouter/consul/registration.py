"""Registering a worker or a broker as a Consul service instance with a TTL check."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import consul


if TYPE_CHECKING:
    from typing_extensions import Self

from zrouter.consul._common import (
    _split_tcp,
    ConsulUnavailable,
    DEFAULT_BROKER_SERVICE,
    DEFAULT_TTL,
    REQUEST_TIMEOUT,
    _WILDCARDS,
    _call,
    _client,
    _describe,
    _duration,
    _seconds,
    _unknown_check,
    log,
)

__all__ = ["BrokerRegistration", "WorkerRegistration"]

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


