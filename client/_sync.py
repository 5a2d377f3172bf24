"""The blocking client: the calling thread drives the sockets, no background thread.

A background reader thread would add two thread hand-offs (and the GIL ping-pong) to every
request; here ``request()`` sends, then polls and receives until its own reply is there,
settling any other pending request whose reply comes first.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from time import monotonic
from types import TracebackType
from typing import Any, Final

import zmq

from zrouter.client._core import DEFAULT_TIMEOUT, Entry
from zrouter.client._brokers import DEFAULT_HEARTBEAT
from zrouter.client._client import BaseClient
from zrouter.client._consul_link import BrokerFeed
from zrouter.consul import DEFAULT_BROKER_SERVICE
from zrouter import limits
from zrouter.errors import AuthenticationFailed, ClientClosed

__all__ = ["Client", "PendingReply"]

_POLLIN: Final = int(zmq.POLLIN)
# Upper bound of one poll: nothing should need it (monitor sockets are polled too), but a
# bounded wait keeps a missed wake-up from turning into a hang.
_MAX_POLL_MS: Final = 1000


class PendingReply(Entry):
    """A request in flight on a :class:`Client`, future-like.

    Waiting on it (``result()``/``exception()``) drives the client's sockets from the calling
    thread, so it must be used from the thread that owns the client.
    """

    __slots__ = ("_client",)

    def __init__(self, client: Client) -> None:
        super().__init__()
        self._client = client

    def done(self) -> bool:
        """Whether the outcome is known; handles whatever input is waiting, without blocking."""
        if not self._done:
            self._client._pump_nowait()
        return self._done

    def result(self, timeout: float | None = None) -> Any:
        """The reply payload, or raise the request's error.

        ``timeout`` bounds this wait only (builtins.TimeoutError, the request stays pending);
        the request's own deadline always applies and raises RequestTimeout.
        """
        if not self._done:
            self._client._wait(self, timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The request's error (None if it succeeded), waiting like :meth:`result`."""
        if not self._done:
            self._client._wait(self, timeout)
        return self._error

    def __repr__(self) -> str:
        state = "done" if self._done else "pending"
        return f"<PendingReply rid={getattr(self, 'rid', None)} {getattr(self, 'service', None)!r} {state}>"


class Client(BaseClient):
    """A blocking zrouter client over one DEALER per broker endpoint.

    Not thread-safe (like the zmq sockets it owns): use one Client per thread. Requests may be
    pipelined with :meth:`submit` / :meth:`map`; the calling thread moves replies along whenever
    it waits.
    """

    def __init__(
        self,
        broker: str | Sequence[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_message_size: int | None = limits.MAX_MESSAGE_SIZE,
        max_inflight: int = limits.MAX_CLIENT_REQUESTS,
        max_inflight_bytes: int = limits.MAX_CLIENT_BYTES,
        heartbeat: float | None = DEFAULT_HEARTBEAT,
        context: zmq.Context[Any] | None = None,
        consul: str | None = None,
        consul_token: str | None = None,
        broker_service: str = DEFAULT_BROKER_SERVICE,
        curve_server_key: str | os.PathLike[str] | None = None,
        curve_secret_key: str | os.PathLike[str] | None = None,
    ) -> None:
        """Connect (lazily, like zmq) to ``broker``: one endpoint or a list of them
        (default tcp://127.0.0.1:5555).

        ``timeout`` is the default per-request deadline in seconds (at most one day, the protocol's
        limit: ValueError otherwise, as for a per-call ``timeout``); ``max_message_size`` caps
        request and reply payloads in bytes (MessageTooLarge; None: no cap of our own);
        ``max_inflight`` and ``max_inflight_bytes`` are the most requests, and payload bytes,
        this client sends one broker before it has their replies: keep them within the broker's
        --max-client-requests and --max-client-bytes (the defaults match, zrouter.limits);
        more wait here, in order, and go out as replies come in. ``heartbeat`` is the ZMTP ping
        interval that detects a silent broker (None: off); ``context`` defaults to the shared one.

        ``consul`` (``"host:port"`` of a Consul agent), instead of ``broker``, finds the brokers
        registered there under ``broker_service`` and follows them as they come and go;
        ``consul_token`` is the ACL token (default ``$CONSUL_HTTP_TOKEN``).

        ``curve_server_key`` (the broker's public ``.key`` file; with Consul, every broker's)
        and ``curve_secret_key`` (this client's ``.key_secret``) turn CURVE on. When every
        broker refuses the handshake, requests raise ``AuthenticationFailed`` with the reason
        libzmq reported, at once rather than at their deadline. Bad key files raise ValueError
        or OSError here.
        """
        feed = None
        if consul:
            feed = BrokerFeed(service=broker_service, consul=consul, token=consul_token, wake_fd=True)
        self._poller = zmq.Poller()
        self._setup(broker, timeout=timeout, max_message_size=max_message_size, max_inflight=max_inflight,
                    max_inflight_bytes=max_inflight_bytes, heartbeat=heartbeat,
                    context=context, consul=consul, feed=feed, curve_server_key=curve_server_key,
                    curve_secret_key=curve_secret_key)
        if feed is not None:
            self._poller.register(feed.fileno(), _POLLIN)  # a new list wakes a waiting caller
            feed.start()

    def _watch(self, sock: Any) -> None:
        self._poller.register(sock, _POLLIN)

    def _unwatch(self, sock: Any) -> None:
        self._poller.unregister(sock)

    # -- requests -----------------------------------------------------------------------------

    def request(
        self,
        service: str,
        payload: Any,
        *,
        timeout: float | None = None,
        idempotent: bool = True,
        key: bytes | str | None = None,
    ) -> Any:
        """Send one request and return its reply payload (bytes if raw, else the msgpack value).

        Raises the ZRouterError subclass matching the reply's status, RequestTimeout when the
        deadline (``timeout`` or the client's default) passes first.
        """
        entry = self.submit(service, payload, timeout=timeout, idempotent=idempotent, key=key)
        if not entry._done:
            self._wait(entry, None)
        if entry._error is not None:
            raise entry._error
        return entry._value

    def submit(
        self,
        service: str,
        payload: Any,
        *,
        timeout: float | None = None,
        idempotent: bool = True,
        key: bytes | str | None = None,
    ) -> PendingReply:
        """Send a request now and return at once; wait later with ``result()`` or :meth:`gather`."""
        if self._feed is not None and self._feed.changed:
            self._follow()
        entry = PendingReply(self)
        now = monotonic()
        if self._core.start(entry, service, payload, timeout, idempotent, key, now) is None:
            self._no_broker(now)
        return entry

    def map(
        self,
        service: str,
        payloads: Iterable[Any],
        *,
        timeout: float | None = None,
        idempotent: bool = True,
        key: bytes | str | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Send every payload to ``service`` at once (pipelined), then :meth:`gather` the replies."""
        pendings = [self.submit(service, p, timeout=timeout, idempotent=idempotent, key=key) for p in payloads]
        return self.gather(pendings, return_exceptions=return_exceptions)

    def gather(self, pendings: Iterable[PendingReply], *, return_exceptions: bool = False) -> list[Any]:
        """Wait for every request, then return their values in order.

        Every request is waited for (each is bounded by its deadline) so none is left behind;
        then the first error in order is raised, unless ``return_exceptions`` puts errors in
        the list instead.
        """
        pendings = list(pendings)
        for p in pendings:
            if not p._done:
                p._client._wait(p, None)
        if return_exceptions:
            return [p._error if p._error is not None else p._value for p in pendings]
        for p in pendings:
            if p._error is not None:
                raise p._error
        return [p._value for p in pendings]

    # -- waiting ------------------------------------------------------------------------------

    def _wait(self, entry: PendingReply, timeout: float | None) -> None:
        """Drive the sockets until ``entry`` settles (or ``timeout`` seconds pass)."""
        core = self._core
        poll = self._poller.poll
        on_readable = core.on_readable
        feed = self._feed
        now = monotonic()
        limit = None if timeout is None else now + timeout
        while not entry._done:
            if core.closed:
                # Settled by close(); only reachable if the entry was never registered.
                raise ClientClosed("client is closed")
            wake = core.next_wakeup(now)  # never None while entry is pending: its deadline
            if limit is not None:
                if now >= limit:
                    raise TimeoutError(f"request {entry.rid} still pending after {timeout:g} s")
                if wake is None or limit < wake:
                    wake = limit
            if wake is None:
                ms = _MAX_POLL_MS
            else:
                ms = int((wake - now) * 1000.0) + 1  # round up: waking early just spins
                if ms > _MAX_POLL_MS:
                    ms = _MAX_POLL_MS
                elif ms < 0:
                    ms = 0
            events = poll(ms)
            now = monotonic()
            if feed is not None and feed.changed:
                self._follow()
            for sock, _ in events:
                on_readable(sock, now)
            core.tick(now)

    def _pump_nowait(self) -> None:
        core = self._core
        if core.closed:
            return
        if self._feed is not None and self._feed.changed:
            self._follow()
        now = monotonic()
        for sock, _ in self._poller.poll(0):
            core.on_readable(sock, now)
        core.tick(now)

    # -- brokers and lifetime -----------------------------------------------------------------

    @property
    def brokers(self) -> list[str]:
        """The broker endpoints in use (not those being removed)."""
        self._follow()
        return self._core.brokers

    @property
    def connected_brokers(self) -> list[str]:
        """The endpoints whose connection is up, as last seen (updated while waiting)."""
        self._pump_nowait()
        return self._core.connected

    def wait_connected(self, count: int = 1, timeout: float | None = None) -> bool:
        """Wait until ``count`` brokers are connected; False if ``timeout`` seconds pass first.

        Not needed before requests (they wait for a broker themselves); useful at start-up and
        in tests.
        """
        core = self._core
        now = monotonic()
        limit = None if timeout is None else now + timeout
        while len(core.connected) < count:
            if core.closed:
                raise ClientClosed("client is closed")
            wake = core.next_wakeup(now)
            if limit is not None:
                if now >= limit:
                    return False
                if wake is None or limit < wake:
                    wake = limit
            ms = _MAX_POLL_MS if wake is None else max(0, min(_MAX_POLL_MS, int((wake - now) * 1000.0) + 1))
            events = self._poller.poll(ms)
            now = monotonic()
            if self._feed is not None and self._feed.changed:
                self._follow()
            for sock, _ in events:
                core.on_readable(sock, now)
            core.tick(now)
            why = self._refusal()
            if why is not None:
                raise AuthenticationFailed(why)
        return True

    def close(self) -> None:
        """Close every socket; pending requests fail with ClientClosed. Idempotent."""
        self._core.close()
        feed, self._feed = self._feed, None
        if feed is not None:
            self._poller.unregister(feed.fileno())
            feed.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._core.closed else f"{len(self._core.pending)} pending"
        return f"<Client {self._core.brokers} {state}>"
