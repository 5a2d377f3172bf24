"""What :class:`client.Client` and :class:`client.AsyncClient` share and never waits for:
the context, the core, the broker set and the hand-over of Consul's broker lists.

Each subclass adds only its way of waiting (the calling thread polling, or an event loop) and
the ``_watch``/``_unwatch`` hooks the core calls when it opens or closes a broker socket.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, Final

import zmq

from zrouter.client._core import DEFAULT_BROKER, ClientCore
from zrouter.client._brokers import open_broker_sockets
from zrouter.client._consul_link import BrokerFeed, initial_brokers
from zrouter.curve import ClientKeys, client_keys
from zrouter.errors import AuthenticationFailed

__all__ = ["REASK_REFUSED", "BaseClient"]

# When every broker refused this client's CURVE handshake, requests fail at once with
# AuthenticationFailed; the first request this long after the last refusal asks again (new
# connections: libzmq never retries a refused handshake), so a key allowed later is picked up.
REASK_REFUSED: Final = 1.0


class BaseClient:
    _core: ClientCore
    _feed: BrokerFeed | None

    def _setup(
        self,
        broker: str | Sequence[str] | None,
        *,
        timeout: float,
        max_message_size: int | None,
        max_inflight: int,
        max_inflight_bytes: int,
        heartbeat: float | None,
        context: zmq.Context[Any] | None,
        consul: str | None,
        feed: BrokerFeed | None,
        curve_server_key: str | os.PathLike[str] | None = None,
        curve_secret_key: str | os.PathLike[str] | None = None,
    ) -> None:
        self._curve: ClientKeys | None = client_keys(curve_server_key, curve_secret_key)
        endpoints = initial_brokers(broker, consul, DEFAULT_BROKER)
        ctx = zmq.Context.instance() if context is None else context
        if type(ctx) is not zmq.Context:
            # Both clients use plain sockets: an asyncio (or other) context would hand out
            # sockets whose calls return futures.
            ctx = zmq.Context.shadow(ctx.underlying)
        self._ctx: zmq.Context[Any] = ctx
        self._heartbeat = heartbeat
        self._max_message_size = max_message_size
        self._feed = feed
        self._core = ClientCore(
            endpoints,
            self._open,
            timeout=timeout,
            max_message_size=max_message_size,
            max_inflight=max_inflight,
            max_inflight_bytes=max_inflight_bytes,
            watch=self._watch,
            unwatch=self._unwatch,
        )
        self._core.on_connection_change = self._connection_changed

    def _open(self, endpoint: str) -> tuple[Any, Any]:
        return open_broker_sockets(self._ctx, endpoint, self._heartbeat, self._curve, self._max_message_size)

    # -- refused handshakes (CURVE) ----------------------------------------------------------

    def _connection_changed(self) -> None:
        """A broker connection came up, dropped or was refused: when every broker has refused
        this client's handshake, what waits for a broker fails now instead of at its deadline."""
        why = self._refusal()
        if why is not None:
            self._fail_waiting(why)

    def _refusal(self) -> str | None:
        """Why no broker will take requests, when every one refused our handshake; else None."""
        core = self._core
        if core.closed or core.connected:
            return None
        why = None
        for endpoint in core.brokers:
            conn = core.connection(endpoint)
            if conn is None or conn.refused is None:
                return None
            why = why or f"broker {endpoint}: {conn.refused}"
        return why

    def _fail_waiting(self, why: str) -> None:
        core = self._core
        for entry in [e for e in core.pending.values() if e.conn is None]:
            core.pending.pop(entry.rid, None)
            entry._settle(None, AuthenticationFailed(why))

    def _no_broker(self, now: float) -> None:
        """A request found no broker to go to: fail it (and any other waiting) when every
        broker refused us, unless the refusals are old enough to ask again."""
        why = self._refusal()
        if why is None:
            return
        core = self._core
        stale = [ep for ep in core.brokers
                 if (c := core.connection(ep)) is not None and now - c.refused_at >= REASK_REFUSED]
        if stale:
            for endpoint in stale:  # new sockets, new handshakes; the requests wait for them
                core.remove_broker(endpoint)
                core.add_broker(endpoint)
            return
        self._fail_waiting(why)

    def _watch(self, sock: Any) -> None:
        raise NotImplementedError

    def _unwatch(self, sock: Any) -> None:
        raise NotImplementedError

    def _follow(self) -> None:
        """Apply the broker list Consul delivered since the last look (client/_discovery.py:
        it arrives on a watcher thread; sockets are only touched from the client's own)."""
        feed = self._feed
        if feed is not None and not self._core.closed:
            endpoints = feed.take()
            if endpoints is not None:
                self._core.set_brokers(endpoints)

    def add_broker(self, endpoint: str) -> None:
        """Also use ``endpoint`` (no-op if already in use)."""
        self._core.add_broker(endpoint)

    def remove_broker(self, endpoint: str) -> None:
        """Stop sending to ``endpoint``; requests pending there may still be answered."""
        self._core.remove_broker(endpoint)

    def set_brokers(self, endpoints: str | Iterable[str]) -> None:
        """Use exactly ``endpoints`` from now on (for discovery)."""
        self._core.set_brokers(endpoints)

    @property
    def closed(self) -> bool:
        return self._core.closed
