"""The request path, once: a :class:`Job` in, :func:`respond` (decode → call → encode) and a
reply out; and who runs it off the I/O thread: a thread pool for sync handlers, an asyncio loop
for async ones (the inline engine runs :func:`respond` on the I/O thread itself).

The I/O thread hands each request over as a :class:`Job`; a runner calls the handler with the
decoded payload and hands the reply back through ``post`` (the engine's
:meth:`~worker._engine.Engine.post`: a deque append, plus a wake-up byte only when the I/O thread
is not already due to look) as an :data:`Answer` ``(job, reply header, payload)``. No zmq socket
is touched off the I/O thread: the job only carries its connection back to it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from zrouter.errors import ProtocolError
from zrouter.protocol import (
    FLAG_MSGPACK,
    STATUS_BAD_REQUEST,
    STATUS_OK,
    STATUS_REMOTE_ERROR,
    STATUS_TIMEOUT,
    decode_payload,
    encode_payload,
)
from zrouter._speedups import encode_reply  # compiled when built, else zrouter.protocol's

from ._context import _current

if TYPE_CHECKING:
    import zmq

    from ._connection import BrokerConnection

__all__ = ["Abandon", "Answer", "AsyncRunner", "Job", "Runner", "SyncPool", "respond", "respond_async", "timeout_reply"]

log = logging.getLogger("zrouter.worker")

_EMPTY: Final = b""


class Job(NamedTuple):
    """One REQUEST the I/O thread accepted: where its reply goes, and what the handler gets.

    ``deadline`` is on the :func:`time.monotonic` clock (the broker's remaining timeout added to
    the moment the request was read). The reply is sent only while ``conn`` is still at
    ``generation``: a reconnect means the broker has already requeued the request elsewhere.
    """

    conn: BrokerConnection
    generation: int
    rid: int
    service: str
    attempt: int
    deadline: float
    flags: int
    frame: zmq.Frame | None  # the payload frame (None: the broker sent none)


Answer = tuple[Job, bytes, Any]
"""A runner's result for the I/O thread: (job, reply header, payload frame)."""


class Abandon(BaseException):
    """Raised into a running handler to give its request up unanswered (a forced stop):
    :func:`respond` lets it out instead of turning it into a remote-error reply."""


class _BadPayload(Exception):
    """The request's payload does not decode (``error`` says why): the sender's fault."""

    def __init__(self, error: ProtocolError) -> None:
        super().__init__(str(error))
        self.error = error


def _argument(job: Job) -> Any:
    """What the handler is called with: the payload, decoded. Raises :class:`_BadPayload`."""
    frame = job.frame
    try:
        return decode_payload(job.flags, _EMPTY if frame is None else frame.bytes)
    except ProtocolError as exc:
        raise _BadPayload(exc) from None


def _error_reply(rid: int, status: int, exc: BaseException) -> tuple[bytes, Any]:
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not lose the reply
        message = repr(type(exc))
    return encode_reply(rid, status, 0, message, type(exc).__name__), _EMPTY


def _result_reply(rid: int, result: Any) -> tuple[bytes, Any]:
    try:
        flags, frame = encode_payload(result)
    except Exception as exc:  # the result does not serialise: the handler's fault
        return _error_reply(rid, STATUS_REMOTE_ERROR, exc)
    return encode_reply(rid, STATUS_OK, flags), frame


def _failure_reply(rid: int, exc: BaseException) -> tuple[bytes, Any]:
    """BAD_REQUEST when the payload did not decode, else REMOTE_ERROR: the handler raised."""
    if type(exc) is _BadPayload:
        return _error_reply(rid, STATUS_BAD_REQUEST, exc.error)
    log.debug("handler raised for request %d", rid, exc_info=True)
    return _error_reply(rid, STATUS_REMOTE_ERROR, exc)


def timeout_reply(rid: int) -> tuple[bytes, Any]:
    """The reply to a request whose deadline passed before a handler could take it."""
    return encode_reply(rid, STATUS_TIMEOUT, 0, "deadline passed while queued in the worker"), _EMPTY


def respond(job: Job, handler: Callable[[Any], Any], instance_id: str) -> tuple[bytes, Any]:
    """The request path for a sync handler: decode the payload, call ``handler`` with
    :func:`~worker.current_request` set, encode the result. Returns (reply header, payload).

    Every failure is a reply: an undecodable payload BAD_REQUEST, anything the handler raises
    (``BaseException`` too: the worker must go on) or a result that does not encode
    REMOTE_ERROR. Only :class:`Abandon` propagates."""
    token = _current.set((job.rid, job.service, job.attempt, job.deadline, instance_id))
    try:
        if job.flags & FLAG_MSGPACK:
            arg = _argument(job)
        else:  # _argument's raw case, without its two calls
            frame = job.frame
            arg = _EMPTY if frame is None else frame.bytes
        result = handler(arg)
        if type(result) is bytes:  # _result_reply's raw case
            return encode_reply(job.rid, STATUS_OK, 0), result
        return _result_reply(job.rid, result)
    except Abandon:
        raise
    except BaseException as exc:
        return _failure_reply(job.rid, exc)
    finally:
        _current.reset(token)


async def respond_async(job: Job, handler: Callable[[Any], Awaitable[Any]], instance_id: str) -> tuple[bytes, Any]:
    """:func:`respond` for a coroutine handler, in the task that awaits it."""
    _current.set((job.rid, job.service, job.attempt, job.deadline, instance_id))  # task-local
    try:
        return _result_reply(job.rid, await handler(_argument(job)))
    except BaseException as exc:
        return _failure_reply(job.rid, exc)


class Runner:
    """What the I/O thread needs of a handler runner."""

    def __init__(self, post: Callable[[Answer], None], instance_id: str) -> None:
        self._post = post
        self._instance_id = instance_id

    def start(self) -> None:
        raise NotImplementedError

    # Hand a job over (called from the I/O thread only); an attribute, so it can be a bound
    # C method such as SimpleQueue.put.
    submit: Callable[[Job], None]

    def shutdown(self, deadline: float) -> bool:
        """Finish queued jobs until ``deadline`` (monotonic); True when every thread has ended."""
        raise NotImplementedError


class SyncPool(Runner):
    """``size`` threads taking jobs from one queue."""

    def __init__(
        self, post: Callable[[Answer], None], instance_id: str, handler: Callable[[Any], Any], size: int, name: str
    ) -> None:
        super().__init__(post, instance_id)
        self._handler = handler
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.submit = self._queue.put  # hot path: no extra Python call per job
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-handler-{i}", daemon=True) for i in range(size)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _serve(self) -> None:
        get = self._queue.get
        post = self._post
        handler = self._handler
        instance_id = self._instance_id
        while True:
            job = get()
            if job is None:
                return
            header, payload = respond(job, handler, instance_id)
            post((job, header, payload))

    def shutdown(self, deadline: float) -> bool:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)


class AsyncRunner(Runner):
    """One asyncio loop in its own thread; every job is a task."""

    def __init__(
        self, post: Callable[[Answer], None], instance_id: str, handler: Callable[[Any], Awaitable[Any]], name: str
    ) -> None:
        super().__init__(post, instance_id)
        self._handler = handler
        self._loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"{name}-asyncio", daemon=True)
        self.submit = self._submit

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def _submit(self, job: Job) -> None:
        self._loop.call_soon_threadsafe(self._spawn, job)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def _spawn(self, job: Job) -> None:
        task = self._loop.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, job: Job) -> None:
        header, payload = await respond_async(job, self._handler, self._instance_id)
        self._post((job, header, payload))

    async def _finish(self, deadline: float) -> None:
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        self._loop.stop()

    def shutdown(self, deadline: float) -> bool:
        if not self._thread.is_alive():
            return True
        asyncio.run_coroutine_threadsafe(self._finish(deadline), self._loop)
        self._thread.join(max(0.0, deadline - time.monotonic()) + 2.0)
        return not self._thread.is_alive()
