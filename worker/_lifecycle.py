"""The worker's broker connections over their life, mixed into :class:`worker._engine.Engine`
(run by its I/O thread only): opening one and announcing READY with the capacity no other broker
may hold, confirmation, liveness and reconnects with back-off, DISCONNECT from a broker, CURVE
refusals, draining (DRAIN, then DISCONNECT once nothing is owed or the drain times out), a new
broker list, and rebalancing capacity between brokers with UPDATE.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Final, Protocol

import zmq

from zrouter.curve import ClientKeys
from zrouter.errors import AuthenticationFailed
from zrouter.protocol import SIGNATURE, encode_disconnect, encode_drain, encode_ready, encode_update

from ._connection import ACTIVE, BACKOFF, DRAINING, BrokerConnection, ready_share, rebalance
from ._handlers import Job

__all__ = ["Connections", "EngineState"]

log = logging.getLogger("zrouter.worker")

_DISCONNECT_LINGER_MS: Final = 1000  # how long a closing socket may spend flushing DISCONNECT
_DRAIN_FRAMES: Final = (SIGNATURE, encode_drain())
_OVERFILL_LOG_EVERY: Final = 10.0  # s between warnings about brokers sending beyond the capacity


class EngineState(Protocol):
    """The engine as this mixin uses it (its methods' self-type): worker._engine.Engine."""

    service: str
    capacity: int
    weight: int
    heartbeat: float
    dead_after: float
    meta: dict[str, str]
    drain_timeout: float
    curve: ClientKeys | None
    refused: AuthenticationFailed | None
    conns: list[BrokerConnection]
    backlog: deque[Job]
    running: int
    stopping: bool
    stop_deadline: float
    overfilled: int
    _dirty: bool
    _finished: bool
    _short: bool
    _ctx: zmq.Context[Any] | None
    _poller: zmq.Poller
    _by_sock: dict[zmq.Socket[Any], BrokerConnection]
    _by_monitor: dict[zmq.Socket[Any], BrokerConnection]
    _overfill_logged_at: float

    # This mixin's own, called across its methods.
    def _open(self, conn: BrokerConnection, now: float) -> None: ...
    def _close(self, conn: BrokerConnection, linger_ms: int) -> None: ...
    def _remove(self, conn: BrokerConnection, linger_ms: int = 0) -> None: ...
    def _finish(self, conn: BrokerConnection, now: float) -> None: ...
    def _begin_drain(self, conn: BrokerConnection, now: float, deadline: float) -> None: ...
    def _rebalance(self, now: float) -> None: ...


class Connections:
    """Engine methods for the life of its broker connections."""

    refused: AuthenticationFailed | None  # set by _on_monitor; the engine starts it at None

    def _on_timers(self: EngineState, now: float) -> float:
        """Reconnects, liveness, heartbeats and drain progress; returns the next timer due."""
        heartbeat, dead_after = self.heartbeat, self.dead_after
        nxt = now + heartbeat
        changed = False
        for conn in list(self.conns):
            if conn.state == BACKOFF:
                if conn.removed:
                    self._remove(conn)
                    continue
                if now < conn.reconnect_at:
                    nxt = min(nxt, conn.reconnect_at)
                    continue
                self._open(conn, now)
            elif now - conn.last_recv >= dead_after and conn.sock is not None and conn.sock.poll(0, zmq.POLLIN):
                conn.last_recv = now  # its messages wait unread behind a late turn of this loop: alive
            elif now - conn.last_recv >= dead_after:
                changed = True
                if conn.state == DRAINING or conn.removed:
                    log.warning("broker %s silent while draining: giving up on it", conn.endpoint)
                    self._remove(conn)
                    continue
                heard = conn.confirmed
                self._close(conn, 0)
                delay = conn.schedule_reconnect(now)
                if heard:
                    log.warning("broker %s silent for %.1f s: reconnecting", conn.endpoint, dead_after)
                else:  # never answered this connection: down, or not started yet
                    log.info("no answer from broker %s: retrying in %.1f s", conn.endpoint, delay)
                nxt = min(nxt, conn.reconnect_at)
                continue
            elif conn.state == DRAINING:
                if (conn.drain_acked and conn.owed == 0) or now >= conn.drain_deadline:
                    self._finish(conn, now)
                    continue
                nxt = min(nxt, conn.drain_deadline)
            if now - conn.last_send >= heartbeat:
                conn.heartbeat(now)
            nxt = min(nxt, conn.last_send + heartbeat, conn.last_recv + dead_after)
        if changed or self._short:
            self._rebalance(now)
        if self._short:  # a lowered share settles then, making room for the raise that waits
            nxt = min([nxt, *(c.settle_at for c in self.conns if c.excess)])
        if self.stopping and not self.conns:
            self._finished = True
        return nxt

    def _open(self: EngineState, conn: BrokerConnection, now: float) -> None:
        assert self._ctx is not None
        # Until the broker confirms us, take only capacity no other broker may hold.
        share = ready_share(self.capacity, self.running + len(self.backlog), self.conns)
        ready = encode_ready(self.service, share, self.weight, self.meta)
        sock = conn.open(self._ctx, ready, share, now, self.curve)
        self._poller.register(sock, zmq.POLLIN)
        self._by_sock[sock] = conn
        if conn.monitor is not None:
            self._poller.register(conn.monitor, zmq.POLLIN)
            self._by_monitor[conn.monitor] = conn
        log.info("connecting to broker %s (connection %d), capacity %d", conn.endpoint, conn.generation, share)

    def _confirm(self: EngineState, conn: BrokerConnection, now: float) -> None:
        conn.confirmed = True
        conn.attempt = 0
        log.info("registered with broker %s", conn.endpoint)
        self._rebalance(now)

    def _close(self: EngineState, conn: BrokerConnection, linger_ms: int) -> None:
        sock = conn.sock
        if sock is not None:
            self._poller.unregister(sock)
            del self._by_sock[sock]
            if conn.monitor is not None:
                self._poller.unregister(conn.monitor)
                del self._by_monitor[conn.monitor]
            conn.close(linger_ms)

    def _on_monitor(self: EngineState, conn: BrokerConnection, now: float) -> None:
        """CURVE only: a broker refused our handshake. Loud, and final once every broker has:
        the loop ends and run() raises AuthenticationFailed."""
        why = conn.read_monitor()
        if why is None:
            return
        log.error("broker %s refused this worker: %s", conn.endpoint, why)
        self._close(conn, 0)
        conn.schedule_retry_refused(now)
        self._rebalance(now)
        self._dirty = True
        if all(c.refused for c in self.conns):
            self.refused = AuthenticationFailed(f"broker {conn.endpoint}: {why}")
            self._finished = True

    def _remove(self: EngineState, conn: BrokerConnection, linger_ms: int = 0) -> None:
        self._close(conn, linger_ms)
        conn.removed = True
        conn.state = BACKOFF
        if conn in self.conns:
            self.conns.remove(conn)

    def _on_disconnect(self: EngineState, conn: BrokerConnection, now: float, reason: str | None = None) -> None:
        # The reason is the broker's (bounded by the decoder); a refused READY says why here.
        why = f": {reason}" if reason else ""
        if conn.state == DRAINING or conn.removed:
            log.info("broker %s dropped us while draining%s", conn.endpoint, why)
            self._remove(conn)
        else:
            log.warning("broker %s sent DISCONNECT%s; registering again on a new connection", conn.endpoint, why)
            self._close(conn, 0)
            conn.schedule_reconnect(now)
            self._rebalance(now)
        self._dirty = True

    def _begin_drain(self: EngineState, conn: BrokerConnection, now: float, deadline: float) -> None:
        conn.removed = True
        if conn.state == BACKOFF:
            self._remove(conn)
        elif conn.state == ACTIVE:
            if not conn.confirmed and conn.owed == 0:  # nothing received: nothing to drain
                conn.send((SIGNATURE, encode_disconnect("stopping")), now)
                self._remove(conn, _DISCONNECT_LINGER_MS)
                return
            conn.send(_DRAIN_FRAMES, now)
            conn.state = DRAINING
            conn.set_share(0, now + self.heartbeat)  # requests already on their way still come
            conn.drain_deadline = deadline
            log.info("draining broker %s (%d requests owed)", conn.endpoint, conn.owed)

    def _finish(self: EngineState, conn: BrokerConnection, now: float) -> None:
        drained = conn.drain_acked and conn.owed == 0
        if not drained:
            log.warning(
                "drain of broker %s timed out (%s, %d replies owed)",
                conn.endpoint, "acknowledged" if conn.drain_acked else "no acknowledgement", conn.owed,
            )  # fmt: skip
        conn.send((SIGNATURE, encode_disconnect("drained" if drained else "drain timeout")), now)
        self._remove(conn, _DISCONNECT_LINGER_MS)
        log.info("disconnected from broker %s", conn.endpoint)

    def _start_stop(self: EngineState, now: float) -> None:
        self.stopping = True
        self.stop_deadline = now + self.drain_timeout
        log.info("stopping: draining %d broker connection(s)", len(self.conns))
        for conn in list(self.conns):
            self._begin_drain(conn, now, self.stop_deadline)

    def _apply_brokers(self: EngineState, endpoints: list[str], now: float) -> None:
        current = {c.endpoint: c for c in self.conns if not c.removed}
        for endpoint, conn in current.items():
            if endpoint not in endpoints:
                log.info("broker %s no longer listed", endpoint)
                self._begin_drain(conn, now, now + self.drain_timeout)
        for order, endpoint in enumerate(endpoints):
            known = current.get(endpoint)
            if known is None:
                log.info("broker %s added", endpoint)
                self.conns.append(BrokerConnection(endpoint, order))
            else:
                known.order = order
        self._rebalance(now)

    def _rebalance(self: EngineState, now: float) -> None:
        """UPDATE the confirmed brokers towards an even split (``_connection.rebalance``): decreases
        at once, increases only into room no other broker may still hold; ``_short`` meanwhile."""
        if self.stopping:
            self._short = False
            return
        held = self.running + len(self.backlog)
        before = {conn: conn.share for conn in self.conns}
        changes, self._short = rebalance(self.capacity, held, self.conns, now, self.heartbeat)
        for conn, share in changes:
            log.info("broker %s: capacity %d -> %d", conn.endpoint, before[conn], share)
            conn.send((SIGNATURE, encode_update(share, self.weight)), now)

    def _overfilled(self: EngineState, conn: BrokerConnection, now: float) -> None:
        """A request arrived with every handler busy (brokers keeping to their shares never do
        that): it waits here; counted, logged at a bounded rate."""
        self.overfilled += 1
        if now - self._overfill_logged_at >= _OVERFILL_LOG_EVERY:
            self._overfill_logged_at = now
            log.warning("broker %s sent a request beyond this worker's capacity %d (%d waiting here; "
                        "%d so far)", conn.endpoint, self.capacity, len(self.backlog), self.overfilled)
