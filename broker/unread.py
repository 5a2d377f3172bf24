"""Replies the broker has handed to ZeroMQ for a client and that have not left for its
connection yet: the bytes a client that does not read can make the broker hold.

ZeroMQ bounds a ROUTER's queue per peer by message count only (ZMQ_SNDHWM), so the bytes are
counted here. Every reply's size is added when it is queued. To learn what has left, one reply
per ``mark_every`` bytes (and every reply at least that large) is sent as a tracked frame: pyzmq's
``MessageTracker`` says when libzmq has released it, which happens once it is written to the
connection, or dropped with it when the client disconnects. Queues are FIFO, so everything
queued before a released mark has left too. What is still unconfirmed is therefore at most the
truth plus ``mark_every`` bytes (max_bytes / 16), for one tracked frame per ``mark_every`` bytes
of replies (a tracked frame costs tens of µs; an untracked one nothing). A reply is refused
when the unconfirmed bytes plus its own would pass ``max_bytes + mark_every``: a client that
reads can always be sent a reply of up to ``max_bytes``.

Per-client records are forgotten once all they counted is confirmed gone, or, past
``max_clients`` records, oldest first: a single client cannot push its own record out.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

__all__ = ["UnreadReplies"]

# Client records kept before the oldest are forgotten (a record is ~300 bytes).
MAX_CLIENTS: Final = 10_000


class _Client:
    __slots__ = ("confirmed", "marked", "marks", "sent")

    def __init__(self) -> None:
        self.sent = 0  # bytes of replies queued for this client, ever
        self.confirmed = 0  # of those, bytes known to have left the broker
        self.marked = 0  # ``sent`` at the last tracked reply
        self.marks: deque[tuple[int, Any]] = deque()  # (sent after it, its MessageTracker)

    def refresh(self) -> None:
        marks = self.marks
        while marks and marks[0][1].done:
            self.confirmed = marks.popleft()[0]


class UnreadReplies:
    """Unread reply bytes per client, against a bound of ``max_bytes`` per client."""

    def __init__(self, max_bytes: int, max_clients: int = MAX_CLIENTS) -> None:
        self.max_bytes = max_bytes
        self.mark_every = max(1, max_bytes // 16)
        self.limit = max_bytes + self.mark_every
        self.max_clients = max_clients
        self._clients: dict[bytes, _Client] = {}

    def unread(self, client: bytes) -> int:
        """Bytes of replies queued for ``client`` and not known to have left (an upper bound)."""
        st = self._clients.get(client)
        if st is None:
            return 0
        st.refresh()
        return st.sent - st.confirmed

    def add(self, client: bytes, size: int) -> int:
        """Count a reply of ``size`` bytes about to be queued for ``client``: -1 when it does not
        fit (nothing counted), 1 when it must go as a tracked frame (hand its tracker to
        :meth:`track`), else 0. :meth:`undo` if it could not be queued after all."""
        st = self._clients.get(client)
        if st is None:
            if len(self._clients) >= self.max_clients:
                self._sweep()
            st = self._clients[client] = _Client()
        sent = st.sent + size
        if sent - st.confirmed > self.limit:
            st.refresh()
            if sent - st.confirmed > self.limit:
                return -1
        st.sent = sent
        return 1 if sent - st.marked >= self.mark_every else 0

    def undo(self, client: bytes, size: int) -> None:
        st = self._clients.get(client)
        if st is not None:
            st.sent -= size

    def track(self, client: bytes, tracker: Any) -> None:
        st = self._clients[client]
        st.marked = st.sent
        st.marks.append((st.sent, tracker))

    def _sweep(self) -> None:
        clients = self._clients
        for key, st in list(clients.items()):
            st.refresh()
            if st.confirmed >= st.sent:
                del clients[key]
        excess = len(clients) - self.max_clients // 2
        for key in list(clients)[: max(0, excess)]:
            del clients[key]  # oldest first: records are kept in creation order

    def __len__(self) -> int:
        return len(self._clients)

