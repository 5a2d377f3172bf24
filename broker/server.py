"""The broker daemon's I/O loop: two ROUTER sockets, a socket monitor, and the Router core.

Hot path, per request: one header decode from the client, one header encode to the worker, the
payload frame passed along untouched (never decoded, never copied), and the same on the way
back. Sockets are drained in batches after each poll. A worker killed outright is noticed at
once through the back end's socket monitor (the TCP connection closing), not only when its
heartbeats stop. What the loop does with each message the fast path does not take (control
traffic, bad input, failures) is mixed in from ``inbound``; the settings are in ``config``.
"""

from __future__ import annotations

import collections
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import msgpack
import zmq
from zmq.utils.monitor import parse_monitor_message

from zrouter.broker.config import BrokerConfig
from zrouter.broker.inbound import (
    LOG_ALL_BURST, LOG_ALL_RATE, LOG_PEER_BURST, LOG_PEER_EVERY, PACED_PEERS, Inbound, peer_label,
)
from zrouter.broker.router import Router, routes
from zrouter.broker.unread import UnreadReplies

if TYPE_CHECKING:
    from zrouter.broker.auth import BrokerAuth
    from zrouter.broker.consul_link import ConsulLink
    from zrouter.broker.http import BrokerHTTP
from zrouter import limits, protocol
from zrouter.curve import EVENT_HANDSHAKE_FAILED
from zrouter.ratelimit import RateLimiter
from zrouter.transport import NOBLOCK
# The per-message codec and socket calls: compiled when built, else zrouter.protocol/transport.
from zrouter import _speedups
from zrouter._speedups import drain_replies, drain_requests, send_frames

__all__ = ["Broker", "BrokerConfig"]

log = logging.getLogger("zrouter.broker")

# Messages taken from one socket before looking at the other: large enough to amortise the
# poll, small enough that replies are not starved by a flood of requests.
BATCH: Final = 256
# With nothing in flight or queued, worker messages are only control traffic; reading them at
# most this often batches the heartbeats of many idle workers into one wake-up (at 1,000
# workers, a wake-up per heartbeat cost more than the heartbeats). New requests never wait:
# the front end is always read at once.
IDLE_BACKEND_PERIOD: Final = 0.02
# Requests read ahead from one client's connection (the front end's ZMQ_RCVHWM) before TCP
# pushes back: a small one (up to libzmq's 8 KiB read batch) pins a shared ~18 KiB receive
# buffer until the loop takes it, so this bounds what a client sending faster than the broker
# handles makes it hold (~2.3 MB), without slowing pipelined clients (batches are BATCH long).
READ_AHEAD: Final = 128

_SIG: Final = protocol.SIGNATURE
# The kinds of lost reply that are logged: the client's connection is gone, the client has
# --max-client-unread replies unread, a reply replaced by TOO_LARGE for the unread bytes.
_GONE: Final = "gone"
_UNREAD: Final = "unread"
_OVERFLOW: Final = "overflow"
_REPLY_LOSSES: Final = (_GONE, _UNREAD, _OVERFLOW)
_unpackb: Callable[..., Any] = msgpack.unpackb


class Broker(Inbound):
    """One broker. ``run()`` blocks; ``stop()`` may be called from any thread or a signal handler."""

    def __init__(self, config: BrokerConfig, context: zmq.Context[Any] | None = None) -> None:
        config.check()
        self.config = config
        # A ZAP handler is bound once per context: a CURVE broker gets a context of its own.
        self._own_ctx = context is None and bool(config.curve_secret_key)
        self.ctx = context or (zmq.Context() if self._own_ctx else zmq.Context.instance())
        self.router = Router(
            self,
            default_policy=config.default_policy,
            service_policies=config.service_policies,
            max_queue=config.max_queue,
            max_attempts=config.max_attempts,
            grace=config.grace,
            liveness_timeout=config.heartbeat_interval * config.liveness,
            liveness=config.liveness,
            slow_start=config.slow_start,
            service_slow_start=config.service_slow_start,
            max_services=config.max_services,
            max_client_requests=config.max_client_requests,
            max_client_bytes=config.max_client_bytes,
            max_capacity=config.max_capacity,
            max_worker_bytes=config.max_worker_bytes,
        )
        # What the drain loops call for a valid REQUEST / REPLY: compiled twins when built, else
        # (None) router.request and _on_reply, looked up per batch.
        self._routes = routes(self.router, self._on_reply)
        self.front: zmq.Socket[Any] = self.ctx.socket(zmq.ROUTER)
        self.back: zmq.Socket[Any] = self.ctx.socket(zmq.ROUTER)
        maxmsgsize = limits.socket_max_message_size(config.max_message_size, protocol.MAX_HEADER_SIZE)
        for s in (self.front, self.back):
            s.linger = 1000  # let final replies out at exit, but never hang on a dead peer
            s.sndhwm = 100_000
            s.rcvhwm = 100_000
            # A larger frame is refused while it arrives (libzmq drops that peer's connection),
            # never read into memory first.
            s.setsockopt(zmq.MAXMSGSIZE, maxmsgsize)
        # Per client: the replies queued for it (past that, a reply is undeliverable, and with
        # ROUTER_MANDATORY the send says so instead of dropping it silently), and the requests
        # read ahead from it.
        self.front.sndhwm = config.max_client_unread
        self.front.rcvhwm = min(READ_AHEAD, config.max_client_requests)
        self.front.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.unread = UnreadReplies(config.max_client_unread_bytes)
        # A line a second for each kind of lost reply, each its own bucket: many departed
        # clients must not hide a WARNING.
        self._reply_log = RateLimiter(1.0, 1, len(_REPLY_LOSSES))
        # Sending to a vanished worker must fail loudly so its request is requeued at once.
        self.back.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.auth: BrokerAuth | None = None
        # Per request, with CURVE and --client-keys only: may this client's key call the service?
        self._client_refusal: Callable[[str | None, str], str | None] | None = None
        if config.curve_secret_key:
            self._secure(config)
        self.monitor = self.back.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | (EVENT_HANDSHAKE_FAILED if self.auth is not None else 0))
        self._fd_worker: dict[int, bytes] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._inbox: collections.deque[Callable[[], None]] = collections.deque()
        self._stopping = False
        self._stop_by: float | None = None
        self._log_peer = RateLimiter(1.0 / LOG_PEER_EVERY, LOG_PEER_BURST, PACED_PEERS)
        self._log_all = RateLimiter(LOG_ALL_RATE, LOG_ALL_BURST, 1)
        self._disconnects = RateLimiter(1.0 / config.heartbeat_interval, 1, PACED_PEERS)
        self.loop_errors = 0  # turns of the loop that raised (each a bug, logged with its traceback)
        self.frontend_endpoint = ""
        self.backend_endpoint = ""
        self.ready = threading.Event()
        self.consul: ConsulLink | None = None
        if config.consul:
            from zrouter.broker.consul_link import ConsulLink

            self.consul = ConsulLink(
                self, config.consul, config.consul_token, broker_service=config.broker_service,
                advertise_frontend=config.advertise_frontend, advertise_backend=config.advertise_backend,
            )
        # The HTTP side runs on threads of its own and reaches the router only through call_soon.
        self.http: BrokerHTTP | None = None
        if config.http:
            from zrouter.broker.http import BrokerHTTP

            self.http = BrokerHTTP(self, config.http, config.admin_token, self.consul)

    # -- lifecycle --------------------------------------------------------------------------

    def bind(self) -> None:
        self.front.bind(self.config.frontend)
        self.back.bind(self.config.backend)
        self.frontend_endpoint = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend_endpoint = self.back.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.http is not None:
            self.http.bind()
        why_pure = _speedups.why_pure()
        log.info("broker listening: clients on %s, workers on %s; policy %s%s; %s path",
                 self.frontend_endpoint, self.backend_endpoint, self.config.default_policy,
                 "".join(f", {s}={p}" for s, p in self.config.service_policies.items()),
                 "pure-Python" if why_pure else "compiled")
        if why_pure and not why_pure.startswith(_speedups.PURE_ENV):
            # Not asked for: the compiled modules were not built (no C compiler at install) or
            # do not load. Said once, loudly: the pure path costs about 2.5x the CPU per request.
            log.warning("running the pure-Python path (%s); reinstall with a C compiler and Python "
                        "headers for the compiled one", why_pure)

    def _secure(self, config: BrokerConfig) -> None:
        from zrouter.broker.auth import BrokerAuth, Keyring

        try:
            if not config.worker_keys:
                raise ValueError("CURVE needs worker_keys: the directory of the workers' public keys")
            keyring = Keyring(config.worker_keys, config.client_keys)
            self.auth = BrokerAuth(self.ctx, config.curve_secret_key or "", keyring)
        except BaseException:
            self._close_sockets()
            raise
        self.auth.secure(self.front, self.back)
        self.router.access = keyring
        if keyring.clients is not None:
            self._client_refusal = keyring.client_refusal
        log.info("%s", self.auth.describe())

    def reload_keys(self) -> None:
        """Re-read the CURVE key directories (SIGHUP; on the loop's thread, via call_soon) and
        disconnect the workers whose key no longer allows their service."""
        if self.auth is not None and self.auth.keyring.reload():
            n = self.router.recheck_workers(time.monotonic())
            if n:
                log.warning("disconnected %d worker(s) whose key was revoked or limited", n)

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler or another thread)."""
        self._stopping = True
        self._wake()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the broker's loop thread (for watchers living in other threads)."""
        self._inbox.append(fn)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or closing

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
        self.back.disable_monitor()
        self.monitor.close()
        self._close_sockets()
        self._wake_r.close()
        self._wake_w.close()

    def _close_sockets(self) -> None:
        for s in (self.front, self.back):
            s.close()
        if self.auth is not None:
            self.auth.close()  # after the broker's sockets: no handshake may pass without it
        if self._own_ctx:
            self.ctx.term()

    # -- sink (called by the router) --------------------------------------------------------

    def to_worker(self, ident: bytes, header: bytes, payload: Any) -> bool:
        # One call per message; NOBLOCK matters for the first frame only (the identity): once
        # it is in, the rest of the message is too.
        try:
            send_frames(self.back, (ident, _SIG, header) if payload is None else (ident, _SIG, header, payload),
                        NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.EAGAIN):
                return False
            raise
        return True

    def to_client(self, client: bytes, header: bytes, payload: Any) -> None:
        """Queue a reply for ``client``, never blocking and never dropping it unsaid: one ZeroMQ
        will not queue (the client is gone, or has ``max_client_unread`` replies unread) is
        counted and logged; one that would take the client's unread bytes past
        ``max_client_unread_bytes`` is replaced by a TOO_LARGE answer."""
        size = len(payload)
        verdict = 0
        if size:
            verdict = self.unread.add(client, size)
            if verdict < 0:
                header, payload, size = self._overflow(client, header, size)
                verdict = 0
        frame = None
        if verdict:  # a tracked frame (pyzmq's own: send_frames passes a zmq.Frame to pyzmq)
            frame = zmq.Frame(getattr(payload, "buffer", payload), copy=False, track=True)
            payload = frame
        try:
            # One call per message; NOBLOCK decides on the first frame (the identity): once it
            # is in, the rest of the message is too.
            send_frames(self.front, (client, _SIG, header, payload), NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            if size:
                self.unread.undo(client, size)
            self._undeliverable(client, exc.errno)
            return
        if frame is not None:
            self.unread.track(client, frame.tracker)

    def _undeliverable(self, client: bytes, err: int) -> None:
        self.router.stats.undeliverable += 1
        gone = err == errno.EHOSTUNREACH
        refused = self._reply_log.take(_GONE if gone else _UNREAD, time.monotonic())
        if refused is None:
            return
        if gone:
            # Clients leave with requests outstanding as a matter of course (one that gave up at
            # its deadline is gone when the broker's TIMEOUT answer for it comes): nothing for an
            # operator to act on, so INFO. A client that does not read is a WARNING.
            log.info("reply to client %s dropped: its connection is gone [%d more since the last such line]",
                     peer_label(client), refused)
            return
        log.warning("reply to client %s dropped: it has %d replies unread (--max-client-unread) [%d more since the "
                    "last such line]", peer_label(client), self.config.max_client_unread, refused)

    def _overflow(self, client: bytes, header: bytes, size: int) -> tuple[bytes, bytes, int]:
        """The TOO_LARGE answer that replaces a reply the client has no room for."""
        self.router.stats.unread_overflow += 1
        crid = _unpackb(header)[1]  # our own REPLY header
        unread = self.unread.unread(client)
        limit = self.config.max_client_unread_bytes
        refused = self._reply_log.take(_OVERFLOW, time.monotonic())
        if refused is not None:
            log.warning("reply of %d bytes to client %s replaced by TOO_LARGE: %d bytes unread "
                        "(--max-client-unread-bytes %d) [%d more since the last such line]", size, peer_label(client),
                        unread, limit, refused)
        text = (f"the request was served, but its reply ({size} bytes) was dropped: {unread} bytes of replies "
                f"to this client are still unread (--max-client-unread-bytes {limit})")
        return protocol.encode_reply(crid, protocol.STATUS_TOO_LARGE, 0, text), b"", 0

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`stop` has been called and what workers held is answered (or the
        shutdown grace is over). Each message is handled in isolation; should anything else in
        a turn of the loop raise (a bug), it is logged with its traceback at a bounded pace,
        counted in ``loop_errors``, and the loop goes on."""
        while True:
            try:
                self._serve()
                break
            except Exception:
                self.loop_errors += 1
                self._log_paced(b"", "loop", logging.ERROR, "broker loop error (serving on)", exc_info=True)
        router = self.router
        router.abandon_inflight()
        router.disconnect_all()  # "shutting down": they reconnect, with back-off, at once
        if self.http is not None:
            self.http.close()
        if self.consul is not None:
            self.consul.stop()
        log.info("broker stopped: %s", router.stats.as_dict())

    def _serve(self) -> None:
        if not self.frontend_endpoint:
            self.bind()
        cfg = self.config
        poller = zmq.Poller()
        poller.register(self.back, zmq.POLLIN)
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        quiet = zmq.Poller()  # everything but the back end, for idle spells
        quiet.register(self.front, zmq.POLLIN)
        quiet.register(self.monitor, zmq.POLLIN)
        quiet.register(self._wake_r.fileno(), zmq.POLLIN)
        back_at = 0.0
        router = self.router
        next_beat = time.monotonic() + cfg.heartbeat_interval
        next_stats = time.monotonic() + cfg.stats_interval
        last_stats: dict[str, int] = {}
        stop_by = self._stop_by  # kept across a restart of this loop after an error
        if self.consul is not None and not self.ready.is_set():
            self.consul.start()
        if self.http is not None and not self.ready.is_set():
            self.http.start()
        self.ready.set()
        while True:
            now = time.monotonic()
            if self._stopping and stop_by is None:
                log.info("broker stopping: answering queued requests, waiting up to %.1fs for %d in flight",
                         cfg.shutdown_grace, router.inflight_count())
                self._stop_by = stop_by = now + cfg.shutdown_grace
                router.shutdown(now)
            if stop_by is not None and (now >= stop_by or not router.inflight_count()):
                break
            wake = next_beat
            timer = router.next_timer()
            if timer is not None and timer < wake:
                wake = timer
            beat = router.next_heartbeat()  # each worker is heartbeated at its own interval
            if beat is not None and beat < wake:
                wake = beat
            if stop_by is not None and stop_by < wake:
                wake = stop_by
            if now < back_at and router.idle():
                if back_at < wake:
                    wake = back_at
                events = dict(quiet.poll(max(0, int((wake - now) * 1000.0) + 1)))
            else:
                events = dict(poller.poll(max(0, int((wake - now) * 1000.0) + 1)))
            now = time.monotonic()
            if self.monitor in events:
                # A worker's last messages (its final replies, its DISCONNECT) are queued before
                # the event of its connection closing: read them first, or a worker that exits
                # right after a clean drain would have requests it answered judged lost.
                while self._drain_backend(now):
                    pass
                self._drain_monitor(now)
            elif self.back in events:
                self._drain_backend(now)
                if router.idle():
                    back_at = now + IDLE_BACKEND_PERIOD
            if self.front in events:
                self._drain_frontend(now)
            if events.get(self._wake_r.fileno()):
                self._drain_inbox()
            if now >= next_beat:
                # Judge silence on what has arrived: when idle the back end is read lazily.
                for _ in range(16):
                    if not self._drain_backend(now):
                        break
                router.tick(now)
                next_beat = now + cfg.heartbeat_interval
                if now >= next_stats:
                    stats = router.stats.as_dict()
                    if self.auth is not None:  # CURVE refusals, by kind (see broker/auth.py)
                        stats.update({f"refused_{k}": v for k, v in self.auth.keyring.refusals.items()})
                    if stats != last_stats:
                        log.info("stats: %s; %d workers, %d in flight", stats, len(router.workers),
                                 router.inflight_count())
                        last_stats = stats
                    next_stats = now + cfg.stats_interval
            elif timer is not None and now >= timer:
                router.expire(now)
            router.send_heartbeats(now)

    def _drain_inbox(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while self._inbox:
            fn = self._inbox.popleft()
            try:
                fn()
            except Exception:
                log.exception("error in a call scheduled on the broker loop")

    def _drain_monitor(self, now: float) -> None:
        while True:
            try:
                msg = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(msg)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                ident = self._fd_worker.pop(int(event["value"]), None)
                w = self.router.workers.get(ident) if ident is not None else None
                if w is not None:
                    self.router.remove_worker(w, "connection closed", now)
            elif self.auth is not None:
                self.auth.keyring.handshake_failed("workers", int(event["event"]), int(event["value"]))

    def _drain_backend(self, now: float) -> bool:
        """Handle up to BATCH worker messages; True if there may be more."""
        # A valid REPLY goes straight from the socket to the reply routing (compiled: route.pyx's,
        # called from C; pure: _on_reply); every other message to _on_worker_frames.
        reply = self._on_reply if self._routes is None else self._routes[1]
        return drain_replies(self.back, BATCH, reply, self._on_worker_frames, self._reply_failed, now)

    def _drain_frontend(self, now: float) -> None:
        # A valid REQUEST goes straight from the socket to the request routing (compiled:
        # route.pyx's, called from C; pure: router.request); every other message to
        # _on_client_message. With CURVE client keys (a per-request refusal check), every
        # message goes there (request None).
        request = self.router.request if self._routes is None else self._routes[0]
        drain_requests(self.front, BATCH, self.config.max_message_size,
                       request if self._client_refusal is None else None, self._on_client_message,
                       self._request_failed, now)
