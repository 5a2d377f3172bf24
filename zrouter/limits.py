"""The memory bounds zrouter ships with, in one place: the broker's defaults, and the client's
and worker's copies of the ones they must agree on.

A bound that both sides of a connection enforce has one default here, so a client left at its
defaults never meets the broker's refusal: it keeps its own sends within the bound (queueing
the rest locally) and checks its own request size before sending. Change one side and change the
other to match (``zrouter-broker --help``, ``Client(max_message_size=, max_inflight=,
max_inflight_bytes=)``). With these defaults no single client or worker can make a broker hold
more than a few tens of MiB (see README.md, "What the broker does for you").
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "MAX_CAPACITY",
    "MAX_CLIENT_BYTES",
    "MAX_CLIENT_REQUESTS",
    "MAX_CLIENT_UNREAD",
    "MAX_CLIENT_UNREAD_BYTES",
    "MAX_MESSAGE_SIZE",
    "MAX_SERVICES",
    "MAX_WORKER_BYTES",
    "socket_max_message_size",
]

MIB: Final = 1024 * 1024

# Largest payload frame, bytes, both ways. Also every socket's ZMQ_MAXMSGSIZE (per frame; see
# socket_max_message_size), so a larger frame is refused by libzmq before it is in memory, by
# dropping the connection that sent it.
MAX_MESSAGE_SIZE: Final = 16 * MIB

# Requests one client connection may have in one broker (waiting in a queue or held by a
# worker): by count, and by the sum of their payload sizes. Past either, the broker answers
# OVERLOADED at once. The client library keeps within both per broker connection.
MAX_CLIENT_REQUESTS: Final = 1000
MAX_CLIENT_BYTES: Final = 16 * MIB

# Replies the broker has handed to ZeroMQ for one client and the client has not read yet: by
# count (the front end's ZMQ_SNDHWM; past it a reply is undeliverable: counted and logged) and
# by bytes (past it a reply is replaced by a TOO_LARGE answer). A client that reads what it
# asks for never meets either: its unread replies are at most its requests in flight.
MAX_CLIENT_UNREAD: Final = MAX_CLIENT_REQUESTS
MAX_CLIENT_UNREAD_BYTES: Final = 16 * MIB

# Services a broker keeps at once. Clients create one by naming it; one nobody serves is
# forgotten after the grace period. A request naming a new service past this many is answered
# UNAVAILABLE at once.
MAX_SERVICES: Final = 1000

# Credits the broker grants one worker connection, whatever it declares (the wire allows up to
# protocol.MAX_CAPACITY): a larger declaration is clamped, with a warning.
MAX_CAPACITY: Final = 1024

# Payload bytes of the requests one worker connection holds (including those the broker already
# answered TIMEOUT and the worker has not replied to: a worker that does not read its socket
# keeps them in the broker's send queue). Past it the worker gets nothing new until it replies,
# as if out of credits; a worker holding nothing may always take one request.
MAX_WORKER_BYTES: Final = 16 * MIB


def socket_max_message_size(max_message_size: int | None, header_size: int) -> int:
    """The ZMQ_MAXMSGSIZE for a socket whose payloads are at most ``max_message_size`` bytes
    (None: no limit, -1). libzmq applies it to every frame, headers too, so it is never below
    ``header_size`` (protocol.MAX_HEADER_SIZE)."""
    if max_message_size is None:
        return -1
    return max(max_message_size, header_size)
