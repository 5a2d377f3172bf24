"""The broker daemon's I/O loop: two ROUTER sockets, a socket monitor, and the Router core.

Hot path, per request: one header decode from the client, one header encode to the worker, the
payload frame passed along untouched (never decoded, never copied), and the same on the way
back. Sockets are drained in batches after each poll. A worker killed outright is noticed at
once through the back end's socket monitor (the TCP connection closing), not only when its
heartbeats stop.
"""

from __future__ import annotations

import collections
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import msgpack
import zmq
from zmq.utils.monitor import parse_monitor_message

from zrouter.broker.router import Router
from zrouter.broker.unread import RateLimitedLog, UnreadReplies

if TYPE_CHECKING:
    from zrouter.broker.consul_link import ConsulLink
from zrouter import limits, protocol
from zrouter.transport import NOBLOCK, SNDMORE, recv_frames

__all__ = ["Broker", "BrokerConfig"]

log = logging.getLogger("zrouter.broker")

# Messages taken from one socket before looking at the other: large enough to amortise the
# poll, small enough that replies are not starved by a flood of requests.
BATCH: Final = 256
# How long a stopping broker waits for workers to answer what they hold.
SHUTDOWN_GRACE: Final = 5.0
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
_REQUEST: Final = protocol.REQUEST
_REPLY: Final = protocol.REPLY
_HEARTBEAT: Final = protocol.HEARTBEAT
_HEARTBEAT_HEADER: Final = protocol.encode_heartbeat()
_READY: Final = protocol.READY
_DRAIN: Final = protocol.DRAIN
_DISCONNECT: Final = protocol.DISCONNECT
_UPDATE: Final = protocol.UPDATE
_unpackb: Callable[..., Any] = msgpack.unpackb
_SRCFD: Final = int(zmq.SRCFD)


@dataclass
class BrokerConfig:
    frontend: str = "tcp://127.0.0.1:5555"
    backend: str = "tcp://127.0.0.1:5556"
    heartbeat_interval: float = 1.0
    liveness: int = 3
    default_policy: str = "least-outstanding"
    service_policies: dict[str, str] = field(default_factory=dict)
    max_queue: int = 10_000
    max_attempts: int = 3
    grace: float = 1.0
    max_message_size: int = limits.MAX_MESSAGE_SIZE
    # Memory bounds (zrouter/limits.py and README.md say what each one holds).
    max_services: int = limits.MAX_SERVICES
    max_client_requests: int = limits.MAX_CLIENT_REQUESTS
    max_client_bytes: int = limits.MAX_CLIENT_BYTES
    max_client_unread: int = limits.MAX_CLIENT_UNREAD
    max_client_unread_bytes: int = limits.MAX_CLIENT_UNREAD_BYTES
    max_capacity: int = limits.MAX_CAPACITY
    max_worker_bytes: int = limits.MAX_WORKER_BYTES

    def check(self) -> None:
        """Raise ValueError for bounds that contradict each other (a payload the size limit
        allows must fit in a client's bounds, or it could never be served)."""
        for name in ("max_message_size", "max_services", "max_client_requests", "max_client_bytes",
                     "max_client_unread", "max_client_unread_bytes", "max_capacity", "max_worker_bytes",
                     "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("max_client_bytes", "max_client_unread_bytes"):
            if getattr(self, name) < self.max_message_size:
                raise ValueError(f"{name} ({getattr(self, name)}) must be at least max_message_size "
                                 f"({self.max_message_size})")
    shutdown_grace: float = SHUTDOWN_GRACE
    stats_interval: float = 30.0
    consul: str | None = None  # address of a Consul agent; None: the embedded registry only
    consul_token: str | None = None
    broker_service: str = "zrouter-broker"
    advertise_frontend: str | None = None
    advertise_backend: str | None = None


class Broker:
    """One broker. ``run()`` blocks; ``stop()`` may be called from any thread or a signal handler."""

    def __init__(self, config: BrokerConfig, context: zmq.Context[Any] | None = None) -> None:
        config.check()
        self.config = config
        self.ctx = context or zmq.Context.instance()
        self.router = Router(
            self,
            default_policy=config.default_policy,
            service_policies=config.service_policies,
            max_queue=config.max_queue,
            max_attempts=config.max_attempts,
            grace=config.grace,
            liveness_timeout=config.heartbeat_interval * config.liveness,
            liveness=config.liveness,
            max_services=config.max_services,
            max_client_requests=config.max_client_requests,
            max_client_bytes=config.max_client_bytes,
            max_capacity=config.max_capacity,
            max_worker_bytes=config.max_worker_bytes,
        )
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
        self._undeliverable_log = RateLimitedLog(log)
        self._overflow_log = RateLimitedLog(log)
        # Sending to a vanished worker must fail loudly so its request is requeued at once.
        self.back.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.monitor = self.back.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._fd_worker: dict[int, bytes] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._inbox: collections.deque[Callable[[], None]] = collections.deque()
        self._stopping = False
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

    # -- lifecycle --------------------------------------------------------------------------

    def bind(self) -> None:
        self.front.bind(self.config.frontend)
        self.back.bind(self.config.backend)
        self.frontend_endpoint = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend_endpoint = self.back.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("broker listening: clients on %s, workers on %s; policy %s%s",
                 self.frontend_endpoint, self.backend_endpoint, self.config.default_policy,
                 "".join(f", {s}={p}" for s, p in self.config.service_policies.items()))

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
        self.back.disable_monitor()
        for s in (self.monitor, self.front, self.back):
            s.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- sink (called by the router) --------------------------------------------------------

    def to_worker(self, ident: bytes, header: bytes, payload: Any) -> bool:
        back = self.back
        try:
            back.send(ident, SNDMORE | NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.EAGAIN):
                return False
            raise
        back.send(_SIG, SNDMORE)
        if payload is None:
            back.send(header, 0)
        else:
            back.send(header, SNDMORE)
            back.send(payload, 0, copy=False)
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
        front = self.front
        try:
            front.send(client, SNDMORE | NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            if size:
                self.unread.undo(client, size)
            self._undeliverable(client, exc.errno)
            return
        front.send(_SIG, SNDMORE)
        front.send(header, SNDMORE)
        if verdict:
            frame = zmq.Frame(getattr(payload, "buffer", payload), copy=False, track=True)
            front.send(frame, 0, copy=False)
            self.unread.track(client, frame.tracker)
        else:
            front.send(payload, 0, copy=False)

    def _undeliverable(self, client: bytes, err: int) -> None:
        self.router.stats.undeliverable += 1
        if err == errno.EHOSTUNREACH:
            why = "its connection is gone"
        else:
            why = f"it has {self.config.max_client_unread} replies unread (--max-client-unread)"
        self._undeliverable_log.warning("reply to client %s dropped: %s", client.hex(), why)

    def _overflow(self, client: bytes, header: bytes, size: int) -> tuple[bytes, bytes, int]:
        """The TOO_LARGE answer that replaces a reply the client has no room for."""
        self.router.stats.unread_overflow += 1
        crid = _unpackb(header)[1]  # our own REPLY header
        unread = self.unread.unread(client)
        limit = self.config.max_client_unread_bytes
        self._overflow_log.warning("reply of %d bytes to client %s replaced by TOO_LARGE: %d bytes unread "
                                   "(--max-client-unread-bytes %d)", size, client.hex(), unread, limit)
        text = (f"the request was served, but its reply ({size} bytes) was dropped: {unread} bytes of replies "
                f"to this client are still unread (--max-client-unread-bytes {limit})")
        return protocol.encode_reply(crid, protocol.STATUS_TOO_LARGE, 0, text), b"", 0

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
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
        stop_by: float | None = None
        if self.consul is not None:
            self.consul.start()
        self.ready.set()
        while True:
            now = time.monotonic()
            if self._stopping and stop_by is None:
                log.info("broker stopping: answering queued requests, waiting up to %.1fs for %d in flight",
                         cfg.shutdown_grace, router.inflight_count())
                router.shutdown()
                stop_by = now + cfg.shutdown_grace
            if stop_by is not None and (now >= stop_by or not router.inflight_count()):
                break
            wake = next_beat
            timer = router.next_timer()
            if timer is not None and timer < wake:
                wake = timer
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
                router.tick(now)
                next_beat = now + cfg.heartbeat_interval
                if now >= next_stats:
                    stats = router.stats.as_dict()
                    if stats != last_stats:
                        log.info("stats: %s; %d workers, %d in flight", stats, len(router.workers),
                                 router.inflight_count())
                        last_stats = stats
                    next_stats = now + cfg.stats_interval
            elif timer is not None and now >= timer:
                router.expire(now)
        router.abandon_inflight()
        if self.consul is not None:
            self.consul.stop()
        log.info("broker stopped: %s", router.stats.as_dict())

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

    def _drain_backend(self, now: float) -> bool:
        """Handle up to BATCH worker messages; True if there may be more."""
        back = self.back
        for _ in range(BATCH):
            try:
                frames = recv_frames(back, NOBLOCK)
            except zmq.Again:
                return False
            try:
                self._on_worker_message(frames, now)
            except protocol.BadMessage as exc:
                log.warning("bad message from worker %s: %s", frames[0].bytes.hex(), exc)
        return True

    def _on_worker_message(self, frames: list[zmq.Frame], now: float) -> None:
        router = self.router
        ident = frames[0].bytes
        w = router.workers.get(ident)
        if w is not None:
            w.last_seen = now
        if len(frames) == 3 and frames[2].bytes == _HEARTBEAT_HEADER and frames[1].bytes == _SIG:
            if w is None:  # skip msgpack for the most common message of an idle broker
                self._disconnect(ident, "heartbeat from an unknown worker")
            return
        protocol.check_frames(frames, 1)
        msg = protocol.decode_worker_message(frames[2].buffer)
        protocol.check_payload_count(msg, frames, 1)
        kind = type(msg)
        if kind is protocol.Reply:
            if w is None:
                self._disconnect(ident, "reply from an unknown worker")
                return
            r: protocol.Reply = msg  # type: ignore[assignment]
            router.worker_reply(w, r.rid, r.status, r.flags, r.message, r.error_type, frames[3], now)
        elif kind is protocol.Heartbeat:
            if w is None:
                self._disconnect(ident, "heartbeat from an unknown worker")
        elif kind is protocol.Ready:
            # Events queued before this connection's first message belong to older connections
            # (maybe on this same fd number): handle them first so they cannot hit this worker.
            self._drain_monitor(now)
            fd = frames[0].get(_SRCFD)
            router.worker_ready(ident, msg, now, fd)  # type: ignore[arg-type]
            self._fd_worker[fd] = ident
        elif w is None:
            self._disconnect(ident, f"{kind.__name__.upper()} from an unknown worker")
        elif kind is protocol.Drain:
            router.worker_drain(w, now)
        elif kind is protocol.Disconnect:
            reason = msg.reason or ""  # type: ignore[union-attr]
            router.remove_worker(w, f"said goodbye ({reason[:80]})", now)
            if self._fd_worker.get(w.fd) == ident:
                del self._fd_worker[w.fd]
        elif kind is protocol.Update:
            u: protocol.Update = msg  # type: ignore[assignment]
            router.worker_update(w, u.capacity, u.weight, now)

    def _disconnect(self, ident: bytes, why: str) -> None:
        log.info("asking worker %s to reconnect: %s", ident.hex(), why)
        self.to_worker(ident, protocol.encode_disconnect(why), None)

    def _drain_frontend(self, now: float) -> None:
        front = self.front
        request = self.router.request
        max_size = self.config.max_message_size
        decode = protocol.decode_request
        for _ in range(BATCH):
            try:
                frames = recv_frames(front, NOBLOCK)
            except zmq.Again:
                return
            try:
                if len(frames) != 4 or frames[1].bytes != _SIG:
                    protocol.check_frames(frames, 1)  # raises the precise BadMessage
                    raise protocol.BadMessage("frames", "a REQUEST is [signature, header, payload]")
                req = decode(frames[2].buffer)
                payload = frames[3]
                if len(payload) > max_size:
                    self.router.stats.bad += 1
                    self.router.answer(frames[0].bytes, req.rid, protocol.STATUS_TOO_LARGE,
                                       f"payload of {len(payload)} bytes is over the limit of {max_size}")
                    continue
                key = req.key
                if isinstance(key, str):
                    key = key.encode()
                request(frames[0].bytes, req.rid, req.service, req.timeout_ms, req.attempt, req.flags, key,
                        payload, now)
            except protocol.BadMessage as exc:
                self._bad_request(frames, exc)  # malformed input: answer it, keep serving

    def _bad_request(self, frames: list[zmq.Frame], exc: protocol.BadMessage) -> None:
        self.router.stats.bad += 1
        client = frames[0].bytes
        log.warning("bad request from client %s: %s", client.hex(), exc)
        self.router.answer(client, exc.rid, protocol.STATUS_BAD_REQUEST, f"bad request: {exc}")
