"""Broker state records: one request, one worker, one service. Plain slotted objects, no I/O."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from zrouter.broker.policies.base import Policy
    from zrouter.broker.queue import ServiceQueue

__all__ = ["DONE", "INFLIGHT", "QUEUED", "Request", "Service", "WorkerState"]

# Request.state values: ints, because they are compared on every dispatch.
QUEUED: Final = 1
INFLIGHT: Final = 2
DONE: Final = 3


class Request:
    """A request the broker has accepted and owes its client exactly one reply for."""

    __slots__ = (
        "attempt",
        "client",
        "crid",
        "deadline",
        "expire_at",
        "flags",
        "key",
        "payload",
        "rid",
        "sent_at",
        "service",
        "state",
        "worker",
    )

    def __init__(
        self,
        client: bytes,
        crid: int,
        service: Service,
        deadline: float,
        attempt: int,
        flags: int,
        key: bytes | None,
        payload: Any,
    ) -> None:
        self.rid = 0  # the broker's id, new for every dispatch so a late reply cannot match
        self.client = client
        self.crid = crid  # the client's own id, echoed in the reply
        self.service = service
        self.deadline = deadline
        self.expire_at = deadline
        self.attempt = attempt
        self.flags = flags
        self.key = key
        self.payload = payload  # kept (a zmq.Frame, not copied) so a requeue can resend it
        self.worker: WorkerState | None = None
        self.sent_at = 0.0
        self.state = 0


class WorkerState:
    """One connected worker as the broker sees it; also the policies' ``Endpoint``."""

    __slots__ = (
        "base_weight",
        "capacity",
        "counted",
        "draining",
        "ewma",
        "ewma_at",
        "fd",
        "health_weight",
        "healthy",
        "ident",
        "in_policy",
        "inflight",
        "key",
        "last_seen",
        "meta",
        "outstanding",
        "served",
        "service",
        "silence_limit",
        "weight",
    )

    def __init__(
        self,
        ident: bytes,
        service: Service,
        capacity: int,
        weight: int,
        meta: dict[str, str],
        now: float,
    ) -> None:
        self.ident = ident
        self.key = (meta.get("instance") or ident.hex()).encode()
        self.service = service
        self.capacity = capacity
        self.outstanding = 0
        self.base_weight = weight  # what the worker declared (or Consul's Weights.Passing)
        self.health_weight: float | None = None  # Consul's say: None = no opinion / no Consul
        self.weight = float(weight)
        self.ewma = 0.0
        self.ewma_at = now
        self.last_seen = now
        self.draining = False
        self.healthy = True  # False while Consul says critical, maintenance or deregistered
        self.inflight: dict[int, Request] = {}
        self.in_policy = False
        self.counted = False  # included in its service's n_routable
        self.fd = -1
        self.silence_limit = 0.0  # seconds without a message before the broker gives up on it
        self.meta = meta
        self.served = 0

    @property
    def instance(self) -> str:
        return self.key.decode()

    def effective_weight(self) -> float:
        return float(self.base_weight) if self.health_weight is None else self.health_weight

    def routable(self) -> bool:
        """May take new work once it has a free credit."""
        return not self.draining and self.healthy and self.weight > 0

    def eligible(self) -> bool:
        return self.outstanding < self.capacity and not self.draining and self.healthy and self.weight > 0

    def __repr__(self) -> str:
        return f"<worker {self.instance} {self.service.name} {self.outstanding}/{self.capacity}>"


class Service:
    """A service name with its workers, its policy and its wait queue."""

    __slots__ = ("created_at", "n_routable", "name", "policy", "queue", "workers")

    def __init__(self, name: str, policy: Policy, queue: ServiceQueue, now: float) -> None:
        self.name = name
        self.policy = policy
        self.queue = queue
        self.workers: dict[bytes, WorkerState] = {}
        self.created_at = now
        # Workers that could serve a request now or once they have a free credit; kept as a
        # count so deciding "unavailable" never scans the workers.
        self.n_routable = 0
