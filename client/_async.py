"""The asyncio client: the same core as :class:`client.Client`, waited on by one reader task.

Sockets are driven through their ZMQ_FD from the event loop (``loop.add_reader``), the way
zmq.asyncio does it, but sends and receives go straight to the low-level calls: a zmq.asyncio
socket would create a Future per ``send``/``recv`` call, several per request. Requests await an
asyncio future that the reader task settles by request id.

ZMQ_FD is edge-triggered: any call that makes libzmq process its command queue (a send, an
EVENTS read) can consume the "readable" edge while a message is queued. So after sending, and
after each reader round, we check EVENTS and look again instead of trusting the fd alone.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Final

import zmq

from zrouter.client._core import DEFAULT_TIMEOUT, Entry, log
from zrouter.client._brokers import DEFAULT_HEARTBEAT
from zrouter.client._client import BaseClient
from zrouter.client._consul_link import BrokerFeed
from zrouter.consul import DEFAULT_BROKER_SERVICE
from zrouter import limits
from zrouter.errors import AuthenticationFailed, ClientClosed

__all__ = ["AsyncClient"]

_EVENTS: Final = int(zmq.EVENTS)
_POLLIN: Final = int(zmq.POLLIN)


class _AsyncEntry(Entry):
    """An entry whose outcome also resolves the asyncio future its caller awaits."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[Any]) -> None:
        super().__init__()
        self.future = future

    def _settle(self, value: Any, error: BaseException | None) -> None:
        Entry._settle(self, value, error)
        fut = self.future
        if not fut.done():  # else cancelled by its waiter
            try:
                if error is None:
                    fut.set_result(value)
                else:
                    fut.set_exception(error)
            except RuntimeError:  # its loop is closed (client closed late): nobody can await it
                pass


class AsyncClient(BaseClient):
    """An asyncio zrouter client: ``await request(...)``; pipeline with ``asyncio.gather``.

    Mirrors :class:`client.Client`. It binds to the event loop it is first used in, and like
    any asyncio object it must only be used from that loop's thread.
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
        """Same arguments as :class:`client.Client`; ``context`` may be a zmq.asyncio.Context.

        With ``consul``, Consul's broker lists arrive on a watcher thread and are applied on the
        client's event loop (``call_soon_threadsafe``), from the first use of the client on.
        ``curve_server_key``/``curve_secret_key`` as in :class:`client.Client`."""
        feed = None
        if consul:
            feed = BrokerFeed(service=broker_service, consul=consul, token=consul_token, notify=self._feed_changed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fds: dict[Any, int] = {}  # watched socket -> its ZMQ_FD (unreadable once closed)
        self._reader: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._conn_waiters: list[asyncio.Future[None]] = []
        self._setup(broker, timeout=timeout, max_message_size=max_message_size, max_inflight=max_inflight,
                    max_inflight_bytes=max_inflight_bytes, heartbeat=heartbeat,
                    context=context, consul=consul, feed=feed, curve_server_key=curve_server_key,
                    curve_secret_key=curve_secret_key)
        self._core.on_connection_change = self._connection_changed
        if feed is not None:
            feed.start()

    def _watch(self, sock: Any) -> None:
        fd = self._fds[sock] = sock.FD
        if self._loop is not None:
            self._loop.add_reader(fd, self._wake_reader)

    def _unwatch(self, sock: Any) -> None:
        fd = self._fds.pop(sock, None)
        if fd is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(fd)

    def _start(self) -> asyncio.AbstractEventLoop:
        """Bind to the running loop: watch the sockets and start the reader task."""
        loop = asyncio.get_running_loop()
        if self._loop is not None:
            if loop is not self._loop:
                raise RuntimeError("this AsyncClient is bound to another event loop")
            return loop
        self._loop = loop
        for fd in self._fds.values():
            loop.add_reader(fd, self._wake_reader)
        self._reader = loop.create_task(self._run(), name="zrouter-client-reader")
        self._follow()  # a list that came before there was a loop to hand it to
        return loop

    def _feed_changed(self) -> None:
        """From the watcher thread: have the loop apply the new list (nothing before the client
        is bound to a loop: _start() applies it then)."""
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._follow)
            except RuntimeError:  # the loop is closed: nobody will use this client again
                pass

    # -- requests -----------------------------------------------------------------------------

    def _submit(
        self,
        service: str,
        payload: Any,
        timeout: float | None,
        idempotent: bool,
        key: bytes | str | None,
    ) -> _AsyncEntry:
        loop = self._loop
        if loop is None:
            loop = self._start()
        entry = _AsyncEntry(loop.create_future())
        now = loop.time()
        conn = self._core.start(entry, service, payload, timeout, idempotent, key, now)
        if conn is None:
            self._no_broker(now)
        # Queued (no broker yet) or the send consumed the fd's edge: let the reader look now.
        if conn is None or conn.sock.get(_EVENTS) & _POLLIN:
            self._wake_reader()
        if self._timer_at is None or entry.deadline < self._timer_at:
            self._arm(entry.deadline)
        return entry

    async def request(
        self,
        service: str,
        payload: Any,
        *,
        timeout: float | None = None,
        idempotent: bool = True,
        key: bytes | str | None = None,
    ) -> Any:
        """Send one request and return its reply payload; errors as in :meth:`Client.request`."""
        entry = self._submit(service, payload, timeout, idempotent, key)
        try:
            return await entry.future
        finally:
            if not entry._done:  # we were cancelled: stop tracking it, drop its reply
                self._core.cancel(entry)

    def submit(
        self,
        service: str,
        payload: Any,
        *,
        timeout: float | None = None,
        idempotent: bool = True,
        key: bytes | str | None = None,
    ) -> asyncio.Future[Any]:
        """Send a request now; the returned future resolves with its outcome."""
        return self._submit(service, payload, timeout, idempotent, key).future

    async def map(
        self,
        service: str,
        payloads: Iterable[Any],
        *,
        timeout: float | None = None,
        idempotent: bool = True,
        key: bytes | str | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Send every payload at once, wait for all, return values in order (as Client.map)."""
        entries = [self._submit(service, p, timeout, idempotent, key) for p in payloads]
        try:
            results = await asyncio.gather(*(e.future for e in entries), return_exceptions=True)
        finally:
            for e in entries:
                if not e._done:
                    self._core.cancel(e)
        if not return_exceptions:
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        return results

    # -- the reader task ----------------------------------------------------------------------

    def _wake_reader(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _arm(self, at: float) -> None:
        # One timer for the earliest deadline; most requests end before it and do not move it.
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer = self._loop.call_at(at, self._on_timer)
        self._timer_at = at

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._wake_reader()

    async def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        core = self._core
        while not core.closed:
            try:
                now = loop.time()
                core.pump(now)
                at = core.next_wakeup(now)
                if at is not None and (self._timer_at is None or at < self._timer_at):
                    self._arm(at)
                if core.readable():
                    await asyncio.sleep(0)  # input arrived during the round: yield, then go on
                    continue
            except Exception:  # a bug here must not stop replies and deadlines for good
                log.exception("zrouter client reader failed; continuing")
                await asyncio.sleep(0.01)
                continue
            wake = self._wake = loop.create_future()
            await wake

    # -- brokers and lifetime -----------------------------------------------------------------

    @property
    def brokers(self) -> list[str]:
        """The broker endpoints in use (not those being removed)."""
        return self._core.brokers

    @property
    def connected_brokers(self) -> list[str]:
        """The endpoints whose connection is up, as last seen by the reader."""
        return self._core.connected

    def _connection_changed(self) -> None:
        super()._connection_changed()
        waiters, self._conn_waiters = self._conn_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait_connected(self, count: int = 1, timeout: float | None = None) -> bool:
        """Wait until ``count`` brokers are connected; False if ``timeout`` seconds pass first."""
        loop = self._start()
        limit = None if timeout is None else loop.time() + timeout
        while len(self._core.connected) < count:
            if self._core.closed:
                raise ClientClosed("client is closed")
            why = self._refusal()
            if why is not None:
                raise AuthenticationFailed(why)
            fut: asyncio.Future[None] = loop.create_future()
            self._conn_waiters.append(fut)
            self._wake_reader()  # events may already be queued on the monitors
            if limit is None:
                await fut
                continue
            remaining = limit - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(fut, remaining)
            except asyncio.TimeoutError:
                return len(self._core.connected) >= count
        return True

    def close(self) -> None:
        """Close now (pending requests fail with ClientClosed); prefer ``await aclose()``."""
        self._core.close()
        feed, self._feed = self._feed, None
        if feed is not None:
            feed.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        if self._loop is not None and not self._loop.is_closed():
            self._connection_changed()  # wait_connected() callers see the client closed
            self._wake_reader()  # the reader sees the core closed and returns

    async def aclose(self) -> None:
        """Close, and wait for the reader task to finish. Idempotent."""
        self.close()
        reader, self._reader = self._reader, None
        if reader is not None and reader.get_loop() is asyncio.get_running_loop():
            await reader  # woken by close(), it sees the core closed and returns

    async def __aenter__(self) -> AsyncClient:
        self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._core.closed else f"{len(self._core.pending)} pending"
        return f"<AsyncClient {self._core.brokers} {state}>"
