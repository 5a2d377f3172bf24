"""The router's clock, mixed into :class:`zrouter.broker.router.Router`: heartbeats to workers
(each at its own interval), silent workers, deadlines of queued and held requests, slow-start
ramps, and when the loop must next wake for any of them.

Held requests are filed by deadline in slots (see
:data:`~zrouter.broker.router_types.SLOTS_PER_S`); every method takes ``now`` and works on the
router's state (:class:`~zrouter.broker.router_types.RouterState`).
"""

from __future__ import annotations

import heapq
from typing import Final

from zrouter import protocol
from zrouter.broker.router_types import HELD_SLACK, SLOTS_PER_S, RouterState
from zrouter.broker.state import INFLIGHT, Request, WorkerState

__all__ = ["Timers"]

_HEARTBEAT: Final = protocol.encode_heartbeat()


class Timers:
    """Router methods driven by time rather than by messages."""

    def _schedule_beat(self: RouterState, w: WorkerState, at: float) -> None:
        w.beat_at = at
        beats = self._beats
        heapq.heappush(beats, (at, next(self._beat_seq), w))
        if len(beats) > 2 * len(self.workers) + 64:  # READY/leave churn: shed the stale entries
            live = [(x.beat_at, next(self._beat_seq), x) for x in self.workers.values()]
            heapq.heapify(live)
            self._beats = live

    def next_heartbeat(self: RouterState) -> float | None:
        """When the next heartbeat to a worker is due (for the poll timeout); None: no workers."""
        beats = self._beats
        workers = self.workers
        while beats:
            at, _, w = beats[0]
            if workers.get(w.ident) is w and w.beat_at == at:
                return at
            heapq.heappop(beats)
        return None

    def send_heartbeats(self: RouterState, now: float) -> None:
        """HEARTBEAT every worker whose interval is up (each at its own interval)."""
        beats = self._beats
        workers = self.workers
        while beats and beats[0][0] <= now:
            at, _, w = heapq.heappop(beats)
            if workers.get(w.ident) is not w or w.beat_at != at:
                continue
            if not self.sink.to_worker(w.ident, _HEARTBEAT, None):
                self.remove_worker(w, "unreachable", now)
                continue
            nxt = at + w.heartbeat
            self._schedule_beat(w, nxt if nxt > now else now + w.heartbeat)

    def tick(self: RouterState, now: float, heartbeat: bool = True) -> None:
        """Expire queued requests and silent workers (each judged by its own interval); send the
        heartbeats that are due when asked."""
        for w in [w for w in self.workers.values() if now - w.last_seen > w.silence_limit]:
            self.remove_worker(w, f"no heartbeat for {now - w.last_seen:.1f}s", now)
        if heartbeat:
            self.send_heartbeats(now)
        self.expire(now)
        self._ramp(now)
        for name in [n for n, s in self.services.items() if not s.workers and not s.queue
                     and now - s.created_at > self.grace]:
            del self.services[name]  # a typo'd service name must not live forever
        for client in [c for c, load in self.clients.items() if not load.requests]:
            del self.clients[client]  # swept here, not per reply: cheaper for one-at-a-time clients

    def _ramp(self: RouterState, now: float) -> None:
        """Move the workers in slow start along their ramp (more credit may free queued work)."""
        for w in list(self._ramping.values()):
            if self._ramping.get(w.ident) is not w:
                continue  # removed by an earlier worker's pump (unreachable)
            self._apply_weight(w, now)
            self._refresh(w)
            if w.service.queue:
                self._pump(w.service, now)

    def expire(self: RouterState, now: float) -> None:
        """Answer what is due: queued requests past their deadline (TIMEOUT) or grace period
        (UNAVAILABLE), and requests workers hold past their deadline (TIMEOUT: the payload is
        freed now; the worker's credit stays taken until it replies, late, or is lost)."""
        for svc in self.services.values():
            if svc.queue:
                for req, status in svc.queue.expire(now, unavailable=not svc.n_routable):
                    if status == protocol.STATUS_UNAVAILABLE:
                        text = f"no worker serves service {svc.name}"
                    else:
                        text = "deadline passed while queued"
                    self._fail(req, status, text, now)
        heap = self._slot_heap
        due = now * SLOTS_PER_S
        while heap and heap[0] <= due:
            entries = self._slots.pop(heapq.heappop(heap))
            self._slotted -= len(entries)
            for req in entries:
                w = req.worker
                if req.state != INFLIGHT or w is None:
                    continue  # answered since (a request requeued and sent again is filed again)
                w.inflight.pop(req.rid, None)
                w.expired[req.rid] = req.size
                self._fail(req, protocol.STATUS_TIMEOUT, "deadline passed while a worker held the request", now)

    def _new_slot(self: RouterState, slot: int) -> list[Request]:
        if self._slotted > 2 * self.n_inflight + HELD_SLACK:
            self._refile()
            entries = self._slots.get(slot)
            if entries is not None:
                return entries
        entries = self._slots[slot] = []
        heapq.heappush(self._slot_heap, slot)
        return entries

    def _refile(self: RouterState) -> None:
        """Rebuild the deadline slots from what workers hold, dropping answered entries."""
        slots: dict[int, list[Request]] = {}
        for w in self.workers.values():
            for req in w.inflight.values():
                slots.setdefault(int(req.deadline * SLOTS_PER_S) + 1, []).append(req)
        self._slots = slots
        self._slot_heap = list(slots)
        heapq.heapify(self._slot_heap)
        self._slotted = sum(len(entries) for entries in slots.values())

    def next_timer(self: RouterState) -> float | None:
        if self._slotted > 2 * self.n_inflight + HELD_SLACK:
            self._refile()  # a burst within one slot: rebuilt here, once per turn of the loop
        heap = self._slot_heap
        soonest: float | None = heap[0] / SLOTS_PER_S if heap else None
        for svc in self.services.values():
            if svc.queue:
                t = svc.queue.next_timer()
                if t is not None and (soonest is None or t < soonest):
                    soonest = t
        return soonest
