"""What :class:`client.Client` and :class:`client.AsyncClient` share and never waits for:
the context, the core, the broker set and the hand-over of Consul's broker lists.

Each subclass adds only its way of waiting (the calling thread polling, or an event loop) and
the ``_watch``/``_unwatch`` hooks the core calls when it opens or closes a broker socket.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import zmq

from zrouter.client._core import DEFAULT_BROKER, ClientCore
from zrouter.client._brokers import open_broker_sockets
from zrouter.client._consul_link import BrokerFeed, initial_brokers

__all__ = ["BaseClient"]


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
    ) -> None:
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

    def _open(self, endpoint: str) -> tuple[Any, Any]:
        return open_broker_sockets(self._ctx, endpoint, self._heartbeat, self._max_message_size)

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
