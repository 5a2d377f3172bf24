"""Where Consul is, how long things take, and how a failed call is reported."""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import consul

from zrouter.errors import ZRouterError

if TYPE_CHECKING:
    pass

__all__ = ["ConsulUnavailable", "consul_address", "consul_token"]

log = logging.getLogger("zrouter.consul")

DEFAULT_PORT: Final = 8500
DEFAULT_BROKER_SERVICE: Final = "zrouter-broker"
DEFAULT_TTL: Final = 10.0  # seconds; owners pass it every ttl/3 or so
DEFAULT_WAIT: Final = "5s"  # blocking-query wait: also bounds how long stop() takes
REQUEST_TIMEOUT: Final = 5.0  # seconds, for every non-blocking call (added to a blocking one's wait)

_T = TypeVar("_T")


class ConsulUnavailable(ZRouterError):
    """Consul could not be reached or refused the call; the message says which call and why."""


# -- addresses and durations ------------------------------------------------------------------


def _endpoint(addr: str | None) -> tuple[str, str, int] | None:
    """(scheme, host, port) from an argument or CONSUL_HTTP_ADDR; None when neither is set."""
    raw = addr if addr is not None else os.environ.get("CONSUL_HTTP_ADDR")
    if raw is None or not raw.strip():
        return None
    raw = raw.strip()
    parsed = urllib.parse.urlsplit(raw if "://" in raw else "//" + raw)
    scheme = parsed.scheme or ("https" if os.environ.get("CONSUL_HTTP_SSL", "").lower() == "true" else "http")
    try:
        port = parsed.port or DEFAULT_PORT
    except ValueError as exc:
        raise ValueError(f"invalid Consul address {raw!r}: {exc}") from None
    if scheme not in ("http", "https") or not parsed.hostname or parsed.path not in ("", "/"):
        raise ValueError(f"invalid Consul address {raw!r}: want host:port or http(s)://host:port")
    return scheme, parsed.hostname, port


def consul_address(addr: str | None = None) -> tuple[str, int] | None:
    """(host, port) of Consul's HTTP API from *addr* or CONSUL_HTTP_ADDR; None if neither is set.

    Accepts ``host``, ``host:port``, ``http://host:port``, ``https://host:port`` and
    ``[v6addr]:port``; the port defaults to 8500. Raises ValueError for anything else.
    """
    ep = _endpoint(addr)
    return None if ep is None else (ep[1], ep[2])


def consul_token(token: str | None = None) -> str | None:
    """The ACL token: *token*, else CONSUL_HTTP_TOKEN, else None."""
    return token if token else (os.environ.get("CONSUL_HTTP_TOKEN") or None)


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS: Final = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(value: float | str) -> float:
    """Seconds in a number of seconds or a Go duration ("5s", "1m30s", "250ms")."""
    if isinstance(value, str):
        parts = _DURATION.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise ValueError(f"invalid duration {value!r}: want e.g. '5s', '250ms', '1m'")
        return sum(float(n) * _UNITS[u] for n, u in parts)
    return float(value)


def _duration(value: float | str) -> str:
    """A Go duration for Consul, from seconds or a Go duration."""
    seconds = _seconds(value)
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    return value if isinstance(value, str) else f"{max(1, round(seconds * 1000))}ms"


def _client(consul_addr: str | None, token: str | None, timeout: float = REQUEST_TIMEOUT) -> Any:
    scheme, host, port = _endpoint(consul_addr) or ("http", "127.0.0.1", DEFAULT_PORT)
    client = consul.Consul(host=host, port=port, scheme=scheme, connections_timeout=timeout)
    # py-consul prefers CONSUL_HTTP_TOKEN over its token argument; ours is the other way round.
    client.token = consul_token(token)
    return client


def _describe(consul_addr: str | None) -> str:
    scheme, host, port = _endpoint(consul_addr) or ("http", "127.0.0.1", DEFAULT_PORT)
    return f"{scheme}://{host}:{port}"


# Transport errors from requests are OSErrors (RequestException derives from IOError); HTTP
# errors and undecodable answers are consul.ConsulException.
_FAILURES: Final = (OSError, consul.ConsulException)


def _call(what: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    try:
        return fn(*args, **kwargs)
    except _FAILURES as exc:
        raise ConsulUnavailable(f"{what}: {exc}") from exc


def _unknown_check(exc: BaseException) -> bool:
    text = str(exc)
    return "does not have associated TTL" in text or "nknown check" in text or text.startswith("404")

# Hosts that mean "every interface": not an address anyone can connect to.
_WILDCARDS: Final = frozenset({"*", "0.0.0.0", "::", ""})


def _split_tcp(endpoint: str) -> tuple[str, int] | None:
    """(host, port) of a ``tcp://host:port`` endpoint, else None."""
    if not endpoint.startswith("tcp://"):
        return None
    host, sep, port = endpoint[6:].rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)
