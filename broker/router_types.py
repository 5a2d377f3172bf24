"""What the router's parts share: the types it sends through (:class:`Sink`), asks
(:class:`Access`), counts in (:class:`Stats`) and refuses with (:class:`Refused`), and
:class:`RouterState`, the router's state as its mixins (zrouter.broker.router_timers,
zrouter.broker.router_admin, zrouter.broker.router_members) see it. ``zrouter.broker.router``
re-exports the public ones."""

from __future__ import annotations

import random
import itertools
from dataclasses import asdict, dataclass
from collections.abc import Callable
from typing import Any, Final, Protocol

from zrouter import protocol

from zrouter.broker.counters import ServiceStats
from zrouter.broker.state import ClientLoad, Request, Service, WorkerState

__all__ = ["HELD_SLACK", "SLOTS_PER_S", "Access", "Refused", "RouterState", "Sink", "Stats"]

# Requests workers hold are filed by deadline in slots of 1/SLOTS_PER_S seconds (a slot is a
# list: filing costs an append, not a heap operation per request); a slot is looked at once its
# end has passed, so the broker answers a held request at most 1/SLOTS_PER_S s after its
# deadline. Entries of requests answered since are skipped then; when they outnumber live ones
# by more than HELD_SLACK, the slots are rebuilt from what workers hold.
SLOTS_PER_S: Final = 100.0
HELD_SLACK: Final = 1024


class Refused(Exception):
    """A READY the broker will not register. The text is the DISCONNECT reason to send back (in
    the protocol's words, never quoting more than a bounded field); ``kind`` labels the refusal
    for the bad-message counters (None: not the peer's fault, e.g. the broker is stopping)."""

    def __init__(self, kind: str | None, text: str) -> None:
        super().__init__(text)
        self.kind = kind


class Sink(Protocol):
    """Where the router's messages go. ``to_worker`` returns False if the worker is unreachable."""

    def to_worker(self, ident: bytes, header: bytes, payload: Any) -> bool: ...

    def to_client(self, client: bytes, header: bytes, payload: Any) -> None: ...


class Access(Protocol):
    """Which services a worker's CURVE key may serve (``zrouter.broker.auth.Keyring``).

    ``key`` is the connection's User-Id as ZAP set it (its Z85 public key); the answer is the
    reason for a refusal, or None when allowed."""

    def worker_refusal(self, key: str | None, service: str) -> str | None: ...


@dataclass(slots=True)
class Stats:
    """Counters for logs and metrics; plain ints so the hot path pays one add."""

    accepted: int = 0
    replied: int = 0
    requeued: int = 0
    lost: int = 0
    timeouts: int = 0
    unavailable: int = 0
    overloaded: int = 0
    late: int = 0
    bad: int = 0
    forbidden: int = 0  # requests and READYs refused by key (CURVE brokers)
    undeliverable: int = 0  # replies ZeroMQ would not queue: the client is gone or reads nothing
    unread_overflow: int = 0  # replies replaced by TOO_LARGE: the client's unread bytes are at the bound
    workers_joined: int = 0
    workers_left: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class RouterState(Protocol):
    """The router as its mixins use it (the self-type of their methods): zrouter.broker.router.Router."""

    sink: Sink
    access: Access | None
    stats: Stats
    rng: random.Random
    grace: float
    accepting: bool
    liveness: int
    liveness_timeout: float
    max_attempts: int
    max_capacity: int
    max_worker_bytes: int
    slow_start: float
    service_slow_start: dict[str, float]
    on_join: Callable[[WorkerState, float], None] | None
    n_inflight: int
    services: dict[str, Service]
    service_policies: dict[str, str]
    workers: dict[bytes, WorkerState]
    worker_keys: dict[bytes, str]
    by_instance: dict[str, WorkerState]
    clients: dict[bytes, ClientLoad]
    _ramping: dict[bytes, WorkerState]
    _slots: dict[int, list[Request]]
    _slot_heap: list[int]
    _slotted: int
    _beats: list[tuple[float, int, WorkerState]]
    _beat_seq: itertools.count[int]

    def service(self, name: str, now: float) -> Service: ...
    def count_status(self, service: str, status: int) -> None: ...
    def answer(self, client: bytes, crid: int, status: int, message: str) -> None: ...
    def stats_for(self, name: str) -> ServiceStats: ...
    def _fail(self, req: Request, status: int, message: str, now: float | None = None) -> None: ...
    def _pump(self, svc: Service, now: float) -> None: ...
    def _limit(self, w: WorkerState) -> None: ...
    def _grace_if_unserved(self, svc: Service, now: float) -> None: ...
    def remove_worker(self, w: WorkerState, reason: str, now: float) -> None: ...
    def _heartbeat_of(self, ready: protocol.Ready) -> float: ...
    # The mixins' own, called across them.
    def _apply_weight(self, w: WorkerState, now: float) -> None: ...
    def _refresh(self, w: WorkerState) -> None: ...
    def _schedule_beat(self, w: WorkerState, at: float) -> None: ...
    def send_heartbeats(self, now: float) -> None: ...
    def expire(self, now: float) -> None: ...
    def _ramp(self, now: float) -> None: ...
    def _refile(self) -> None: ...
