"""CURVE's pure parts, without sockets: key files and their metadata, the broker's allow-lists
and decisions (one per ZAP domain), refusal logging, handshake verdicts, and the router's
authorization with time passed in."""

from __future__ import annotations

import logging
import os
import random
import stat
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from zrouter import protocol as p
from zrouter.broker.auth import CLIENTS, WORKERS, Keyring, RateLimitedLog, exposed_endpoints, load_allowlist
from zrouter.broker.router import Router
from zrouter.curve import HandshakeWatch, client_keys, load_public_key, parse_services, read_metadata, services_of
from zrouter.keys import create_key_pair, main


def _key(path: str | Path) -> str:
    return load_public_key(path).decode()


# -- key files -------------------------------------------------------------------------------


def test_zrouter_keys_writes_services_into_the_public_file_too(tmp_path: Path, capsys: Any) -> None:
    assert main(["w1", "--dir", str(tmp_path), "--services", "images, thumbs"]) == 0
    printed = capsys.readouterr().out.strip()
    public, secret = tmp_path / "w1.key", tmp_path / "w1.key_secret"
    assert printed == _key(public) == _key(secret)
    assert services_of(public) == services_of(secret) == {"images", "thumbs"}
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert main(["w1", "--dir", str(tmp_path)]) == 2  # never overwritten by accident
    assert main(["w1", "--dir", str(tmp_path), "--force"]) == 0
    assert services_of(public) is None  # no --services: unlimited
    assert _key(public) != printed


def test_key_names_and_service_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        create_key_pair("../escape", str(tmp_path))
    with pytest.raises(ValueError):
        create_key_pair("x", str(tmp_path), ["a,b"])


def test_metadata_is_read_like_czmq_writes_it(tmp_path: Path) -> None:
    cert = tmp_path / "hand.key"
    cert.write_text('#   a comment\nmetadata\n    services = "a, b,"\n    owner = ops\ncurve\n'
                    '    public-key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"\n')
    assert read_metadata(cert) == {"services": "a, b,", "owner": "ops"}
    assert services_of(cert) == {"a", "b"}
    assert parse_services("") == frozenset()  # present but empty: no service at all


def test_client_keys_need_both_files_and_a_real_secret(tmp_path: Path) -> None:
    assert client_keys(None, None) is None
    pub, sec = create_key_pair("c", str(tmp_path))
    with pytest.raises(ValueError, match="both"):
        client_keys(pub, None)
    with pytest.raises(ValueError, match="no secret key"):
        client_keys(pub, pub)  # a public file where the secret one belongs
    with pytest.raises(OSError):
        client_keys(pub, tmp_path / "missing.key_secret")
    keys = client_keys(pub, sec)
    assert keys is not None and keys.server_public == keys.public and len(keys.secret) == 40


# -- allow-lists and decisions ---------------------------------------------------------------


@pytest.fixture
def ring_dirs(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    workers, clients, keys = tmp_path / "workers", tmp_path / "clients", {}
    for d in (workers, clients):
        d.mkdir()
    keys["w"] = _key(create_key_pair("w", str(workers))[0])
    keys["w-img"] = _key(create_key_pair("w-img", str(workers), ["images"])[0])
    keys["c"] = _key(create_key_pair("c", str(clients))[0])
    keys["c-img"] = _key(create_key_pair("c-img", str(clients), ["images"])[0])
    keys["stranger"] = _key(create_key_pair("stranger", str(tmp_path))[0])
    for secret in [*workers.glob("*.key_secret"), *clients.glob("*.key_secret")]:
        secret.unlink()  # a broker's directories hold public keys only
    (workers / "garbage.key").write_text("not a certificate\n")
    return workers, clients, keys


def test_allowlist_skips_bad_files_and_refuses_a_missing_directory(
    ring_dirs: tuple[Path, Path, dict[str, str]], caplog: Any
) -> None:
    workers, _, keys = ring_dirs
    grants = load_allowlist(str(workers))
    assert {g.name for g in grants.values()} == {"w", "w-img"}
    assert grants[keys["w-img"]].services == {"images"} and grants[keys["w"]].services is None
    assert "garbage.key" in caplog.text
    with pytest.raises(OSError):
        load_allowlist(str(workers / "typo"))


def test_each_domain_has_its_own_allow_list(ring_dirs: tuple[Path, Path, dict[str, str]]) -> None:
    workers, clients, k = ring_dirs
    ring = Keyring(str(workers), str(clients))
    assert ring.zap_refusal(WORKERS, k["w"]) is None
    assert ring.zap_refusal(WORKERS, k["c"]) == "unknown worker key"  # a client key never registers
    assert ring.zap_refusal(CLIENTS, k["c"]) is None
    assert ring.zap_refusal(CLIENTS, k["w"]) == "unknown client key"  # a worker key never calls
    assert ring.zap_refusal(CLIENTS, k["stranger"]) == "unknown client key"
    assert ring.zap_refusal("other", k["w"]) is not None
    assert ring.refusals == {"workers": 0, "clients": 0, "handshake": 0, "ready": 0, "request": 0}


def test_any_client_never_means_any_worker(ring_dirs: tuple[Path, Path, dict[str, str]]) -> None:
    workers, _, k = ring_dirs
    ring = Keyring(str(workers), None)
    assert ring.zap_refusal(CLIENTS, k["stranger"]) is None  # any client key...
    assert ring.zap_refusal(CLIENTS, k["c"]) is None
    assert ring.zap_refusal(WORKERS, k["stranger"]) == "unknown worker key"  # ...but not as a worker
    assert ring.zap_refusal(CLIENTS, k["w"]) == "a worker key on the client port"
    assert ring.client_refusal(k["stranger"], "payments") is None


def test_services_limit_what_a_key_may_do(ring_dirs: tuple[Path, Path, dict[str, str]]) -> None:
    workers, clients, k = ring_dirs
    ring = Keyring(str(workers), str(clients))
    assert ring.worker_refusal(k["w-img"], "images") is None
    assert ring.worker_refusal(k["w-img"], "payments") == "worker key 'w-img' may not serve 'payments'"
    assert ring.worker_refusal(k["w"], "payments") is None
    assert ring.worker_refusal(None, "images") is not None
    assert ring.client_refusal(k["c-img"], "images") is None
    assert ring.client_refusal(k["c-img"], "payments") == "client key 'c-img' may not call 'payments'"
    assert ring.client_refusal(k["stranger"], "images") == "client key not allowed (revoked?)"
    assert ring.refusals["ready"] == 2 and ring.refusals["request"] == 2


def test_reload_applies_removals_and_keeps_the_old_tables_on_error(
    ring_dirs: tuple[Path, Path, dict[str, str]]
) -> None:
    workers, clients, k = ring_dirs
    ring = Keyring(str(workers), str(clients))
    (workers / "w.key").unlink()
    text = (clients / "c.key").read_text().replace("metadata\n", "metadata\n    services = other\n")
    (clients / "c.key").write_text(text)
    assert ring.worker_refusal(k["w"], "x") is None  # nothing changes before the reload
    assert ring.reload()
    assert ring.zap_refusal(WORKERS, k["w"]) == "unknown worker key"
    assert ring.client_refusal(k["c"], "images") == "client key 'c' may not call 'images'"
    os.rename(clients, clients.with_name("moved"))
    assert not ring.reload()
    assert ring.zap_refusal(CLIENTS, k["c"]) is None  # the old tables stay


def test_refusal_log_is_bounded_per_kind(caplog: Any) -> None:
    limited = RateLimitedLog(logging.getLogger("test.limited"), burst=3, period=10.0)
    with caplog.at_level(logging.WARNING, "test.limited"):
        logged = [limited.warning("ready", "line %d", i, now=1.0 + i * 0.01) for i in range(10)]
        assert logged == [True] * 3 + [False] * 7
        assert limited.warning("request", "another kind", now=1.5)  # not hidden by the flood
        assert limited.warning("ready", "later", now=11.5)
    assert "later (7 similar lines left out)" in caplog.text
    assert len(caplog.records) == 5


def test_exposed_endpoints() -> None:
    assert exposed_endpoints(["tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:2", "ipc:///tmp/x",
                              "inproc://a"]) == []
    assert exposed_endpoints(["tcp://*:5555", "tcp://0.0.0.0:1", "tcp://10.0.0.5:2", "tcp://eth0:3"]) == [
        "tcp://*:5555", "tcp://0.0.0.0:1", "tcp://10.0.0.5:2", "tcp://eth0:3"]


def test_handshake_watch() -> None:
    watch = HandshakeWatch()
    assert watch.feed(int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL), 32) is None  # once: maybe a dying broker
    assert "server key" in (watch.feed(int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL), 32) or "")
    assert watch.feed(int(zmq.EVENT_HANDSHAKE_SUCCEEDED), 0) is None
    assert watch.feed(int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL), 32) is None  # counting starts again
    assert "ZAP status 400" in (watch.feed(int(zmq.EVENT_HANDSHAKE_FAILED_AUTH), 400) or "")
    mismatch = watch.feed(int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL), int(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH))
    assert mismatch is not None and "mechanism mismatch" in mismatch
    assert watch.feed(int(zmq.EVENT_CONNECTED), 12) is None


# -- the router's authorization ----------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.to_workers: list[tuple[bytes, list[Any]]] = []
        self.to_clients: list[tuple[bytes, list[Any]]] = []

    def to_worker(self, ident: bytes, header: bytes, payload: Any) -> bool:
        self.to_workers.append((ident, msgpack.unpackb(header)))
        return True

    def to_client(self, client: bytes, header: bytes, payload: Any) -> None:
        self.to_clients.append((client, msgpack.unpackb(header)))


class Access:
    """Keys by name: "all" may serve anything, "img" only images, anything else nothing."""

    def __init__(self) -> None:
        self.revoked: set[str] = set()

    def worker_refusal(self, key: str | None, service: str) -> str | None:
        if key in self.revoked or key not in ("all", "img"):
            return "worker key not allowed (revoked?)"
        return None if key == "all" or service == "images" else f"worker key {key!r} may not serve {service!r}"


def _router() -> tuple[Router, Sink, Access]:
    sink, access = Sink(), Access()
    r = Router(sink, rng=random.Random(1))
    r.access = access
    return r, sink, access


def _ready(r: Router, ident: bytes, key: str, service: str, now: float = 0.0) -> bool:
    if not r.admit_worker(ident, key, service, now):
        return False
    r.worker_ready(ident, p.Ready(service, 2, 1, {"instance": ident.decode()}), now, -1, key)
    return True


def test_a_worker_key_registers_only_for_its_services() -> None:
    r, sink, _ = _router()
    assert _ready(r, b"w1", "img", "images")
    assert not _ready(r, b"w2", "img", "payments")
    assert not _ready(r, b"w3", "nobody", "images")
    assert set(r.workers) == {b"w1"}
    disconnects = {i: h for i, h in sink.to_workers if h[0] == p.DISCONNECT}
    assert disconnects[b"w2"][1] == "worker key 'img' may not serve 'payments'"
    assert b"w3" in disconnects and r.stats.forbidden == 2
    # A registered worker that asks for another service is refused and taken out.
    assert not _ready(r, b"w1", "img", "payments")
    assert r.workers == {}


def test_recheck_after_reload_disconnects_revoked_workers_and_requeues_their_requests() -> None:
    r, sink, access = _router()
    assert _ready(r, b"keep", "all", "images")
    assert _ready(r, b"gone", "img", "images")
    for crid in range(4):  # two each: both workers hold requests
        r.request(b"c", crid, "images", 10_000, 0, p.FLAG_IDEMPOTENT, None, b"x", 0.0)
    assert r.workers[b"gone"].outstanding == 2
    access.revoked.add("img")
    assert r.recheck_workers(1.0) == 1
    assert set(r.workers) == {b"keep"} and b"gone" not in r.worker_keys
    assert (b"gone", [p.DISCONNECT, "worker key not allowed (revoked?)"]) in sink.to_workers
    assert r.services["images"].queue  # what it held waits for the worker that is left
    assert r.recheck_workers(2.0) == 0


def test_forbid_answers_forbidden_and_counts() -> None:
    r, sink, _ = _router()
    r.forbid(b"c", 7, "payments", "client key 'c' may not call 'payments'")
    assert sink.to_clients == [(b"c", [p.REPLY, 7, p.STATUS_FORBIDDEN, 0, "client key 'c' may not call 'payments'",
                                       None])]
    assert r.stats.forbidden == 1
    assert r.service_stats["payments"].counts[p.STATUS_FORBIDDEN] == 1  # zrouter_requests_total{status="forbidden"}
