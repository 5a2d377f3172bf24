"""CURVE end to end: real broker and worker processes with keys made by zrouter-keys' code,
real sockets, a loopback TCP relay that records what crosses the wire.

One CURVE deployment (module fixture) serves the tests that only read: a broker whose workers
must hold a key from ``workers/`` and whose clients must hold one from ``clients/``, with a
worker for ``images`` (key limited to images) and one for ``payments``. Tests that change keys
or kill processes start their own broker.
"""

from __future__ import annotations

import asyncio
import selectors
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.consul_agent import ConsulAgent
from tests.helpers import sigkill_a_busy_worker, unique
from tests.procs import BrokerProc, Proc, ProcessGroup, WorkerProc
from zrouter.client import AsyncClient, AuthenticationFailed, Client, Forbidden, ServiceUnavailable
from zrouter.keys import create_key_pair
from zrouter.transport import free_tcp_endpoint

pytestmark = pytest.mark.timeout(60)

MARKER = b"CARD-4111-1111-1111-1111"  # what an eavesdropper must never read


@dataclass
class Keys:
    """Key pairs in ``root``; ``workers/`` and ``clients/`` are a broker's allow-lists."""

    root: Path

    def __post_init__(self) -> None:
        for d in ("all", "workers", "clients"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.pair("broker")

    @property
    def workers(self) -> Path:
        return self.root / "workers"

    @property
    def clients(self) -> Path:
        return self.root / "clients"

    @property
    def server_public(self) -> Path:
        return self.root / "all" / "broker.key"

    def secret(self, name: str) -> Path:
        return self.root / "all" / f"{name}.key_secret"

    def pair(self, name: str, services: list[str] | None = None, allow: str | None = None) -> Path:
        """Make NAME's pair; ``allow`` "workers" or "clients" copies its public key there."""
        public, _ = create_key_pair(name, str(self.root / "all"), services)
        if allow is not None:
            shutil.copy(public, self.root / allow)
        return self.secret(name)

    def broker_args(self, client_keys: bool = True) -> list[str]:
        args = ["--curve-secret-key", str(self.secret("broker")), "--worker-keys", str(self.workers)]
        return args + (["--client-keys", str(self.clients)] if client_keys else [])

    def worker_args(self, name: str | None) -> list[str]:
        return [] if name is None else ["--curve-server-key", str(self.server_public),
                                        "--curve-secret-key", str(self.secret(name))]

    def client(self, endpoint: str, name: str, **kw: Any) -> Client:
        return Client(endpoint, curve_server_key=self.server_public, curve_secret_key=self.secret(name), **kw)


def worker(procs: ProcessGroup, endpoint: BrokerProc | str | None, keys: Keys, name: str | None, **kw: Any) -> WorkerProc:
    extra = [*keys.worker_args(name), *kw.pop("extra", ())]
    return procs.worker(endpoint, extra=extra, **kw)


def pid_of(answer: dict[str, Any]) -> str:
    return str(answer["worker"])  # whoami's worker id: its instance, which holds the pid


def refused_worker_exits(w: WorkerProc) -> None:
    """A worker whose key every broker refused stops with exit status 3, saying why."""
    assert w.wait(20) == 3, "\n".join(w.lines[-20:])
    w.wait_for("AuthenticationFailed|stopping: broker .* refused|refused this worker")


@dataclass
class Deployment:
    keys: Keys
    broker: BrokerProc
    images: WorkerProc  # key limited to images
    payments: WorkerProc  # unlimited worker key


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    keys = Keys(tmp_path_factory.mktemp("curve"))
    keys.pair("w-images", ["images"], allow="workers")
    keys.pair("w-any", allow="workers")
    keys.pair("c-any", allow="clients")
    keys.pair("c-images", ["images"], allow="clients")
    group = ProcessGroup()
    try:
        broker = group.broker(*keys.broker_args(), "--grace", "0.3")
        images = worker(group, broker, keys, "w-images", service="images", capacity=4)
        payments = worker(group, broker, keys, "w-any", service="payments", capacity=4)
        broker.wait_workers(2)
        yield Deployment(keys, broker, images, payments)
    finally:
        group.stop_all()


def test_workers_register_only_with_a_known_key_and_only_for_their_services(
    deployment: Deployment, procs: ProcessGroup
) -> None:
    d = deployment
    d.keys.pair("w-stranger")  # a valid key the broker has never seen
    no_key = worker(procs, d.broker, d.keys, None, service="payments", capacity=4)
    stranger = worker(procs, d.broker, d.keys, "w-stranger", service="payments", capacity=4)
    wrong_service = worker(procs, d.broker, d.keys, "w-images", service="payments", capacity=4)
    refused_worker_exits(stranger)
    d.broker.wait_for(r"refused a workers connection: unknown worker key")
    d.broker.wait_for(r"failed handshake on the workers port: a peer without CURVE keys")
    d.broker.wait_for(r"refused worker READY for 'payments': worker key 'w-images' may not serve 'payments'")
    with d.keys.client(d.broker.frontend, "c-any", timeout=10) as c:
        answers = c.map("payments", range(40)) + c.map("images", range(20))
    # Every payments request went to the one legitimate payments worker, none to the others.
    assert {pid_of(a) for a in answers[:40]} == {pid_of(answers[0])}
    assert str(d.payments.pid) in pid_of(answers[0])
    assert all(str(d.images.pid) in pid_of(a) for a in answers[40:])
    assert d.broker.count(r"worker \S+ joined") == 2
    for w in (no_key, wrong_service):
        assert w.popen is not None and w.popen.poll() is None  # still trying, still refused
    assert no_key.count("registered with broker") == 0 and wrong_service.count("registered with broker") == 0


def test_clients_are_authenticated_and_limited_to_their_services(deployment: Deployment) -> None:
    d = deployment
    with d.keys.client(d.broker.frontend, "c-images", timeout=5) as c:
        assert c.request("images", "x")["payload"] == "x"
        with pytest.raises(Forbidden, match="may not call 'payments'"):
            c.request("payments", "card")
        assert c.request("images", "still served")["payload"] == "still served"
    d.keys.pair("c-stranger")
    with d.keys.client(d.broker.frontend, "c-stranger", timeout=5) as c:
        t0 = time.monotonic()
        with pytest.raises(AuthenticationFailed, match="refused this key"):
            c.request("images", "x")
        with pytest.raises(AuthenticationFailed):  # the next one too, at once
            c.request("images", "y")
        with pytest.raises(AuthenticationFailed):
            c.wait_connected(timeout=5)
        assert time.monotonic() - t0 < 2.0
    with Client(d.broker.frontend, timeout=5) as c:  # no keys at all
        # Which side notices first is a race: a mechanism mismatch, or a hang-up mid-handshake.
        with pytest.raises(AuthenticationFailed, match=r"mechanism mismatch|no keys"):
            c.request("images", "x")
    d.broker.wait_for(r"refused a clients connection: unknown client key")
    d.broker.wait_for(r"forbidden request for 'payments': client key 'c-images' may not call 'payments'")


def test_async_client_with_an_unknown_key_fails_fast(deployment: Deployment) -> None:
    d = deployment
    d.keys.pair("c-async-stranger")

    async def run() -> float:
        async with AsyncClient(d.broker.frontend, timeout=5, curve_server_key=d.keys.server_public,
                               curve_secret_key=d.keys.secret("c-async-stranger")) as c:
            t0 = time.monotonic()
            with pytest.raises(AuthenticationFailed):
                await c.request("images", "x")
            return time.monotonic() - t0

    assert asyncio.run(run()) < 2.0


def test_a_client_with_the_wrong_server_key_fails_fast(deployment: Deployment) -> None:
    d = deployment
    impostor = d.keys.pair("impostor-broker")  # the client trusts another server key
    with Client(d.broker.frontend, timeout=5, curve_server_key=impostor.with_suffix(".key"),
                curve_secret_key=d.keys.secret("c-any")) as c:
        t0 = time.monotonic()
        with pytest.raises(AuthenticationFailed, match="server key"):
            c.request("images", "x")
        assert time.monotonic() - t0 < 3.0


def test_keys_work_only_on_their_own_port(deployment: Deployment, procs: ProcessGroup) -> None:
    d = deployment
    as_worker = worker(procs, d.broker, d.keys, "c-any", service="images")  # a client key, worker port
    refused_worker_exits(as_worker)
    with d.keys.client(d.broker.frontend, "w-any", timeout=5) as c:  # a worker key, client port
        with pytest.raises(AuthenticationFailed):
            c.request("images", "x")


class Relay:
    """A loopback TCP relay that keeps every byte it forwards, both ways."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen = bytearray()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.listener, selectors.EVENT_READ)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        peers: dict[socket.socket, socket.socket] = {}
        while not self._stop:
            for key, _ in self._sel.select(0.1):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if sock is self.listener:
                    inner, _ = sock.accept()
                    outer = socket.create_connection(self.target)
                    for s in (inner, outer):
                        s.setblocking(True)
                        self._sel.register(s, selectors.EVENT_READ)
                    peers[inner], peers[outer] = outer, inner
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                other = peers.get(sock)
                if not data or other is None:
                    for s in (sock, other):
                        if s is not None and s in peers:
                            self._sel.unregister(s)
                            peers.pop(s)
                            s.close()
                    continue
                self.seen += data
                other.sendall(data)
        for s in peers:
            s.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self._sel.close()
        self.listener.close()


def _relayed_exchange(procs: ProcessGroup, broker: BrokerProc, keys: Keys | None) -> bytes:
    """Echo MARKER through a worker and a client that both reach the broker through relays;
    returns every byte the relays saw."""
    front, back = Relay(broker.frontend), Relay(broker.backend)
    try:
        w = procs.worker(back.endpoint, service="cipher", handler="zrouter.worker.examples:echo",
                         extra=keys.worker_args("w-any") if keys else [])
        w.wait_for("registered with broker")
        opts: dict[str, Any] = {}
        if keys is not None:
            opts = {"curve_server_key": keys.server_public, "curve_secret_key": keys.secret("c-any")}
        with Client(front.endpoint, timeout=10, **opts) as c:
            assert c.request("cipher", MARKER) == MARKER
            assert c.request("cipher", {"card": MARKER.decode()}) == {"card": MARKER.decode()}
        w.stop()
        return bytes(front.seen + back.seen)
    finally:
        front.close()
        back.close()


def test_the_wire_carries_only_ciphertext_with_curve(deployment: Deployment, procs: ProcessGroup) -> None:
    wire = _relayed_exchange(procs, deployment.broker, deployment.keys)
    assert len(wire) > 4 * len(MARKER)  # the relays did carry the exchange
    assert MARKER not in wire and b"ZRT1" not in wire
    plain = procs.broker()
    wire = _relayed_exchange(procs, plain, None)
    assert MARKER in wire  # the same exchange without CURVE: anyone on the path reads it


def test_without_client_keys_any_client_is_served_but_workers_still_need_keys(
    tmp_path: Path, procs: ProcessGroup
) -> None:
    keys = Keys(tmp_path)
    keys.pair("w", allow="workers")
    keys.pair("anyone")  # in no allow-list
    keys.pair("w-stranger")
    broker = procs.broker(*keys.broker_args(client_keys=False))
    broker.wait_for("ANY client key")
    good = worker(procs, broker, keys, "w", service="echo")
    broker.wait_workers(1)
    refused_worker_exits(worker(procs, broker, keys, "w-stranger", service="echo"))
    broker.wait_for("refused a workers connection: unknown worker key")
    with keys.client(broker.frontend, "anyone", timeout=5) as c:
        assert str(good.pid) in pid_of(c.request("echo", "hi"))
    with keys.client(broker.frontend, "w", timeout=5) as c:  # a worker's key never sends requests
        with pytest.raises(AuthenticationFailed):
            c.request("echo", "hi")
    broker.wait_for("refused a clients connection: a worker key on the client port")
    assert broker.count(r"worker \S+ joined") == 1


def test_sighup_revokes_workers_and_clients_without_a_restart(tmp_path: Path, procs: ProcessGroup) -> None:
    keys = Keys(tmp_path)
    keys.pair("w-keep", allow="workers")
    keys.pair("w-revoked", allow="workers")
    for name in ("c-keep", "c-revoked", "c-narrowed"):
        keys.pair(name, allow="clients")
    broker = procs.broker(*keys.broker_args())
    keep = worker(procs, broker, keys, "w-keep", service="svc", capacity=4)
    revoked = worker(procs, broker, keys, "w-revoked", service="svc", capacity=4)
    broker.wait_workers(2)
    with keys.client(broker.frontend, "c-keep", timeout=10) as c_keep, \
            keys.client(broker.frontend, "c-revoked", timeout=5) as c_revoked, \
            keys.client(broker.frontend, "c-narrowed", timeout=5) as c_narrowed:
        assert len({pid_of(a) for a in c_keep.map("svc", range(40))}) == 2
        c_revoked.request("svc", "before")
        c_narrowed.request("svc", "before")

        (keys.workers / "w-revoked.key").unlink()
        (keys.clients / "c-revoked.key").unlink()
        narrowed = keys.clients / "c-narrowed.key"
        narrowed.write_text(narrowed.read_text().replace("metadata\n", "metadata\n    services = other\n"))
        broker.signal(signal.SIGHUP)
        broker.wait_for("keys reloaded: 1 worker keys, 2 client keys")
        broker.wait_for(r"left service 'svc' \(key revoked: worker key not allowed")

        refused_worker_exits(revoked)  # told DISCONNECT, came back, refused at the handshake
        assert {pid_of(a) for a in c_keep.map("svc", range(40))} == {pid_of(c_keep.request("svc", 0))}
        assert str(keep.pid) in pid_of(c_keep.request("svc", 0))
        with pytest.raises(Forbidden, match="not allowed"):
            c_revoked.request("svc", "after")  # its connection is still open: refused per request
        with pytest.raises(Forbidden, match="may not call 'svc'"):
            c_narrowed.request("svc", "after")
    with keys.client(broker.frontend, "c-revoked", timeout=5) as c:
        with pytest.raises(AuthenticationFailed):
            c.request("svc", "new connection")


# -- the core scenarios, once with CURVE on ----------------------------------------------------


@pytest.fixture
def curve_keys(tmp_path: Path) -> Keys:
    keys = Keys(tmp_path)
    keys.pair("w", allow="workers")
    keys.pair("c", allow="clients")
    return keys


def test_sigkill_requeue_with_curve(curve_keys: Keys, procs: ProcessGroup) -> None:
    keys = curve_keys
    broker = procs.broker(*keys.broker_args())
    victim, answers = sigkill_a_busy_worker(
        broker,
        lambda delay: worker(procs, broker, keys, "w", capacity=4, delay=delay),
        lambda: keys.client(broker.frontend, "c", timeout=20),
    )
    assert [a["payload"] for a in answers] == list(range(60))
    assert str(victim.pid) not in "".join(pid_of(a) for a in answers)
    broker.wait_for(r"left service .*\(connection closed\); [1-9]\d* requests requeued")


def test_graceful_drain_with_curve(curve_keys: Keys, procs: ProcessGroup) -> None:
    keys = curve_keys
    broker = procs.broker(*keys.broker_args())
    leaving = worker(procs, broker, keys, "w", capacity=4, delay=0.4)
    broker.wait_workers(1)
    with keys.client(broker.frontend, "c", timeout=20) as client:
        client.request("svc", "warm-up")
        pending = [client.submit("svc", i) for i in range(4)]
        worker(procs, broker, keys, "w", capacity=4)
        broker.wait_workers(2)
        leaving.signal(signal.SIGTERM)
        broker.wait_for("is draining")
        more = [client.submit("svc", 100 + i) for i in range(8)]
        answers = [x.result() for x in pending + more]
    assert [a["payload"] for a in answers] == list(range(4)) + [100 + i for i in range(8)]
    assert leaving.wait() == 0
    assert not [a for a in answers[4:] if str(leaving.pid) in pid_of(a)]
    broker.wait_for("said goodbye")


def test_requests_fail_with_service_unavailable_not_forbidden_when_allowed(deployment: Deployment) -> None:
    """An allowed key calling a service nobody serves gets the usual answer, not FORBIDDEN."""
    with deployment.keys.client(deployment.broker.frontend, "c-any", timeout=5) as c:
        with pytest.raises(ServiceUnavailable):
            c.request("nobody-serves-this", "x")


@pytest.mark.consul
def test_brokers_found_through_consul_share_the_pinned_server_key(
    curve_keys: Keys, procs: ProcessGroup, consul_agent: ConsulAgent
) -> None:
    """Two brokers with one key pair, found in Consul by a worker and a client that were given
    the server key by configuration: requests flow through both, encrypted and authenticated."""
    keys, bsvc = curve_keys, unique("brk")
    consul = ("--consul", consul_agent.http_addr, "--broker-service", bsvc, "--stats-interval", "0.2")
    brokers = [procs.broker(*keys.broker_args(), *consul) for _ in range(2)]
    w = worker(procs, None, keys, "w", service="svc", capacity=8,
               extra=["--consul", consul_agent.http_addr, "--broker-service", bsvc])
    for b in brokers:
        b.wait_workers(1)
    with Client(consul=consul_agent.http_addr, broker_service=bsvc, timeout=10,
                curve_server_key=keys.server_public, curve_secret_key=keys.secret("c")) as c:
        assert c.wait_connected(2, timeout=15)
        answers = c.map("svc", range(60))
    assert [a["payload"] for a in answers] == list(range(60))
    assert all(str(w.pid) in pid_of(a) for a in answers)
    for b in brokers:  # each broker took a share
        b.wait_for(r"stats: \{'accepted': [1-9]")


def test_broker_and_worker_refuse_to_start_with_unusable_keys(curve_keys: Keys, procs: ProcessGroup) -> None:
    keys = curve_keys
    bad = procs.add(Proc(["-m", "zrouter.broker", "--curve-secret-key", str(keys.server_public),  # public only
                          "--worker-keys", str(keys.workers)], "broker"))
    assert bad.wait() == 2
    bad.wait_for("cannot start: .*holds no secret key")
    missing = procs.add(Proc(["-m", "zrouter.broker", "--curve-secret-key", str(keys.secret("broker")),
                              "--worker-keys", str(keys.root / "typo")], "broker"))
    assert missing.wait() == 2
    missing.wait_for("cannot start: key directory .* does not exist")
    w = worker(procs, free_tcp_endpoint(), keys, None, extra=["--curve-server-key", str(keys.server_public)])
    assert w.wait() == 2  # one key file of two: a usage error, at once
    w.wait_for("needs both curve_server_key")


def test_a_broker_beyond_loopback_without_curve_warns(curve_keys: Keys, procs: ProcessGroup) -> None:
    plain = procs.broker(frontend=free_tcp_endpoint("0.0.0.0"))
    plain.wait_for(r"WARNING .*listening beyond loopback \(tcp://0\.0\.0\.0:\d+\) without CURVE")
    secured = procs.broker(*curve_keys.broker_args(), frontend=free_tcp_endpoint("0.0.0.0"))
    secured.wait_for("CURVE on")
    assert secured.count("beyond loopback") == 0
