"""The one exception tree of zrouter.

Every error a client, worker or broker raises on purpose derives from :class:`ZRouterError`::

    ZRouterError
     ├── RequestTimeout            (also a builtins.TimeoutError) deadline passed, no reply
     ├── ServiceUnavailable        no worker serves the service (after the broker's grace period)
     │    └── Overloaded           the service's queue is full; retry later or elsewhere
     ├── WorkerLost                the worker holding a non-idempotent request vanished, or the
     │                             retry budget ran out: the outcome is unknown
     ├── RemoteError               the handler raised; ``.type`` and ``.message`` say what
     ├── ProtocolError             a peer sent frames that do not follow docs/protocol.md
     │    └── MessageTooLarge      the request is over the broker's size limit
     ├── Forbidden                 this client's key may not call this service (CURVE set-ups)
     ├── AuthenticationFailed      the broker refused this peer's key in the CURVE handshake
     └── ClientClosed              the client was closed while the request was pending

Each reply status on the wire maps to exactly one class (see ``zrouter.protocol.error_for_status``).
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "ClientClosed",
    "Forbidden",
    "MessageTooLarge",
    "Overloaded",
    "ProtocolError",
    "RemoteError",
    "RequestTimeout",
    "ServiceUnavailable",
    "WorkerLost",
    "ZRouterError",
]


class ZRouterError(Exception):
    """Root of every zrouter error."""


class RequestTimeout(ZRouterError, TimeoutError):
    """The request's deadline passed before a reply arrived."""


class ServiceUnavailable(ZRouterError):
    """No worker serves this service."""


class Overloaded(ServiceUnavailable):
    """The service's queue is full: the broker refused the request at once."""


class WorkerLost(ZRouterError):
    """The worker holding the request vanished; whether it ran is unknown."""


class RemoteError(ZRouterError):
    """The handler raised an exception; ``type`` is its class name, ``message`` its text."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message


class ProtocolError(ZRouterError):
    """A peer sent frames that break the wire protocol."""


class MessageTooLarge(ProtocolError):
    """The message is larger than the receiver accepts."""


class ClientClosed(ZRouterError):
    """The client was closed while this request was pending."""


class Forbidden(ZRouterError):
    """The broker knows this client's key, and that key may not call this service."""


class AuthenticationFailed(ZRouterError):
    """The broker refused this peer's CURVE key (unknown, revoked, or the wrong server key):
    ``reason`` is what ZeroMQ's handshake reported."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
