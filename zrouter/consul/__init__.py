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

from zrouter.consul._common import (
    DEFAULT_BROKER_SERVICE,
    DEFAULT_PORT,
    DEFAULT_TTL,
    DEFAULT_WAIT,
    ConsulUnavailable,
    consul_address,
    consul_token,
)
from zrouter.consul.registration import BrokerRegistration, WorkerRegistration
from zrouter.consul.watch import (
    BrokerDiscovery,
    Instance,
    ServiceWatcher,
    broker_endpoints,
    instances_from_health,
)

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
