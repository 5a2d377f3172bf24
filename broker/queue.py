"""The per-service wait queue: bounded, FIFO, deadline-aware, with requeue at the front.

Pure logic: time is passed in, nothing here sleeps or touches a socket.

Requests that find a free worker never enter the queue, so the common path pays nothing for
it. A queued request sits in a deque (dispatch order) and in a heap keyed by when it must be
looked at again (its deadline, or the end of the unknown-service grace period), so expiring
costs O(log n) per request instead of a scan of up to ``maxlen`` entries on every tick.
Entries leave the deque lazily: an expired request is marked and skipped when popped.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import Final

from zrouter.broker.state import DONE, QUEUED, Request
from zrouter import protocol

__all__ = ["ServiceQueue"]

_SEQ: Final = itertools.count()  # heap tie-breaker: requests themselves are not comparable


class ServiceQueue:
    """Requests of one service waiting for a worker with a free credit."""

    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self._items: deque[Request] = deque()
        self._timers: list[tuple[float, int, Request]] = []
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def push(self, req: Request, now: float, grace_until: float | None = None) -> bool:
        """Append a new request; False (and nothing queued) when the queue is full.

        ``grace_until`` is set while the service has no routable worker: the request is then
        looked at again at that time, to be answered "unavailable" if still nobody serves it.
        """
        if self._live >= self.maxlen:
            return False
        self._enqueue(req, grace_until)
        self._items.append(req)
        return True

    def push_front(self, req: Request, grace_until: float | None = None) -> None:
        """Requeue a request taken back from a lost worker: first in line, never refused,
        because the broker already accepted it."""
        self._enqueue(req, grace_until)
        self._items.appendleft(req)

    def _enqueue(self, req: Request, grace_until: float | None) -> None:
        req.state = QUEUED
        req.worker = None
        at = req.deadline if grace_until is None or grace_until > req.deadline else grace_until
        req.expire_at = at
        heapq.heappush(self._timers, (at, next(_SEQ), req))
        self._live += 1

    def pop(self) -> Request | None:
        """The next live request in dispatch order, or None."""
        items = self._items
        while items:
            req = items.popleft()
            if req.state == QUEUED:
                self._live -= 1
                req.state = DONE  # the caller dispatches or answers it now
                return req
        return None

    def peek(self) -> Request | None:
        items = self._items
        while items:
            req = items[0]
            if req.state == QUEUED:
                return req
            items.popleft()
        return None

    def next_timer(self) -> float | None:
        """When ``expire`` next has something to do (for the poll timeout)."""
        timers = self._timers
        while timers and (timers[0][2].state != QUEUED or timers[0][2].expire_at != timers[0][0]):
            heapq.heappop(timers)  # stale: dispatched, answered, or rescheduled since
        return timers[0][0] if timers else None

    def expire(self, now: float, unavailable: bool) -> list[tuple[Request, int]]:
        """Take out the requests that must be answered now, with the status to answer.

        A request past its deadline gets TIMEOUT. One whose grace period ended gets UNAVAILABLE
        if the service still has no routable worker, else waits on until its deadline.
        """
        out: list[tuple[Request, int]] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            at, _, req = heapq.heappop(timers)
            if req.state != QUEUED or req.expire_at != at:
                continue
            if now >= req.deadline:
                status = protocol.STATUS_TIMEOUT
            elif unavailable:
                status = protocol.STATUS_UNAVAILABLE
            else:
                req.expire_at = req.deadline
                heapq.heappush(timers, (req.deadline, next(_SEQ), req))
                continue
            req.state = DONE
            self._live -= 1
            out.append((req, status))
        return out

    def drain_all(self) -> list[Request]:
        """Every live request, in order, leaving the queue empty (broker shutdown)."""
        out = []
        while (req := self.pop()) is not None:
            out.append(req)
        self._timers.clear()
        return out
