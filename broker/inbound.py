"""What the broker does with each message its sockets deliver, beyond the fast path: worker
control messages (READY, HEARTBEAT, DRAIN, DISCONNECT, UPDATE), client requests the compiled
drain hands back, and every message that breaks the protocol or fails, answered and counted
per port, and logged at a bounded pace. Mixed into :class:`zrouter.broker.server.Broker`.

Hostile input (docs/protocol.md, "Limits"): each failure answers its peer (BAD_REQUEST under
the request's rid when readable, DISCONNECT to a worker), loses nothing else, and is logged at
most LOG_PEER_BURST lines at once then one every LOG_PEER_EVERY seconds per peer, and
LOG_ALL_RATE a second over all peers. The rate buckets are bounded (PACED_PEERS), and so are
the DISCONNECTs to peers the broker does not know (one per heartbeat interval each).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

import zmq

from zrouter import protocol
from zrouter.broker.router import Refused, Router
from zrouter.ratelimit import RateLimiter
# The per-message decoders: compiled when built, else zrouter.protocol's.
from zrouter._speedups import decode_request, decode_worker_message

if TYPE_CHECKING:
    from zrouter.broker.auth import BrokerAuth
    from zrouter.broker.config import BrokerConfig

__all__ = ["BACKEND", "FRONTEND", "LOG_ALL_BURST", "LOG_ALL_RATE", "LOG_PEER_BURST", "LOG_PEER_EVERY",
           "PACED_PEERS", "BrokerState", "Inbound", "peer_label"]

log = logging.getLogger("zrouter.broker")

# The ports, as the bad-message counters name them.
FRONTEND: Final = "frontend"
BACKEND: Final = "backend"
LOG_PEER_BURST: Final = 3
LOG_PEER_EVERY: Final = 10.0
LOG_ALL_BURST: Final = 50
LOG_ALL_RATE: Final = 5.0
PACED_PEERS: Final = 10_000

_SIG: Final = protocol.SIGNATURE
_HEARTBEAT_HEADER: Final = protocol.encode_heartbeat()
_SRCFD: Final = int(zmq.SRCFD)


class BrokerState(Protocol):
    """The broker as this mixin uses it (its methods' self-type): zrouter.broker.server.Broker."""

    router: Router
    config: BrokerConfig
    auth: BrokerAuth | None
    _fd_worker: dict[int, bytes]
    _log_peer: RateLimiter
    _log_all: RateLimiter
    _disconnects: RateLimiter
    _client_refusal: Callable[[str | None, str], str | None] | None

    def to_worker(self, ident: bytes, header: bytes, payload: Any) -> bool: ...
    def _drain_monitor(self, now: float) -> None: ...
    # This mixin's own, called across its methods.
    def _on_reply(self, ident: bytes, rid: int, status: int, flags: int, message: str | None,
                  error_type: str | None, payload: Any, now: float) -> None: ...
    def _on_worker_message(self, frames: list[zmq.Frame], now: float) -> None: ...
    def _unknown_worker(self, ident: bytes, what: str, now: float) -> None: ...
    def _bad_worker_message(self, ident: bytes, exc: protocol.BadMessage, now: float) -> None: ...
    def _message_failed(self, port: str, ident: bytes, rid: int, now: float) -> None: ...
    def _disconnect(self, ident: bytes, why: str, now: float) -> None: ...
    def _log_paced(self, ident: bytes, port: str, level: int, msg: str, *args: object,
                   exc_info: bool = False) -> None: ...
    def _bad_request(self, frames: list[zmq.Frame], exc: protocol.BadMessage, now: float) -> None: ...


class Inbound:
    """Broker methods for the messages its drain loops hand to Python."""

    def _on_worker_frames(self: BrokerState, frames: list[zmq.Frame], now: float) -> None:
        try:
            self._on_worker_message(frames, now)
        except protocol.BadMessage as exc:
            self._bad_worker_message(frames[0].bytes, exc, now)
        except Exception:  # a bug met by this one message: it alone fails
            self._message_failed(BACKEND, frames[0].bytes, 0, now)

    def _reply_failed(self: BrokerState, ident: bytes, rid: int, now: float) -> None:
        """_on_reply raised (called by the compiled drain from its except clause)."""
        self._message_failed(BACKEND, ident, 0, now)

    def _on_reply(self: BrokerState, ident: bytes, rid: int, status: int, flags: int, message: str | None,
                  error_type: str | None, payload: Any, now: float) -> None:
        """A well-formed REPLY, decoded (by drain_replies: compiled, or _on_worker_message)."""
        router = self.router
        w = router.workers.get(ident)
        if w is None:
            self._unknown_worker(ident, "REPLY", now)
            return
        w.last_seen = now
        router.worker_reply(w, rid, status, flags, message, error_type, payload, now)

    def _on_worker_message(self: BrokerState, frames: list[zmq.Frame], now: float) -> None:
        router = self.router
        ident = frames[0].bytes
        w = router.workers.get(ident)
        if w is not None:
            w.last_seen = now
        if len(frames) == 3 and frames[2].bytes == _HEARTBEAT_HEADER and frames[1].bytes == _SIG:
            if w is None:  # skip msgpack for the most common message of an idle broker
                self._unknown_worker(ident, "HEARTBEAT", now)
            return
        protocol.check_frames(frames, 1)
        msg = decode_worker_message(frames[2].buffer)
        protocol.check_payload_count(msg, frames, 1)
        kind = type(msg)
        if kind is protocol.Reply:
            r: protocol.Reply = msg  # type: ignore[assignment]
            self._on_reply(ident, r.rid, r.status, r.flags, r.message, r.error_type, frames[3], now)
        elif kind is protocol.Heartbeat:
            if w is None:
                self._unknown_worker(ident, "HEARTBEAT", now)
        elif kind is protocol.Ready:
            ready: protocol.Ready = msg  # type: ignore[assignment]
            user_id = None
            if self.auth is not None:  # CURVE: the worker's public key, as ZAP vouched for it
                user_id = str(frames[0].get("User-Id"))
                if not router.admit_worker(ident, user_id, ready.service, now):
                    return
            # Events queued before this connection's first message belong to older connections
            # (maybe on this same fd number): handle them first so they cannot hit this worker.
            self._drain_monitor(now)
            fd = frames[0].get(_SRCFD)
            try:
                router.worker_ready(ident, ready, now, fd, user_id)
            except Refused as exc:
                if exc.kind is not None:
                    router.count_bad(BACKEND, exc.kind)
                    self._log_paced(ident, BACKEND, logging.WARNING, "READY refused from worker %s: %s",
                                    peer_label(ident), exc)
                self._disconnect(ident, f"READY refused: {exc}", now)
                return
            self._fd_worker[fd] = ident
        elif w is None:
            self._unknown_worker(ident, kind.__name__.upper(), now)
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

    def _unknown_worker(self: BrokerState, ident: bytes, what: str, now: float) -> None:
        """A message other than READY from a connection the broker does not know: counted, and
        answered DISCONNECT (paced)."""
        self.router.count_bad(BACKEND, "unknown_worker")
        self._disconnect(ident, f"{what} from an unknown worker: send READY on a new connection", now)

    def _bad_worker_message(self: BrokerState, ident: bytes, exc: protocol.BadMessage, now: float) -> None:
        """Counted and logged (paced). An unknown command is then ignored (later versions may
        add commands); anything else that breaks the protocol ends the registration, if any
        (what the worker held is requeued as for a lost worker), and is answered DISCONNECT
        with the reason: the worker must register again, on a new connection."""
        router = self.router
        router.count_bad(BACKEND, exc.kind)
        self._log_paced(ident, BACKEND, logging.WARNING, "bad message from worker %s: %s", peer_label(ident), exc)
        if type(exc) is protocol.UnknownCommand:
            return
        w = router.workers.get(ident)
        if w is not None:
            router.remove_worker(w, f"broke the protocol ({exc.kind})", now)
        self._disconnect(ident, f"bad message: {exc}", now)

    def _message_failed(self: BrokerState, port: str, ident: bytes, rid: int, now: float) -> None:
        """Handling one message raised something unforeseen (a bug): log it with its traceback
        (paced), count it, answer the peer as for a bad message, serve on. A client request
        that raised after the router had taken it may get a second reply (its client drops
        it): better than none."""
        self.router.count_bad(port, "internal_error")
        self._log_paced(ident, port, logging.ERROR, "error handling a message from %s %s (serving on)",
                        "client" if port == FRONTEND else "worker", peer_label(ident), exc_info=True)
        if port == FRONTEND:
            self.router.count_status("", protocol.STATUS_BAD_REQUEST)
            self.router.answer(ident, rid, protocol.STATUS_BAD_REQUEST, "bad request: the broker failed to handle it")
            return
        w = self.router.workers.get(ident)
        if w is not None:
            self.router.remove_worker(w, "a message of its could not be handled", now)
        self._disconnect(ident, "the broker failed to handle a message: send READY on a new connection", now)

    def _disconnect(self: BrokerState, ident: bytes, why: str, now: float) -> None:
        """DISCONNECT ``why`` to a worker connection, at most once per heartbeat interval per
        connection (a worker's queued heartbeats after a broker restart draw one, not one each)."""
        if self._disconnects.take(ident, now) is None:
            return
        self._log_paced(ident, BACKEND, logging.INFO, "asking worker %s to reconnect: %s", peer_label(ident), why)
        self.to_worker(ident, protocol.encode_disconnect(why), None)

    def _log_paced(self: BrokerState, ident: bytes, port: str, level: int, msg: str, *args: object,
                   exc_info: bool = False) -> None:
        """Log, at most LOG_PEER_BURST lines at once and then one per LOG_PEER_EVERY seconds per
        peer, and LOG_ALL_RATE per second over all peers; a line that follows suppressed ones
        says how many."""
        now = time.monotonic()
        mine = self._log_peer.take((port, ident), now)
        if mine is None:
            return
        everyone = self._log_all.take(None, now)
        if everyone is None:
            return
        if mine or everyone:
            msg += " [%d similar lines not logged]"
            args = (*args, mine + everyone)
        log.log(level, msg, *args, exc_info=exc_info)

    def _request_failed(self: BrokerState, ident: bytes, rid: int, now: float) -> None:
        """router.request raised (called by the compiled drain from its except clause)."""
        self._message_failed(FRONTEND, ident, rid, now)

    def _on_client_message(self: BrokerState, frames: list[zmq.Frame], now: float) -> None:
        max_size = self.config.max_message_size
        decode = decode_request
        refusal = self._client_refusal
        rid = 0
        try:
            if len(frames) != 4 or frames[1].bytes != _SIG:
                protocol.check_frames(frames, 1)  # raises the precise BadMessage...
                protocol.check_payload_count(decode(frames[2].buffer), frames, 1)  # ...with the rid
            req = decode(frames[2].buffer)
            rid = req.rid
            payload = frames[3]
            if len(payload) > max_size:
                self.router.stats.bad += 1
                self.router.count_bad(FRONTEND, "too_large")
                self.router.count_status(req.service, protocol.STATUS_TOO_LARGE)
                self.router.answer(frames[0].bytes, req.rid, protocol.STATUS_TOO_LARGE,
                                   f"payload of {len(payload)} bytes is over the limit of {max_size}")
                return
            key = req.key
            if isinstance(key, str):
                key = key.encode()
            if refusal is not None:
                why = refusal(str(frames[0].get("User-Id")), req.service)
                if why is not None:
                    self.router.forbid(frames[0].bytes, req.rid, req.service, why)
                    return
            self.router.request(frames[0].bytes, req.rid, req.service, req.timeout_ms, req.attempt, req.flags, key,
                                payload, now)
        except protocol.BadMessage as exc:
            self._bad_request(frames, exc, now)  # malformed input: answer it, keep serving
        except Exception:  # a bug met by this one request: it alone fails
            self._message_failed(FRONTEND, frames[0].bytes, rid, now)

    def _bad_request(self: BrokerState, frames: list[zmq.Frame], exc: protocol.BadMessage, now: float) -> None:
        """Counted, logged (paced), answered BAD_REQUEST under the request's rid when it could be
        read (else 0); a message with a command this version does not know is ignored instead."""
        client = frames[0].bytes
        self.router.count_bad(FRONTEND, exc.kind)
        self._log_paced(client, FRONTEND, logging.WARNING, "bad request from client %s: %s", peer_label(client), exc)
        if type(exc) is protocol.UnknownCommand:
            return
        self.router.stats.bad += 1
        self.router.count_status("", protocol.STATUS_BAD_REQUEST)  # no trustworthy service name: ""
        self.router.answer(client, exc.rid, protocol.STATUS_BAD_REQUEST, f"bad request: {exc}")


def peer_label(ident: bytes) -> str:
    """A routing id for a log line: hex, cut (a peer may choose a 255-byte id)."""
    return ident[:16].hex() + ("..." if len(ident) > 16 else "")
