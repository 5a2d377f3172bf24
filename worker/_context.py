"""What a handler may know about the request it is running: :func:`current_request`.

Handlers take only the payload; everything else about the request lives in a context variable
that the worker sets around each call (in the pool thread for sync handlers, in the task's own
context for coroutine handlers), so it is always the request *this* call is serving::

    from zrouter.worker import current_request

    def handler(payload):
        info = current_request()          # None outside a handler
        remaining = info.deadline - time.monotonic()
        ...
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import NamedTuple

__all__ = ["RequestInfo", "current_request"]


class RequestInfo(NamedTuple):
    """The request a handler is serving.

    ``deadline`` is on the :func:`time.monotonic` clock: the broker's remaining timeout added to
    the moment the worker received the request. ``attempt`` counts from 0 (the broker's retries
    of an idempotent request after a lost worker). ``instance_id`` is the worker's own id, the
    one announced as ``meta["instance"]`` in READY.
    """

    rid: int
    service: str
    attempt: int
    deadline: float
    instance_id: str


# RequestInfo's fields as a plain tuple around each handler call: the NamedTuple is built only
# when a handler asks for it (a plain tuple costs a quarter as much), and nothing else of the
# request (its payload, its connection) stays reachable from a context a handler's tasks copy.
_current: ContextVar[tuple[int, str, int, float, str] | None] = ContextVar("zrouter_worker_request", default=None)


def current_request() -> RequestInfo | None:
    """The request the calling handler is serving, or ``None`` outside a handler."""
    cur = _current.get()
    return None if cur is None else RequestInfo(*cur)
