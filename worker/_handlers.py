"""Running handlers off the I/O thread: a thread pool for sync handlers, an asyncio loop for async.

The I/O thread hands each request over as a :data:`Job` tuple; the runner calls the handler
with the decoded payload and hands the reply back through ``post`` (the engine's
:meth:`~worker._engine.Engine.post`: a deque append, plus a wake-up byte only when the I/O thread
is not already due to look) as a :data:`Reply` ``(ticket, reply header, payload)``. No zmq socket
is touched off the I/O thread. The I/O thread maps the ticket back to the broker connection
that sent the request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from zrouter.errors import ProtocolError
from zrouter.protocol import (
    STATUS_BAD_REQUEST,
    STATUS_OK,
    STATUS_REMOTE_ERROR,
    decode_payload,
    encode_payload,
)
from zrouter._speedups import encode_reply  # compiled when built, else zrouter.protocol's

from ._context import RequestInfo, _current

__all__ = ["AsyncRunner", "Job", "Reply", "Runner", "SyncPool"]

log = logging.getLogger("zrouter.worker")

# (ticket, rid, service, attempt, deadline, flags, payload frame or None)
Job = tuple[int, int, str, int, float, int, Any]
# (ticket, reply header, payload)
Reply = tuple[int, bytes, Any]

_EMPTY: Final = b""


def _error_reply(rid: int, status: int, exc: BaseException) -> tuple[bytes, Any]:
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not lose the reply
        message = repr(type(exc))
    return encode_reply(rid, status, 0, message, type(exc).__name__), _EMPTY


def _reply(rid: int, result: Any) -> tuple[bytes, Any]:
    try:
        flags, frame = encode_payload(result)
    except Exception as exc:  # the result does not serialise: the handler's fault
        return _error_reply(rid, STATUS_REMOTE_ERROR, exc)
    return encode_reply(rid, STATUS_OK, flags), frame


def _decode(job: Job) -> Any:
    frame = job[6]
    return decode_payload(job[5], _EMPTY if frame is None else frame.bytes)


class Runner:
    """What the I/O thread needs of a handler runner."""

    def __init__(self, post: Callable[[Reply], None], instance_id: str) -> None:
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
    """``size`` threads taking jobs from one queue; each owns its PUSH socket."""

    def __init__(
        self, post: Callable[[Reply], None], instance_id: str, handler: Callable[[Any], Any], size: int, name: str
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
            rid = job[1]
            token = _current.set(RequestInfo(rid, job[2], job[3], job[4], instance_id))
            try:
                arg = _decode(job)
            except ProtocolError as exc:
                header, payload = _error_reply(rid, STATUS_BAD_REQUEST, exc)
            else:
                try:
                    header, payload = _reply(rid, handler(arg))
                except BaseException as exc:
                    log.debug("handler raised for request %d", rid, exc_info=True)
                    header, payload = _error_reply(rid, STATUS_REMOTE_ERROR, exc)
            finally:
                _current.reset(token)
            post((job[0], header, payload))

    def shutdown(self, deadline: float) -> bool:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)


class AsyncRunner(Runner):
    """One asyncio loop in its own thread; every job is a task."""

    def __init__(
        self, post: Callable[[Reply], None], instance_id: str, handler: Callable[[Any], Awaitable[Any]], name: str
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
        rid = job[1]
        _current.set(RequestInfo(rid, job[2], job[3], job[4], self._instance_id))  # task-local
        try:
            arg = _decode(job)
        except ProtocolError as exc:
            header, payload = _error_reply(rid, STATUS_BAD_REQUEST, exc)
        else:
            try:
                header, payload = _reply(rid, await self._handler(arg))
            except BaseException as exc:
                log.debug("handler raised for request %d", rid, exc_info=True)
                header, payload = _error_reply(rid, STATUS_REMOTE_ERROR, exc)
        self._post((job[0], header, payload))

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
