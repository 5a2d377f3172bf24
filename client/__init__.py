"""zrouter client library: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both send requests to a broker (or several) and return the reply payload, raising the
ZRouterError subclass that matches a failed reply::

    with Client("tcp://127.0.0.1:5555") as c:
        c.request("echo", b"hi")                       # -> b"hi"
        c.map("square", range(100))                     # 100 in flight over one connection

    async with AsyncClient("tcp://127.0.0.1:5555") as c:
        await asyncio.gather(*(c.request("square", i) for i in range(100)))

    with Client(consul="127.0.0.1:8500") as c:          # every broker registered in Consul
        c.request("echo", b"hi")                       # spread over them, failing over
"""

from zrouter.client._async import AsyncClient
from zrouter.client._sync import Client, PendingReply
from zrouter.errors import (
    AuthenticationFailed,
    ClientClosed,
    Forbidden,
    MessageTooLarge,
    Overloaded,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    ServiceUnavailable,
    WorkerLost,
    ZRouterError,
)

__all__ = [
    "AsyncClient",
    "AuthenticationFailed",
    "Client",
    "ClientClosed",
    "Forbidden",
    "MessageTooLarge",
    "Overloaded",
    "PendingReply",
    "ProtocolError",
    "RemoteError",
    "RequestTimeout",
    "ServiceUnavailable",
    "WorkerLost",
    "ZRouterError",
]
