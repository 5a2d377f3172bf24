"""CURVE helpers shared by broker, worker and client: key files, socket options, and a socket
monitor's handshake failures turned into a reason a person can act on.

Keys are CurveZMQ certificate files in the format pyzmq's ``zmq.auth.create_certificates``
writes (czmq's ZPL "zcert" format): ``NAME.key`` holds the public key, ``NAME.key_secret`` the
public and the secret key. A certificate's ``metadata`` section may say which services the key
may use (``services = a,b``; see :func:`services_of`). Nothing here is cryptography: libzmq does
CurveZMQ (ZeroMQ RFC 26) and ZAP (RFC 27), pyzmq reads and writes the files.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Final, NamedTuple

import zmq
from zmq.auth import load_certificate

__all__ = [
    "EVENT_HANDSHAKE_FAILED",
    "EVENT_HANDSHAKE_SUCCEEDED",
    "SERVICES_FIELD",
    "ClientKeys",
    "HandshakeWatch",
    "apply_client",
    "apply_server",
    "client_keys",
    "handshake_failure",
    "load_public_key",
    "load_secret_key",
    "parse_event",
    "parse_services",
    "read_metadata",
    "require_curve",
    "services_of",
]

SERVICES_FIELD: Final = "services"  # the metadata field that limits a key to some services

EVENT_HANDSHAKE_SUCCEEDED: Final = int(zmq.EVENT_HANDSHAKE_SUCCEEDED)
_FAILED_NO_DETAIL: Final = int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_FAILED_PROTOCOL: Final = int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
_FAILED_AUTH: Final = int(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
EVENT_HANDSHAKE_FAILED: Final = _FAILED_NO_DETAIL | _FAILED_PROTOCOL | _FAILED_AUTH

_PROTOCOL_ERRORS: Final = {
    int(getattr(zmq, name)): name.removeprefix("PROTOCOL_ERROR_").lower().replace("_", " ")
    for name in dir(zmq)
    if name.startswith("PROTOCOL_ERROR_")
}
_KEY_LEN: Final = 40  # a Z85-encoded 32-byte key


class ClientKeys(NamedTuple):
    """What a connecting peer (worker or client) needs: the broker's public key and its own
    pair, each 40 bytes of Z85 text."""

    server_public: bytes
    public: bytes
    secret: bytes


def require_curve() -> None:
    """Raise RuntimeError when this libzmq was built without CURVE (libsodium/tweetnacl)."""
    if not zmq.has("curve"):
        raise RuntimeError(f"libzmq {zmq.zmq_version()} was built without CURVE support")


def _check_key(key: bytes | None, path: str | os.PathLike[str], what: str) -> bytes:
    if key is None or len(key) != _KEY_LEN:
        raise ValueError(f"{os.fspath(path)}: no valid {what} key (expected 40 characters of Z85)")
    return key


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The Z85 public key of a certificate file (``.key`` or ``.key_secret``).

    Raises OSError when the file cannot be read, ValueError when it holds no valid key."""
    public, _ = load_certificate(path)
    return _check_key(public, path, "public")


def load_secret_key(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of a ``.key_secret`` file.

    Raises OSError when the file cannot be read, ValueError when it is not a secret certificate
    (a public ``.key`` file given by mistake, say)."""
    public, secret = load_certificate(path)
    _check_key(public, path, "public")
    if secret is None:
        raise ValueError(f"{os.fspath(path)} holds no secret key: give the NAME.key_secret file")
    return public, _check_key(secret, path, "secret")  # type: ignore[return-value]


def client_keys(
    server_key: str | os.PathLike[str] | None, secret_key: str | os.PathLike[str] | None
) -> ClientKeys | None:
    """The keys of a worker or client from its two files (None when neither is given).

    ``server_key`` is the broker's public certificate (its ``.key``; a ``.key_secret`` works too
    but should not be handed out), ``secret_key`` the peer's own ``.key_secret``. Raises
    ValueError when only one is given or a file is not what it should be, OSError when a file
    cannot be read, RuntimeError without CURVE in libzmq."""
    if server_key is None and secret_key is None:
        return None
    if server_key is None or secret_key is None:
        raise ValueError("CURVE needs both curve_server_key (the broker's public key file) and "
                         "curve_secret_key (this peer's .key_secret file)")
    require_curve()
    public, secret = load_secret_key(secret_key)
    return ClientKeys(load_public_key(server_key), public, secret)


def apply_client(sock: zmq.Socket[Any], keys: ClientKeys) -> None:
    """Make ``sock`` a CURVE client of the server whose public key is in ``keys``."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


def apply_server(sock: zmq.Socket[Any], secret: bytes, domain: str) -> None:
    """Make ``sock`` a CURVE server whose handshakes are authenticated in ZAP ``domain``."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata`` section of a certificate file as a dict (ZPL: one ``name = value`` per
    indented line, values optionally quoted; ``#`` starts a comment line)."""
    out: dict[str, str] = {}
    section = ""
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\r\n")
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if line[:1] not in (" ", "\t"):
                section = text
                continue
            if section != "metadata":
                continue
            name, sep, value = text.partition("=")
            if sep:
                out[name.strip()] = value.strip().strip("\"'")
    return out


def parse_services(text: str) -> frozenset[str]:
    """``"a, b"`` -> {"a", "b"}; empty items are dropped (so ``""`` allows no service)."""
    return frozenset(s.strip() for s in text.split(",") if s.strip())


def services_of(path: str | os.PathLike[str]) -> frozenset[str] | None:
    """The services a certificate's key is limited to, or None (no ``services`` field: all)."""
    value = read_metadata(path).get(SERVICES_FIELD)
    return None if value is None else parse_services(value)


def parse_event(msg: list[bytes]) -> tuple[int, int]:
    """(event, value) of a socket monitor message (frame 0: uint16 event, uint32 value)."""
    head = msg[0]
    return int.from_bytes(head[:2], sys.byteorder), int.from_bytes(head[2:6], sys.byteorder)


def handshake_failure(event: int, value: int) -> str:
    """What a handshake-failure monitor event means, for logs and AuthenticationFailed."""
    if event == _FAILED_AUTH:
        return (f"the broker refused this key (ZAP status {value}): it is not in the broker's "
                "allow-list for this port, or it was revoked")
    if event == _FAILED_PROTOCOL:
        name = _PROTOCOL_ERRORS.get(value, f"protocol error {value:#x}")
        if value == int(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH):
            return ("security mechanism mismatch: one side uses CURVE and the other does not "
                    "(check the broker's --curve-secret-key and this peer's curve_server_key/curve_secret_key)")
        return f"handshake failed: {name}"
    return (f"the broker hung up during the handshake ({os.strerror(value) if value else 'no detail'}), as a CURVE "
            "broker does with a peer that has no keys or the wrong server key: is curve_server_key this broker's "
            "public key?")


class HandshakeWatch:
    """Decides from a connecting socket's monitor events when its handshakes are failing.

    ZAP refusals and protocol errors are final (libzmq does not even reconnect after them). A
    connection closed mid-handshake without detail is also what a peer with the wrong server key
    sees, but a broker dying at that instant looks the same once: it counts after two in a row.
    """

    __slots__ = ("_closed_early",)

    def __init__(self) -> None:
        self._closed_early = 0

    def feed(self, event: int, value: int) -> str | None:
        """One monitor event; returns the failure's reason when the handshake is refused."""
        if event == EVENT_HANDSHAKE_SUCCEEDED:
            self._closed_early = 0
        elif event == _FAILED_NO_DETAIL:
            self._closed_early += 1
            if self._closed_early >= 2:
                return handshake_failure(event, value)
        elif event & EVENT_HANDSHAKE_FAILED:
            return handshake_failure(event, value)
        return None
