"""The broker's settings: one field per command-line flag (zrouter.broker.cli), with the checks
that bounds which contradict each other fail at start-up rather than on some request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from zrouter import limits

__all__ = ["SHUTDOWN_GRACE", "BrokerConfig"]

# How long a stopping broker waits for workers to answer what they hold.
SHUTDOWN_GRACE: Final = 5.0


@dataclass
class BrokerConfig:
    frontend: str = "tcp://127.0.0.1:5555"
    backend: str = "tcp://127.0.0.1:5556"
    heartbeat_interval: float = 1.0
    liveness: int = 3
    default_policy: str = "least-outstanding"
    service_policies: dict[str, str] = field(default_factory=dict)
    max_queue: int = 10_000
    max_attempts: int = 3
    grace: float = 1.0
    max_message_size: int = limits.MAX_MESSAGE_SIZE
    # Memory bounds (zrouter/limits.py and README.md say what each one holds).
    max_services: int = limits.MAX_SERVICES
    max_client_requests: int = limits.MAX_CLIENT_REQUESTS
    max_client_bytes: int = limits.MAX_CLIENT_BYTES
    max_client_unread: int = limits.MAX_CLIENT_UNREAD
    max_client_unread_bytes: int = limits.MAX_CLIENT_UNREAD_BYTES
    max_capacity: int = limits.MAX_CAPACITY
    max_worker_bytes: int = limits.MAX_WORKER_BYTES
    shutdown_grace: float = SHUTDOWN_GRACE
    stats_interval: float = 30.0
    consul: str | None = None  # address of a Consul agent; None: the embedded registry only
    consul_token: str | None = None
    broker_service: str = "zrouter-broker"
    advertise_frontend: str | None = None
    advertise_backend: str | None = None
    slow_start: float = 0.0  # seconds over which a new worker's weight and credits ramp up; 0 = off
    service_slow_start: dict[str, float] = field(default_factory=dict)
    http: str | None = None  # HOST:PORT for metrics, status, dashboard and admin (None: no HTTP)
    admin_token: str | None = None  # enables the admin actions on the HTTP side
    # CURVE (broker/auth.py): this broker's .key_secret file turns it on for both sockets.
    curve_secret_key: str | None = None
    worker_keys: str | None = None  # directory of allowed workers' public .key files
    client_keys: str | None = None  # the same for clients; None: any client key but a worker's

    def check(self) -> None:
        """Raise ValueError for bounds that contradict each other (a payload the size limit
        allows must fit in a client's bounds, or it could never be served)."""
        for name in ("max_message_size", "max_services", "max_client_requests", "max_client_bytes",
                     "max_client_unread", "max_client_unread_bytes", "max_capacity", "max_worker_bytes",
                     "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("max_client_bytes", "max_client_unread_bytes"):
            if getattr(self, name) < self.max_message_size:
                raise ValueError(f"{name} ({getattr(self, name)}) must be at least max_message_size "
                                 f"({self.max_message_size})")
