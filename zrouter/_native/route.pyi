from collections.abc import Callable
from typing import Any

__all__ = ["STATES", "SLOTS_PER_S", "ClientLoad", "Request", "Route", "Service", "WorkerState", "set_stats_factory"]

SLOTS_PER_S: float
STATES: tuple[int, int, int]

def set_stats_factory(factory: Callable[[str], Any]) -> None: ...

class ClientLoad:
    requests: int
    bytes: int

class Request:
    def __init__(self, client: bytes, crid: int, service: Any, deadline: float, attempt: int, flags: int,
                 key: bytes | None, payload: Any, now: float = ..., size: int = ..., load: Any = ...) -> None: ...
    def __getattr__(self, name: str) -> Any: ...

class WorkerState:
    def __init__(self, ident: bytes, service: Any, capacity: int, weight: int, meta: dict[str, str],
                 now: float) -> None: ...
    def __getattr__(self, name: str) -> Any: ...

class Service:
    def __init__(self, name: str, policy: Any, queue: Any, now: float, stats: Any = ...) -> None: ...
    def __getattr__(self, name: str) -> Any: ...

class Route:
    def __init__(self, router: Any, bounds: tuple[float, ...], latency_alpha: float,
                 unknown_reply: Callable[..., None]) -> None: ...
    def request(self, client: bytes, crid: int, service: str, timeout_ms: int, attempt: int, flags: int,
                key: bytes | None, payload: Any, now: float) -> None: ...
    def reply(self, ident: bytes, rid: int, status: int, flags: int, message: str | None, error_type: str | None,
              payload: Any, now: float) -> None: ...
