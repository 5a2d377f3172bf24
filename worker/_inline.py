"""Inline mode (``Worker(..., inline=True)``): the I/O thread runs sync handlers itself.

Each poll wake-up drains up to a batch of messages from every readable broker socket; the
REQUESTs among them wait in a local FIFO (conn.owed counts them, as in pool mode) and are then
run one after the other, in arrival order, each reply sent straight back on the socket the
request came in on: no pool thread, no queue hand-off, no inproc hop, no GIL ping-pong. A batch
that runs longer than a millisecond reads the sockets again between requests. Then the loop
runs its timers (heartbeats, liveness, drain progress) and polls again.

The price: nothing else happens while a handler runs. No heartbeat goes out and no broker
message is read, so a handler must finish well within ``heartbeat_interval * liveness`` or the
broker declares the worker dead and requeues what it held (the late reply is then refused and
the worker registers again). After a long handler, a broker whose messages are waiting unread
is not taken for silent. Requests beyond the one running wait in the local FIFO or the socket;
the broker's credits (``capacity``) still bound how many the worker holds. A request's deadline
counts from when the worker reads it, so one that arrives during a handler gets that much late.

A second SIGINT/SIGTERM ("stop without waiting") interrupts the running handler when the loop
runs in the main thread (the CLI): the request is abandoned unanswered, as pool mode abandons
its threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from ._engine import Engine
from ._handlers import Abandon, Answer, Job, Runner, respond

__all__ = ["InlineEngine"]

log = logging.getLogger("zrouter.worker")

_REDRAIN: Final = 0.001  # s: within a batch, read the sockets again after this long


class _NoThreads(Runner):
    """The runner an inline engine hands to :meth:`Engine.run`: there is nothing to run."""

    def __init__(self, post: Callable[[Answer], None], instance_id: str) -> None:
        super().__init__(post, instance_id)
        self.submit = _ignore

    def start(self) -> None:
        pass

    def shutdown(self, deadline: float) -> bool:
        return True


def _ignore(job: Job) -> None:
    raise AssertionError("an inline worker has no handler pool")


class InlineEngine(Engine):
    """An :class:`Engine` whose I/O thread calls the (sync) handler itself: accepted requests
    wait in a local FIFO that runs after each wake-up's events (``_after_events``)."""

    def __init__(self, *, handler: Callable[[Any], Any], instance_id: str, **engine: Any) -> None:
        super().__init__(runner_factory=lambda post: _NoThreads(post, instance_id), **engine)
        self._handler = handler
        self._instance_id = instance_id
        self._queue: deque[Job] = deque()
        self._in_handler = False
        self._ident = -1  # the loop's thread

    def request_stop(self, force: bool = False) -> None:
        super().request_stop(force)
        # A signal handler runs in the main thread: when that thread is inside a handler, a
        # forced stop leaves the handler now (see _run_queue) instead of after it returns.
        if force and self._in_handler and threading.get_ident() == self._ident:
            self._in_handler = False
            raise Abandon

    def _loop(self) -> None:
        self._ident = threading.get_ident()
        super()._loop()

    def _accept(self, job: Job, now: float) -> None:
        self.running += 1  # queued counts as running: status() and the tests see what is held
        self._queue.append(job)

    def _after_events(self, now: float) -> float:
        return self._run_queue(now) if self._queue else now

    def _run_queue(self, now: float) -> float:
        """Run the queued requests in arrival order, replying to each; returns the time after.

        Once a batch has run for ``_REDRAIN`` the sockets are read again between requests (new
        requests join the end of the queue): a request's deadline counts from when it is read,
        and DRAIN acknowledgements or broker heartbeats should not wait for the whole batch."""
        queue = self._queue
        handler = self._handler
        instance_id = self._instance_id
        runnable = self._runnable
        reply = self._reply
        monotonic = time.monotonic
        drained = now
        while queue:
            if now - drained >= _REDRAIN:
                drained = now
                for conn in list(self.conns):
                    if conn.sock is not None:
                        self._on_broker(conn, conn.sock, now)
            if self._force or (self.stopping and now >= self.stop_deadline):
                break  # forced, or out of drain time: the connections are finished unanswered
            job = queue.popleft()
            self.running -= 1
            if not runnable(job, now):
                continue
            try:
                self._in_handler = True  # inside the try: a forced stop may land right after
                header, payload = respond(job, handler, instance_id)
            except Abandon:
                log.warning("stopping without waiting: request %d abandoned", job.rid)
                return monotonic()
            finally:
                self._in_handler = False
            now = monotonic()
            reply(job, header, payload, now)
        return now
