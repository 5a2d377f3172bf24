"""The broker's HTTP side (``zrouter-broker --http HOST:PORT``): metrics, status, dashboard, admin.

Routes::

    GET  /metrics                       Prometheus text format (zrouter.broker.metrics)
    GET  /status                        JSON: every service, its workers, last-minute figures
    GET  /events                        the same JSON, pushed once a second (server-sent events)
    GET  /                              the live dashboard (dashboard.html, served from here)
    POST /workers/{instance}/drain      admin: no new work for that worker
    PUT  /workers/{instance}/weight     admin: body {"weight": N}, N >= 0
    PUT  /services/{service}/policy     admin: body {"policy": NAME}

Admin routes exist only with an admin token (``--admin-token``): without one they answer 403,
without ``Authorization: Bearer TOKEN`` (or with another token) 401; then 400 for a bad body (413
over MAX_BODY), 404
for an unknown instance or service. Every admin request is logged, refused ones too (at a
bounded rate).

Threads: a ``ThreadingHTTPServer`` serves each connection on a thread of its own, and a sampler
thread takes a snapshot once a second (the last minute's rates and quantiles come from those).
None of them touches the router: reads and admin actions are functions run on the broker's
loop thread through ``call_soon``, each waited for with a timeout (503 if the loop does not
answer in time). Bounds: at most MAX_CONNECTIONS connections at once (more are closed at
once), MAX_STREAMS of them event streams, request bodies up to MAX_BODY bytes, a socket timeout
so a silent peer cannot hold a thread.
"""

from __future__ import annotations

import collections
import hmac
import importlib.resources
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, Protocol, TypeVar

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest

from zrouter import __version__
from zrouter.broker.counters import STATUS_LABELS
from zrouter.broker.metrics import (
    BrokerCollector,
    ConsulView,
    HistoryPoint,
    Snapshot,
    history_point,
    last_minute,
    service_json,
    take_snapshot,
)
from zrouter.broker.policies import POLICIES
from zrouter.broker.router import Router

__all__ = ["BrokerHTTP", "LoopTimeout", "parse_hostport"]

log = logging.getLogger("zrouter.broker.http")

MAX_CONNECTIONS: Final = 64
MAX_STREAMS: Final = 16
MAX_BODY: Final = 64 * 1024
SOCKET_TIMEOUT: Final = 10.0
LOOP_TIMEOUT: Final = 2.0  # how long a request waits for the broker's loop
SAMPLE_PERIOD: Final = 1.0
WINDOW: Final = 60.0  # seconds of "last minute" figures
PROMETHEUS_TEXT: Final = "text/plain; version=0.0.4; charset=utf-8"  # what Prometheus 2.x expects
T = TypeVar("T")


class BadBody(ValueError):
    """An admin request's body is unusable; ``code`` is the HTTP status to answer (400, 413)."""

    def __init__(self, text: str, code: int = 400) -> None:
        super().__init__(text)
        self.code = code


class LoopTimeout(RuntimeError):
    """The broker's loop did not run a call within the timeout (stopping, or overloaded)."""


class BrokerLike(Protocol):
    """What this module needs of ``zrouter.broker.server.Broker`` (named here: no import loop)."""

    router: Router
    frontend_endpoint: str
    backend_endpoint: str

    def call_soon(self, fn: Callable[[], None]) -> None: ...


def parse_hostport(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``[::1]:PORT`` for IPv6; port 0 picks a free one) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


class _Throttle:
    """At most ``n`` log lines per ``period`` seconds; then one line says how many were skipped."""

    def __init__(self, n: int = 10, period: float = 10.0) -> None:
        self.n, self.period = n, period
        self.start, self.used, self.skipped = 0.0, 0, 0
        self.lock = threading.Lock()

    def __call__(self, level: int, msg: str, *args: Any) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.start >= self.period:
                if self.skipped:
                    log.log(level, "(%d similar lines skipped)", self.skipped)
                self.start, self.used, self.skipped = now, 0, 0
            if self.used >= self.n:
                self.skipped += 1
                return
            self.used += 1
        log.log(level, msg, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, addr: tuple[str, int], app: BrokerHTTP) -> None:
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.app = app
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.app.throttle(logging.WARNING, "HTTP: over %d connections: closing one from %s",
                              MAX_CONNECTIONS, client_address[0])
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class BrokerHTTP:
    """The HTTP server of one broker; ``bind()`` (errors surface at start-up), ``start()``, ``close()``."""

    def __init__(self, broker: BrokerLike, address: str, admin_token: str | None = None,
                 consul: ConsulView | None = None) -> None:  # fmt: skip
        self.broker = broker
        self.host, self.port = parse_hostport(address)
        self.admin_token = admin_token or None
        self.consul = consul
        self.started_at = time.time()
        self.throttle = _Throttle()
        self.url = ""
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._history: collections.deque[HistoryPoint] = collections.deque()
        self._hist_lock = threading.Lock()
        self._streams = threading.BoundedSemaphore(MAX_STREAMS)
        self._published = threading.Condition()
        self._status_seq = 0
        self._status_body = b""
        self._subscribers = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BrokerCollector(self.snapshot))
        self.registry.register(ProcessCollector(registry=None))
        self.registry.register(PlatformCollector(registry=None))
        self.dashboard = importlib.resources.files("zrouter.broker").joinpath("dashboard.html").read_bytes()

    # -- life cycle --------------------------------------------------------------------------

    def bind(self) -> None:
        self._server = _Server((self.host, self.port), self)
        host, port = str(self._server.server_address[0]), int(self._server.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        log.info("HTTP on %s/ (dashboard, /status, /metrics; admin actions %s)", self.url,
                 "on" if self.admin_token else "off: no --admin-token")

    def start(self) -> None:
        if self._server is None:
            self.bind()
        assert self._server is not None
        server = self._server
        # A short poll interval: shutdown() waits for it, and the broker's exit waits for that.
        serve: Callable[[], None] = lambda: server.serve_forever(poll_interval=0.1)  # noqa: E731
        for target, name in ((serve, "zrouter-http"), (self._sample, "zrouter-http-sampler")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        with self._published:
            self._published.notify_all()
        if self._server is not None:
            if self._threads:
                self._server.shutdown()
            self._server.server_close()
            self._server = None
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()

    # -- reading the router (on its loop) -----------------------------------------------------

    def on_loop(self, fn: Callable[[], T], timeout: float = LOOP_TIMEOUT) -> T:
        """Run ``fn`` on the broker's loop thread and return its result (or raise its exception).
        LoopTimeout if it has not run within ``timeout``; it is then skipped if it runs later."""
        done = threading.Event()
        box: list[Any] = []
        cancelled = False

        def run() -> None:
            if cancelled:
                return
            try:
                box.append((True, fn()))
            except BaseException as exc:  # handed to the waiting thread
                box.append((False, exc))
            finally:
                done.set()

        self.broker.call_soon(run)
        if not done.wait(timeout):
            cancelled = True
            raise LoopTimeout(f"the broker's loop did not answer within {timeout:g}s")
        ok, value = box[0]
        if not ok:
            raise value
        result: T = value
        return result

    def snapshot(self, workers: bool = True) -> Snapshot:
        router, consul = self.broker.router, self.consul
        return self.on_loop(lambda: take_snapshot(router, consul, workers=workers))

    def _sample(self) -> None:
        """Once a second: counters into the last-minute history; status to event streams."""
        while not self._stop.wait(SAMPLE_PERIOD):
            try:
                snap = self.snapshot(workers=self._subscribers > 0)
            except LoopTimeout as exc:
                self.throttle(logging.WARNING, "HTTP sampler: %s", exc)
                continue
            except Exception:
                log.exception("HTTP sampler failed")
                continue
            self._remember(snap)
            if self._subscribers:
                body = json.dumps(self.status(snap), separators=(",", ":")).encode()
                with self._published:
                    self._status_seq += 1
                    self._status_body = body
                    self._published.notify_all()

    def _remember(self, snap: Snapshot) -> None:
        point = history_point(snap)
        with self._hist_lock:
            self._history.append(point)
            while self._history and snap.taken_at - self._history[0][0] > WINDOW + 1.5:
                self._history.popleft()

    # -- documents ----------------------------------------------------------------------------

    def status(self, snap: Snapshot) -> dict[str, Any]:
        """The ``GET /status`` document (shape in README, "Observing a running router")."""
        with self._hist_lock:
            history = list(self._history)
        services = [{**service_json(s), "last_minute": last_minute(s, snap.taken_at, history, WINDOW)}
                    for _, s in sorted(snap.services.items())]
        return {
            "broker": {
                "frontend": self.broker.frontend_endpoint, "backend": self.broker.backend_endpoint,
                "version": __version__, "pid": os.getpid(), "time": snap.wall,
                "uptime_seconds": round(snap.wall - self.started_at, 1), "accepting": snap.accepting,
                "inflight": snap.inflight, "admin_actions": self.admin_token is not None,
                "consul": {"enabled": snap.consul_enabled, "up": snap.consul_up},
                "policies": sorted(POLICIES),
            },
            "totals": snap.totals,
            "late_replies": snap.late_replies,
            "bad_messages": [{"port": p, "kind": k, "count": n} for (p, k), n in sorted(snap.bad_messages.items())],
            "status_labels": list(STATUS_LABELS),
            "services": services,
        }  # fmt: skip

    def metrics_text(self) -> bytes:
        return generate_latest(self.registry)

    def next_status(self, seq: int, timeout: float) -> tuple[int, bytes]:
        """For an event stream: the first status published after ``seq`` (or the same again)."""
        with self._published:
            self._published.wait_for(lambda: self._status_seq != seq or self._stop.is_set(), timeout)
            return self._status_seq, self._status_body

    # -- admin actions ----------------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        assert self.admin_token is not None
        return hmac.compare_digest((header or "").encode(), f"Bearer {self.admin_token}".encode())

    def admin(self, kind: str, target: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """One admin action (already authorised) -> (HTTP status, JSON answer)."""
        router = self.broker.router
        if kind == "drain":
            def act() -> dict[str, Any] | None:
                w = router.drain_worker(target, time.monotonic())
                return None if w is None else {"instance": w.instance, "service": w.service.name,
                                               "state": "draining", "inflight": w.outstanding}
        elif kind == "weight":
            weight = body.get("weight")
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= weight <= 1e6:
                return 400, {"error": 'body must be {"weight": N} with N a number from 0 to 1000000'}

            def act() -> dict[str, Any] | None:
                w = router.set_worker_weight(target, float(weight), time.monotonic())
                return None if w is None else {"instance": w.instance, "service": w.service.name,
                                               "weight": w.weight, "admin_weight": w.admin_weight}
        else:
            policy = body.get("policy")
            if not isinstance(policy, str) or policy not in POLICIES:
                return 400, {"error": f'body must be {{"policy": NAME}}, NAME one of {", ".join(sorted(POLICIES))}'}

            def act() -> dict[str, Any] | None:
                svc = router.services.get(target)
                before = svc.policy.name if svc is not None else None
                svc = router.set_service_policy(target, policy, time.monotonic())
                return None if svc is None else {"service": svc.name, "policy": svc.policy.name, "previous": before}
        answer = self.on_loop(act)
        if answer is None:
            what = "service" if kind == "policy" else "worker instance"
            return 404, {"error": f"no {what} {target!r} on this broker"}
        return 200, answer


_ADMIN_ROUTES: Final = {("workers", "drain"): ("POST", "drain"), ("workers", "weight"): ("PUT", "weight"),
                        ("services", "policy"): ("PUT", "policy")}  # fmt: skip


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = SOCKET_TIMEOUT
    server_version = f"zrouter-broker/{__version__}"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("HTTP %s: " + format, self.client_address[0], *args)

    def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(doc, indent=1).encode() + b"\n", "application/json", headers)

    def do_GET(self) -> None:
        app = self.server.app
        path = urllib.parse.urlsplit(self.path).path
        try:
            if path == "/metrics":
                self._send(200, app.metrics_text(), PROMETHEUS_TEXT)
            elif path == "/status":
                self._json(200, app.status(app.snapshot()))
            elif path == "/events":
                self._events(app)
            elif path in ("/", "/index.html"):
                self._send(200, app.dashboard, "text/html; charset=utf-8")
            elif path == "/favicon.ico":
                self._send(204, b"", "image/x-icon")
            elif self._admin_route(path) is not None:
                self._json(405, {"error": f"{path} takes {self._admin_route(path)}"}, {"Allow": str(self._admin_route(path))})
            else:
                self._json(404, {"error": f"no such page {path!r}: try /, /status or /metrics"})
        except LoopTimeout as exc:
            self._json(503, {"error": str(exc)})

    do_HEAD = do_GET

    def _events(self, app: BrokerHTTP) -> None:
        if not app._streams.acquire(blocking=False):
            self._json(503, {"error": f"over {MAX_STREAMS} event streams: poll /status instead"})
            return
        with app._published:
            app._subscribers += 1
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            # The first frame at once, so a new page does not wait for the next sample.
            first = json.dumps(app.status(app.snapshot()), separators=(",", ":")).encode()
            self.wfile.write(b"retry: 1000\ndata: " + first + b"\n\n")
            self.wfile.flush()
            seq = app._status_seq
            while not app._stop.is_set():
                new, body = app.next_status(seq, 15.0)
                self.wfile.write(b"data: " + body + b"\n\n" if new != seq else b": keep-alive\n\n")
                self.wfile.flush()
                seq = new
        except (OSError, LoopTimeout):
            pass  # the page went away (or the broker is stopping): the browser reconnects by itself
        finally:
            with app._published:
                app._subscribers -= 1
            app._streams.release()

    def _admin_route(self, path: str) -> str | None:
        parts = path.strip("/").split("/")
        if len(parts) == 3 and (parts[0], parts[2]) in _ADMIN_ROUTES:
            return _ADMIN_ROUTES[(parts[0], parts[2])][0]
        return None

    def do_POST(self) -> None:
        self._admin()

    def do_PUT(self) -> None:
        self._admin()

    def _admin(self) -> None:
        app = self.server.app
        path = urllib.parse.urlsplit(self.path).path
        parts = path.strip("/").split("/")
        route = _ADMIN_ROUTES.get((parts[0], parts[2])) if len(parts) == 3 else None
        who = self.client_address[0]
        if route is None:
            self._json(404, {"error": f"no such admin action: {self.command} {path}"})
            return
        method, kind = route
        if self.command != method:
            self._json(405, {"error": f"{path} takes {method}"}, {"Allow": method})
            return
        if app.admin_token is None:
            app.throttle(logging.WARNING, "admin %s %s from %s refused: admin actions are off", self.command, path, who)
            self._json(403, {"error": "admin actions are off: start the broker with --admin-token"})
            return
        if not app.authorized(self.headers.get("Authorization")):
            app.throttle(logging.WARNING, "admin %s %s from %s refused: bad or missing token", self.command, path, who)
            self._json(401, {"error": "admin actions need 'Authorization: Bearer TOKEN'"},
                       {"WWW-Authenticate": 'Bearer realm="zrouter"'})
            return
        target = urllib.parse.unquote(parts[1])
        try:
            body = self._body(required=kind != "drain")
        except BadBody as exc:
            log.info("admin %s %s from %s: %d (%s)", self.command, path, who, exc.code, exc)
            self._json(exc.code, {"error": str(exc)})
            return
        try:
            code, answer = app.admin(kind, target, body)
        except LoopTimeout as exc:
            code, answer = 503, {"error": str(exc)}
        extra = {"service": target} if kind == "policy" else {"instance": target}
        log.info("admin %s %s %s from %s: %d %s", kind, target, json.dumps(body), who, code,
                 json.dumps(answer), extra=extra)
        self._json(code, answer)

    def _body(self, required: bool) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadBody("bad Content-Length") from None
        if length < 0:
            raise BadBody("bad Content-Length")
        if length > MAX_BODY:
            # Read (and drop) a bounded amount first: closing on unread data resets the
            # connection, and the client might then never see the answer.
            left = min(length, 16 * MAX_BODY)
            while left > 0 and (chunk := self.rfile.read(min(left, 65536))):
                left -= len(chunk)
            raise BadBody(f"the body must be at most {MAX_BODY} bytes", 413)
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            if required:
                raise BadBody("a JSON object body is required")
            return {}
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadBody(f"the body is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise BadBody("the body must be a JSON object")
        return doc
