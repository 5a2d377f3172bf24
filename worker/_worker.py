"""The public :class:`Worker`: configuration, life cycle (run/start/stop), signals, registration."""

from __future__ import annotations

import inspect
import logging
import os
import secrets
import signal
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Final

from zrouter import __version__
from zrouter.consul import consul_address
from zrouter.curve import client_keys

from ._context import current_request
from ._consul_link import BrokerFollower, ConsulRegistration
from ._engine import Engine
from ._handlers import Answer, AsyncRunner, Runner, SyncPool
from ._http import HandlerMetrics, MetricsServer
from ._inline import InlineEngine
from ._registration import RegistrationTicker

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["DEFAULT_BROKER", "Worker", "run_worker"]

log = logging.getLogger("zrouter.worker")

DEFAULT_BROKER: Final = "tcp://127.0.0.1:5556"

_NEW, _RUNNING, _STOPPED = "new", "running", "stopped"


def _is_async(handler: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(handler, "__call__", None)  # noqa: B004 - an object with an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def _endpoints(broker: str | Sequence[str]) -> list[str]:
    items = [broker] if isinstance(broker, str) else list(broker)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"broker endpoints must be non-empty strings, got {item!r}")
        if item not in out:
            out.append(item)
    return out


class Worker:
    """Serves one service for one or more brokers.

    ``handler(payload)`` gets the decoded payload (``bytes`` when the request payload is raw,
    else the msgpack-decoded object) and returns the result (``bytes``-like go back raw, anything
    else as msgpack). It may be a plain function, run on ``capacity`` pool threads, or a coroutine
    function, run on an asyncio loop in its own thread with up to ``capacity`` requests in flight.
    An exception becomes a remote-error reply (its class name and ``str``); the worker goes on.
    Inside a handler, :func:`worker.current_request` tells which request it is serving.

    ``run()`` blocks until stopped (SIGTERM/SIGINT drain it when it runs in the main thread; a
    second signal skips the waiting); ``start()`` runs it in a background thread; ``stop()``
    drains: DRAIN to every broker, serve what still arrives until the acknowledgement, wait for
    the handlers (all bounded by ``drain_timeout``), DISCONNECT, close.

    ``inline=True`` (sync handlers only: ValueError with a coroutine function) runs the handler
    in the worker's I/O thread itself, right after the request arrives, and sends the reply from
    there: no pool thread and no hand-off, so much less CPU and latency per request for fast
    handlers. Requests run one at a time, in arrival order; the rest of the ``capacity`` the
    broker may send wait in the worker. The trade-off: while a handler runs the worker neither
    heartbeats nor reads, so inline suits handlers that finish well within
    ``heartbeat_interval * liveness``; a longer one makes the broker declare the worker dead
    and requeue what it held (the worker then registers again). A graceful stop waits for the
    running handler; a second signal interrupts it (when ``run()`` is in the main thread).

    ``http="HOST:PORT"`` serves the worker's own Prometheus metrics on ``GET /metrics`` there
    (handler duration histogram, handler calls in flight, errors by exception type; port 0 picks
    a free port, see :attr:`metrics_url`); ValueError for a malformed address.

    Several brokers share ``capacity``: each gets a part, announced in READY and changed with
    UPDATE as brokers come and go; :meth:`set_brokers` changes the list at run time.

    ``registration`` (e.g. a Consul registration) gets ``register()`` at start, ``pass_ttl(note)``
    once per heartbeat interval while the worker is healthy and ``deregister()`` at exit, from a
    thread of its own; its exceptions are logged only.

    ``consul`` (``"host:port"`` of a Consul agent; the command line defaults it to
    ``$CONSUL_HTTP_ADDR``) makes that registration a Consul service instance: the service name,
    the instance id (service id too), ``tags``, the worker's meta (``instance`` is what the broker
    matches to this connection), ``weight`` as ``Weights.Passing``, a TTL check passed every
    heartbeat, and ``DeregisterCriticalServiceAfter`` so a crashed worker's entry is reaped;
    ``consul_token`` is the ACL token (default ``$CONSUL_HTTP_TOKEN``). ``broker_service``
    (instead of ``broker``) finds the brokers registered in Consul under that name and follows
    them as they come and go.

    ``curve_server_key`` (the brokers' public ``.key`` file) and ``curve_secret_key`` (this
    worker's ``.key_secret``) turn CURVE on: every broker connection is encrypted and the broker
    authenticates the worker's key (brokers found through Consul must all have that server key).
    A broker that refuses the key is logged at ERROR; when every broker has refused it,
    ``run()`` raises ``AuthenticationFailed`` with the reason libzmq reported.
    """

    def __init__(
        self,
        service: str,
        handler: Callable[[Any], Any],
        *,
        broker: str | Sequence[str] | None = None,
        capacity: int = 1,
        weight: int = 1,
        heartbeat_interval: float = 1.0,
        liveness: int = 3,
        meta: dict[str, str] | None = None,
        drain_timeout: float = 30.0,
        registration: object | None = None,
        consul: str | None = None,
        consul_token: str | None = None,
        tags: Iterable[str] = (),
        broker_service: str | None = None,
        inline: bool = False,
        http: str | None = None,
        curve_server_key: str | os.PathLike[str] | None = None,
        curve_secret_key: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(service, str) or not service:
            raise ValueError("service must be a non-empty string")
        if not callable(handler):
            raise TypeError("handler must be callable")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if weight < 0:
            raise ValueError("weight must be >= 0")
        if heartbeat_interval <= 0 or liveness < 1:
            raise ValueError("heartbeat_interval must be > 0 and liveness >= 1")
        if drain_timeout < 0:
            raise ValueError("drain_timeout must be >= 0")
        curve = client_keys(curve_server_key, curve_secret_key)  # unreadable keys fail here
        consul = consul or None
        if consul is not None:
            consul_address(consul)  # a malformed address fails here, not in a background thread
            if registration is not None:
                raise ValueError("give consul or registration, not both")
            if weight < 1:
                raise ValueError("Consul's Weights cannot say 0: with consul, weight must be >= 1 "
                                 "(take a worker out with consul maint instead)")
        if broker_service:
            if consul is None:
                raise ValueError("broker_service needs a consul address to look the brokers up in")
            if broker is not None:
                raise ValueError("give broker endpoints or broker_service, not both")
            broker = []  # until Consul answers
        elif broker is None:
            broker = DEFAULT_BROKER
        self.service = service
        self.handler = handler
        self.is_async = _is_async(handler)
        if inline and self.is_async:
            raise ValueError("inline runs sync handlers only (a coroutine handler has its asyncio loop)")
        self.inline = inline
        # Handler metrics on GET http://HOST:PORT/metrics; without http nothing is timed.
        self._metrics_server: MetricsServer | None = None
        self._run_handler = handler
        if http:
            metrics = HandlerMetrics(service, capacity)
            self._metrics_server = MetricsServer(http, metrics)  # ValueError for a bad address
            self._run_handler = metrics.wrap(handler, self.is_async)
        self.capacity = capacity
        self.weight = weight
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.drain_timeout = drain_timeout
        user_meta = {str(k): str(v) for k, v in (meta or {}).items()}
        host = socket.gethostname()
        self.instance_id: str = user_meta.get("instance") or (f"{service}-{host}-{os.getpid()}-{secrets.token_hex(3)}")
        self.meta: dict[str, str] = {
            "pid": str(os.getpid()),
            "host": host,
            "heartbeat_ms": str(round(heartbeat_interval * 1000)),
            "version": __version__,
            **user_meta,
            "instance": self.instance_id,
        }
        self._brokers = _endpoints(broker)
        if consul is not None:
            registration = ConsulRegistration(
                service, self.instance_id, consul=consul, token=consul_token, weight=weight, meta=self.meta,
                tags=tags, heartbeat_interval=heartbeat_interval, liveness=liveness,
            )  # fmt: skip
        self._registration = registration
        self._follower: BrokerFollower | None = None
        if broker_service:
            assert consul is not None
            self._follower = BrokerFollower(self.set_brokers, service=broker_service, consul=consul,
                                             token=consul_token)  # fmt: skip
        settings: dict[str, Any] = {
            "service": service, "capacity": capacity, "weight": weight, "heartbeat_interval": heartbeat_interval,
            "liveness": liveness, "meta": self.meta, "drain_timeout": drain_timeout, "brokers": self._brokers,
            "curve": curve,
        }  # fmt: skip
        self._engine: Engine = (
            InlineEngine(handler=self._run_handler, instance_id=self.instance_id, **settings)
            if inline
            else Engine(runner_factory=self._make_runner, **settings)
        )
        self._lock = threading.Lock()
        self._state = _NEW
        self._thread: threading.Thread | None = None
        self._run_ident: int | None = None
        self._done = threading.Event()
        self._signalled = False

    def __repr__(self) -> str:
        return f"<Worker {self.service} {self.instance_id} brokers={self._brokers} state={self._state}>"

    @property
    def brokers(self) -> list[str]:
        """The broker endpoints the worker is meant to be connected to."""
        return list(self._brokers)

    @property
    def metrics_url(self) -> str | None:
        """``http://HOST:PORT`` of the worker's metrics while it runs with ``http``, else None."""
        return self._metrics_server.url or None if self._metrics_server is not None else None

    @property
    def running(self) -> bool:
        return self._state == _RUNNING

    def _make_runner(self, post: Callable[[Answer], None]) -> Runner:
        name = f"zrouter-worker-{self.service}"
        if self.is_async:
            return AsyncRunner(post, self.instance_id, self._run_handler, name)
        return SyncPool(post, self.instance_id, self._run_handler, self.capacity, name)

    # -- life cycle --------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stopped. In the main thread, SIGTERM/SIGINT start a graceful drain."""
        with self._lock:
            if self._state != _NEW:
                raise RuntimeError("a Worker runs only once")
            self._state = _RUNNING
            self._run_ident = threading.get_ident()
        previous = self._install_signals()
        ticker = None
        if self._registration is not None:
            ticker = RegistrationTicker(
                self._registration,
                self.heartbeat_interval,
                self._engine.status,
                f"zrouter-worker-{self.service}",
            )
        log.info(
            "worker %s for service %r: capacity %d, weight %d, %s handler, brokers %s",
            self.instance_id, self.service, self.capacity, self.weight,
            "async" if self.is_async else "sync inline" if self.inline else "sync",
            ", ".join(self._brokers) or "(none yet)",
        )  # fmt: skip
        if self._follower is not None:
            self._follower.start()  # delivers through set_brokers, which the loop picks up
        try:
            if self._metrics_server is not None:
                self._metrics_server.start()
            self._engine.run(on_started=ticker.start if ticker is not None else None)
        finally:
            if self._metrics_server is not None:
                self._metrics_server.close()
            if self._follower is not None:
                self._follower.stop()
            if ticker is not None:
                ticker.stop(deregister=True)
            self._restore_signals(previous)
            with self._lock:
                self._state = _STOPPED
            self._done.set()
            log.info("worker %s stopped", self.instance_id)

    def start(self) -> None:
        """Run in a background (daemon) thread; returns at once."""
        with self._lock:
            if self._state != _NEW or self._thread is not None:
                raise RuntimeError("a Worker runs only once")
            self._thread = threading.Thread(target=self._run_logged, name=f"zrouter-worker-{self.service}", daemon=True)
        self._thread.start()

    def _run_logged(self) -> None:
        try:
            self.run()
        except Exception:
            log.exception("worker %s failed", self.instance_id)

    def stop(self, timeout: float | None = None) -> bool:
        """Drain and stop; wait up to ``timeout`` seconds (None: until done). True when stopped.

        Called from a handler (or from the worker's own thread) it only asks for the drain."""
        with self._lock:
            state = self._state
            if state == _NEW and self._thread is None:
                self._state = _STOPPED  # never started: nothing to drain
                self._done.set()
                return True
        self._engine.request_stop()
        if threading.get_ident() == self._run_ident or current_request() is not None:
            return self._done.is_set()
        return self._done.wait(timeout)

    def set_brokers(self, endpoints: str | Sequence[str]) -> None:
        """Replace the broker list (thread-safe): new brokers are connected, dropped ones drained."""
        self._brokers = _endpoints(endpoints)
        self._engine.set_brokers(self._brokers)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- signals -----------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._signalled:
            log.warning("%s again: stopping without waiting", name)
            self._engine.request_stop(force=True)
        else:
            self._signalled = True
            log.info("%s: draining", name)
            self._engine.request_stop()

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[signum] = signal.signal(signum, self._on_signal)
            except (ValueError, OSError):  # not allowed here (e.g. an embedded interpreter)
                pass
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            try:
                signal.signal(signum, handler)
            except (ValueError, OSError, TypeError):
                pass


def run_worker(service: str, handler: Callable[[Any], Any], **options: Any) -> None:
    """``Worker(service, handler, **options).run()``: serve in this thread until signalled."""
    Worker(service, handler, **options).run()
