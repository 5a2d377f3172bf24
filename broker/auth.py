"""The broker's side of CURVE: key allow-lists, its ZAP handler, and who may do what.

With ``--curve-secret-key`` both broker sockets are CURVE servers (ZeroMQ RFC 26), each in its
own ZAP domain (RFC 27): the back end in ``workers``, the front end in ``clients``. libzmq asks
the ZAP handler here about every new connection; the answer carries the peer's public key as
its User-Id, which libzmq then attaches to every message of that connection. The broker reads
it from there (``frame.get("User-Id")``), never from anything a peer writes itself.

- ``workers`` accepts only keys found in ``--worker-keys`` (a directory of public ``.key``
  certificates); ``clients`` accepts keys in ``--client-keys``, or, without that directory, any
  key except a worker's (clients are then encrypted but not authenticated). pyzmq's
  ``Authenticator`` has one "allow any key" switch shared by every domain, so letting any client
  in would let any key register as a worker: this handler is its own, speaking the same ZAP
  request/reply format, with a separate decision per domain.
- A certificate's ``services = a,b`` metadata limits its key (:class:`Grant`); the router asks
  :meth:`Keyring.worker_refusal` at READY and the I/O loop asks :meth:`Keyring.client_refusal`
  per request (only when ``--client-keys`` is given).
- :meth:`Keyring.reload` (SIGHUP) re-reads both directories and swaps the tables whole, so
  the ZAP thread and the loop each see the old or the new set, never a mix.

:class:`Keyring` holds the tables and decisions (no sockets: unit-tested), :class:`BrokerAuth`
the ZAP thread. Refusals are counted (:attr:`Keyring.refusals`, by kind) and logged at most
``LOG_BURST`` lines per ``LOG_PERIOD`` seconds, with the number left out.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import zmq
from zmq.utils import z85

from zrouter.curve import (
    EVENT_HANDSHAKE_FAILED,
    apply_server,
    handshake_failure,
    load_public_key,
    load_secret_key,
    parse_event,
    require_curve,
    services_of,
)

__all__ = [
    "CLIENTS",
    "WORKERS",
    "ZAP_ENDPOINT",
    "BrokerAuth",
    "Grant",
    "Keyring",
    "RateLimitedLog",
    "exposed_endpoints",
    "load_allowlist",
]

log = logging.getLogger("zrouter.broker.auth")

WORKERS: Final = "workers"  # the back end's ZAP domain
CLIENTS: Final = "clients"  # the front end's ZAP domain
ZAP_ENDPOINT: Final = "inproc://zeromq.zap.01"  # fixed by RFC 27: one handler per context
ZAP_VERSION: Final = b"1.0"
LOG_BURST: Final = 10
LOG_PERIOD: Final = 10.0

_pipe_seq = itertools.count()


@dataclass(frozen=True, slots=True)
class Grant:
    """One allowed key: ``name`` is its certificate file's name (how logs name it),
    ``services`` what it may serve or call (None: every service)."""

    name: str
    services: frozenset[str] | None = None

    def allows(self, service: str) -> bool:
        return self.services is None or service in self.services


def load_allowlist(directory: str) -> dict[str, Grant]:
    """Z85 public key (str) -> Grant, from every ``*.key`` certificate in ``directory``.

    A file that cannot be read or holds no valid key is logged and skipped; a missing directory
    raises OSError (a typo must not quietly mean "nobody")."""
    if not os.path.isdir(directory):
        raise OSError(f"key directory {directory!r} does not exist")
    grants: dict[str, Grant] = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "*.key"))):
        name = os.path.basename(path).removesuffix(".key")
        try:
            key = load_public_key(path).decode("ascii")
            services = services_of(path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            log.warning("skipping key file %s: %s", path, exc)
            continue
        if key in grants:
            log.warning("key file %s repeats the key of %s: the first one counts", path, grants[key].name)
            continue
        grants[key] = Grant(name, services)
    return grants


def exposed_endpoints(endpoints: Iterable[str]) -> list[str]:
    """The tcp:// endpoints bound beyond loopback (``*``, ``0.0.0.0``, a real address...)."""
    out = []
    for ep in endpoints:
        if not ep.startswith("tcp://"):
            continue  # ipc://, inproc://: local by nature
        host = ep[len("tcp://"):].rpartition(":")[0].strip("[]")
        if ";" in host:  # tcp://source;dest: the bound side is the last part
            host = host.rpartition(";")[2]
        if not (host == "localhost" or host.startswith("127.") or host == "::1"):
            out.append(ep)
    return out


class RateLimitedLog:
    """At most ``burst`` lines per ``period`` seconds for each kind of line (so a flood of one
    kind cannot hide the others); the next line of a kind says how many were left out."""

    def __init__(self, logger: logging.Logger, burst: int = LOG_BURST, period: float = LOG_PERIOD) -> None:
        self.logger = logger
        self.burst = burst
        self.period = period
        self._windows: dict[str, list[float]] = {}  # kind -> [window start, lines in it, left out]
        self._lock = threading.Lock()  # the ZAP thread and the loop both log refusals

    def warning(self, kind: str, msg: str, *args: object, now: float | None = None) -> bool:
        """Log ``msg % args`` at WARNING unless ``kind`` is over its rate; True when logged.
        ``kind`` should come from a small fixed set: each has its own window."""
        now = time.monotonic() if now is None else now
        with self._lock:
            w = self._windows.setdefault(kind, [-float("inf"), 0, 0])
            if now - w[0] >= self.period:
                w[0], w[1] = now, 0
            if w[1] >= self.burst:
                w[2] += 1
                return False
            w[1] += 1
            left_out, w[2] = int(w[2]), 0
        if left_out:
            msg += f" ({left_out} similar lines left out)"
        self.logger.warning(msg, *args)
        return True


class Keyring:
    """The allow-lists and every authorization decision of one broker, without sockets.

    ``worker_dir`` (required) and ``client_dir`` (None: any client key but a worker's) are
    directories of public ``.key`` files, read now and again on :meth:`reload`. Raises OSError
    when a directory is missing. Refusals are counted in :attr:`refusals` by kind: ZAP per
    domain ("workers", "clients"), other failed handshakes ("handshake"), refused READYs
    ("ready") and forbidden requests ("request"), and logged at a bounded rate.
    """

    def __init__(self, worker_dir: str, client_dir: str | None) -> None:
        self.worker_dir = worker_dir
        self.client_dir = client_dir
        self.workers = load_allowlist(worker_dir)
        self.clients = None if client_dir is None else load_allowlist(client_dir)
        self.refusals: dict[str, int] = {"workers": 0, "clients": 0, "handshake": 0, "ready": 0, "request": 0}
        self._count_lock = threading.Lock()  # counted from the ZAP thread and the loop
        self.limited = RateLimitedLog(log)

    def describe(self) -> str:
        clients = (f"clients from {self.client_dir} ({len(self.clients)} keys)" if self.clients is not None
                   else "ANY client key that knows the broker's public key (encrypted, not authenticated: "
                        "give --client-keys to authenticate clients)")
        return f"workers from {self.worker_dir} ({len(self.workers)} keys); {clients}"

    def count(self, kind: str) -> int:
        """Count one refusal of ``kind``; returns the total so far."""
        with self._count_lock:
            n = self.refusals[kind] = self.refusals[kind] + 1
        return n

    def zap_refusal(self, domain: str, key: str) -> str | None:
        """Why a connection with CURVE ``key`` (Z85) is refused in ``domain``, or None."""
        if domain == WORKERS:
            return None if key in self.workers else "unknown worker key"
        if domain == CLIENTS:
            clients = self.clients
            if clients is None:
                # Any client: except a worker's key, which must never send requests.
                return "a worker key on the client port" if key in self.workers else None
            return None if key in clients else "unknown client key"
        return f"unknown ZAP domain {domain!r}"

    def worker_refusal(self, key: str | None, service: str) -> str | None:
        """Why the worker whose User-Id is ``key`` may not serve ``service`` (None: it may)."""
        grant = self.workers.get(key) if key else None
        if grant is None:
            why = "worker key not allowed (revoked?)"
        elif grant.allows(service):
            return None
        else:
            why = f"worker key {grant.name!r} may not serve {service!r}"
        self.limited.warning("ready", "refused worker READY for %r: %s; %d so far", service, why, self.count("ready"))
        return why

    def client_refusal(self, key: str | None, service: str) -> str | None:
        """Why the client whose User-Id is ``key`` may not call ``service`` (None: it may).
        Without client keys every client may call everything."""
        clients = self.clients
        if clients is None:
            return None
        grant = clients.get(key) if key else None
        if grant is None:
            why = "client key not allowed (revoked?)"
        elif grant.allows(service):
            return None
        else:
            why = f"client key {grant.name!r} may not call {service!r}"
        self.limited.warning("request", "forbidden request for %r: %s; %d so far", service, why,
                             self.count("request"))
        return why

    def handshake_failed(self, domain: str, event: int, value: int) -> None:
        """A failed handshake seen by a socket monitor. ZAP refusals were counted when made;
        the others (no key at all, a wrong server key, garbage) are counted here."""
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            why = "a peer without CURVE keys (security mechanism mismatch)"
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            why = "a peer using another server key, or corrupt traffic (cryptographic error)"
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            why = (f"the peer hung up mid-handshake ({os.strerror(value) if value else 'no detail'}): often a peer "
                   "without CURVE keys or with another server key")
        else:
            why = handshake_failure(event, value)
        self.limited.warning("handshake", "failed handshake on the %s port: %s; %d so far", domain, why,
                             self.count("handshake"))

    def reload(self) -> bool:
        """Re-read both key directories (SIGHUP). On an error the old tables stay; False."""
        try:
            workers = load_allowlist(self.worker_dir)
            clients = None if self.client_dir is None else load_allowlist(self.client_dir)
        except OSError as exc:
            log.error("keys not reloaded, keeping the old ones: %s", exc)
            return False
        self.workers, self.clients = workers, clients  # whole tables swapped: readers see old or new
        log.info("keys reloaded: %d worker keys%s", len(workers),
                 "" if clients is None else f", {len(clients)} client keys")
        return True


class BrokerAuth:
    """The ZAP handler of one broker: a thread answering libzmq's ZAP requests from a
    :class:`Keyring`, and CURVE set-up of the broker's two sockets.

    ``secret_key`` is the broker's ``.key_secret`` file. The ZAP socket is bound at once, before
    the broker binds its own sockets: libzmq lets CURVE handshakes through unauthenticated while
    no ZAP handler is bound. Raises OSError or ValueError for an unreadable key, RuntimeError
    without CURVE in libzmq, ZMQError when the context already has a ZAP handler.
    """

    def __init__(self, ctx: zmq.Context[Any], secret_key: str, keyring: Keyring) -> None:
        require_curve()
        public, self._secret = load_secret_key(secret_key)
        self.public_key = public.decode("ascii")
        self.keyring = keyring
        self._monitors: list[tuple[zmq.Socket[Any], str]] = []
        self._zap: zmq.Socket[Any] = ctx.socket(zmq.REP)
        self._stop_w: zmq.Socket[Any] = ctx.socket(zmq.PAIR)
        self._stop_r: zmq.Socket[Any] = ctx.socket(zmq.PAIR)
        self._thread = threading.Thread(target=self._serve, name="zrouter-broker-zap", daemon=True)
        self._closed = False
        try:
            for sock in (self._zap, self._stop_w, self._stop_r):
                sock.linger = 0
            self._zap.bind(ZAP_ENDPOINT)
            pipe = f"inproc://zrouter.broker.auth.{next(_pipe_seq)}"
            self._stop_w.bind(pipe)
            self._stop_r.connect(pipe)
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        return f"CURVE on, broker public key {self.public_key}; {self.keyring.describe()}"

    # -- set-up and shutdown (the broker's thread) --------------------------------------------

    def secure(self, front: zmq.Socket[Any], back: zmq.Socket[Any]) -> None:
        """Make both broker sockets CURVE servers in their domains, and start the ZAP thread.
        Call before they bind. The front end gets a monitor for failed handshakes (the back end
        has the broker's own, which calls :meth:`Keyring.handshake_failed`)."""
        apply_server(front, self._secret, CLIENTS)
        apply_server(back, self._secret, WORKERS)
        addr = f"inproc://zrouter.broker.auth.monitor.{next(_pipe_seq)}"
        self._monitors.append((front.get_monitor_socket(EVENT_HANDSHAKE_FAILED, addr), CLIENTS))
        self._thread.start()

    def close(self) -> None:
        """Stop the ZAP thread and close its sockets (after the broker closed its own)."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._stop_w.send(b"")
            self._thread.join(5.0)
        for sock in (self._zap, self._stop_r, self._stop_w, *(m for m, _ in self._monitors)):
            sock.close(0)

    # -- the ZAP thread ----------------------------------------------------------------------

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        poller.register(self._stop_r, zmq.POLLIN)
        monitors = dict(self._monitors)
        for sock in monitors:
            poller.register(sock, zmq.POLLIN)
        while True:
            for sock, _ in poller.poll():
                if sock is self._stop_r:
                    return
                if sock is self._zap:
                    request = self._zap.recv_multipart()
                    try:
                        reply = self.handle_zap(request)
                    except Exception:  # a reply must go out whatever happens, or REP is stuck
                        log.exception("ZAP handler failed; refusing the connection")
                        reply = [ZAP_VERSION, request[1] if len(request) > 1 else b"", b"500", b"internal error", b"", b""]
                    self._zap.send_multipart(reply)
                else:
                    try:
                        msg = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        continue
                    event, value = parse_event(msg)
                    if event & EVENT_HANDSHAKE_FAILED:
                        self.keyring.handshake_failed(monitors[sock], event, value)

    def handle_zap(self, request: list[bytes]) -> list[bytes]:
        """One ZAP request (RFC 27: version, request id, domain, address, identity, mechanism,
        credentials...) -> its reply (version, request id, status code, status text, user id,
        metadata). The user id of an accepted CURVE peer is its Z85 public key."""
        if len(request) < 6 or request[0] != ZAP_VERSION:
            return [ZAP_VERSION, request[1] if len(request) > 1 else b"", b"400", b"malformed ZAP request", b"", b""]
        request_id, domain, address, mechanism = request[1], request[2], request[3], request[5]
        where = domain.decode("utf-8", "replace")
        peer = address.decode("utf-8", "replace")
        if mechanism != b"CURVE" or len(request) != 7 or len(request[6]) != 32:
            return self._refuse(request_id, where, f"mechanism {mechanism.decode('ascii', 'replace')} from {peer}")
        key = z85.encode(request[6]).decode("ascii")
        why = self.keyring.zap_refusal(where, key)
        if why is not None:
            return self._refuse(request_id, where, f"{why} (from {peer}, key {key})")
        return [ZAP_VERSION, request_id, b"200", b"OK", key.encode("ascii"), b""]

    def _refuse(self, request_id: bytes, domain: str, why: str) -> list[bytes]:
        kind = domain if domain in (WORKERS, CLIENTS) else "handshake"
        n = self.keyring.count(kind)
        self.keyring.limited.warning(kind, "refused a %s connection: %s; %d refused so far", domain, why, n)
        return [ZAP_VERSION, request_id, b"400", why.encode("utf-8")[:255], b"", b""]
