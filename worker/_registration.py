"""The hook for service registration (Consul, written elsewhere): calls it safely, off the hot path.

The worker calls ``register()`` when it starts, ``pass_ttl(note)`` once per heartbeat interval
while its I/O loop is healthy, and ``deregister()`` on a clean exit. The calls run in a small
thread of their own (never a handler thread, never the I/O thread: a slow HTTP call must not
delay replies or heartbeats). Exceptions are logged, never fatal.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["Registration", "RegistrationTicker"]

log = logging.getLogger("zrouter.worker")


@runtime_checkable
class Registration(Protocol):
    """What the worker calls on the ``registration`` object it is given."""

    def register(self) -> None: ...

    def pass_ttl(self, note: str = "") -> None: ...

    def deregister(self) -> None: ...


class RegistrationTicker:
    """Runs ``pass_ttl`` on the heartbeat cadence while ``status()`` says the worker is healthy."""

    def __init__(
        self, registration: object, interval: float, status: Callable[[], tuple[bool, str]], name: str
    ) -> None:
        self._registration = registration
        self._interval = interval
        self._status = status
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name=f"{name}-registration", daemon=True)

    def _call(self, method: str, *args: str) -> None:
        fn = getattr(self._registration, method, None)
        if fn is None:
            log.warning("registration object has no %s()", method)
            return
        try:
            fn(*args)
        except Exception:
            log.warning("registration %s() failed", method, exc_info=True)

    def start(self) -> None:
        self._thread.start()

    def _tick(self) -> None:
        # register() here, not in start(): start() runs on the worker's I/O thread, and a Consul
        # agent that is slow to answer must not hold up the first broker connection.
        self._call("register")
        # First pass at once (a TTL check starts critical), then once per interval.
        while True:
            healthy, note = self._status()
            if healthy:
                self._call("pass_ttl", note)
            if self._stop.wait(self._interval):
                return

    def stop(self, deregister: bool) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self._interval + 5.0)
        if deregister:
            self._call("deregister")
