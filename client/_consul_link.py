"""Finding brokers through Consul: the list of routable brokers' front ends, handed over safely.

Consul answers arrive on a watcher thread (:class:`zrouter.consul.BrokerDiscovery`), but a
client's sockets belong to the thread that uses it (``Client``) or to its event loop
(``AsyncClient``). So :class:`BrokerFeed` only *stores* each new list under a lock and signals;
the owner applies it with ``set_brokers`` from its own thread when it next runs:

- ``Client`` polls the feed's wake-up fd with its sockets, so a list that arrives while it waits
  for a reply is applied at once, and checks :attr:`BrokerFeed.changed` (a plain attribute
  read) on each call and each round of waiting;
- ``AsyncClient`` is called back with ``loop.call_soon_threadsafe``.

An empty list is never applied: with no broker listed (all failing their checks, or Consul
answering from an empty catalog after a restart) the client keeps the brokers it has. A broker
that is really gone costs nothing (its connection is down, requests go elsewhere), while following
the empty list would leave the client with nobody to talk to.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence

from zrouter.consul import BrokerDiscovery, consul_address

__all__ = ["BrokerFeed", "initial_brokers"]

log = logging.getLogger("zrouter.client")


def initial_brokers(
    broker: str | Sequence[str] | None, consul: str | None, default: str
) -> str | Sequence[str]:
    """The endpoints a client starts with: none when Consul will list them, else *broker* or
    the default. Endpoints and Consul together are refused: which one would win is unclear."""
    if consul:
        if broker is not None:
            raise ValueError("give broker endpoints or a consul address to discover them, not both")
        return []
    return default if broker is None else broker


class BrokerFeed:
    """Front-end endpoints of the brokers registered in Consul under ``service``.

    ``notify()`` is called from the watcher thread after a new list is stored (it must only
    signal); with ``wake_fd`` the feed also owns a socket pair whose read end (:meth:`fileno`)
    becomes readable then. :meth:`take` returns the new list once, and clears the signal.
    """

    def __init__(
        self,
        *,
        service: str,
        consul: str,
        token: str | None = None,
        notify: Callable[[], None] | None = None,
        wake_fd: bool = False,
    ) -> None:
        consul_address(consul)  # a malformed address fails in the constructor, not in a thread
        self.service = service
        self.changed = False  # read without the lock on the clients' hot paths: a hint only
        self._lock = threading.Lock()
        self._latest: list[str] | None = None
        self._notify = notify
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        if wake_fd:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
        self.discovery = BrokerDiscovery(self._on_change, service=service, consul_addr=consul, token=token)

    def fileno(self) -> int:
        assert self._wake_r is not None, "BrokerFeed made without wake_fd"
        return self._wake_r.fileno()

    def _on_change(self, pairs: list[tuple[str, str]]) -> None:  # watcher thread
        frontends = sorted({frontend for frontend, _ in pairs})
        if not frontends:
            log.warning("Consul lists no routable broker under %r: keeping the current ones", self.service)
            return
        log.info("brokers from Consul (%s): %s", self.service, ", ".join(frontends))
        # The byte and the flag change together under the lock, as take() clears them: a wake-up
        # byte is never left behind with the flag down (the client's poll would spin on it).
        with self._lock:
            self._latest = frontends
            if self._wake_w is not None:
                try:
                    self._wake_w.send(b"\0")
                except OSError:  # full (a wake-up is pending anyway) or closed
                    pass
            self.changed = True
        if self._notify is not None:
            self._notify()

    def take(self) -> list[str] | None:
        """The list stored since the last call, or None; clears the wake-up fd."""
        with self._lock:
            if self._wake_r is not None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except OSError:  # drained (BlockingIOError) or closed
                    pass
            latest, self._latest = self._latest, None
            self.changed = False
        return latest

    def start(self) -> None:
        self.discovery.start()

    def close(self) -> None:
        # No join: the watcher is a daemon thread that delivers nothing once stop() returned.
        self.discovery.stop()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
