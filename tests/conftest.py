"""Fixtures every test module may use: processes (``procs``), a zmq context (``ctx``), the
scripted stand-ins for a broker from tests/helpers.py and started workers on them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from tests.helpers import HB, ScriptedBackend, ScriptedFrontend
from tests.procs import ProcessGroup
from zrouter.worker import Worker

pytest_plugins = ["tests.consul_agent"]


@pytest.fixture
def procs() -> Iterator[ProcessGroup]:
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.stop_all()


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    c: zmq.Context[Any] = zmq.Context()
    yield c
    c.destroy(linger=0)  # everything should be closed already; this only keeps a failure local


@pytest.fixture
def make_backend(ctx: zmq.Context[Any]) -> Iterator[Callable[..., ScriptedBackend]]:
    """Scripted broker back ends (``make_backend(endpoint=None)``), closed at teardown."""
    made: list[ScriptedBackend] = []

    def make(endpoint: str | None = None) -> ScriptedBackend:
        made.append(ScriptedBackend(ctx, endpoint=endpoint))
        return made[-1]

    yield make
    for b in made:
        b.close()


@pytest.fixture
def backend(make_backend: Callable[[], ScriptedBackend]) -> ScriptedBackend:
    return make_backend()


@pytest.fixture
def make_worker(make_backend: Callable[[], ScriptedBackend]) -> Iterator[Callable[..., Worker]]:
    """Started workers for service "svc" (``make_worker(handler, broker, **options)``, with a
    fast heartbeat by default); stopped (drained) before the back ends close."""
    workers: list[Worker] = []

    def make(handler: Callable[[Any], Any], broker: Any, **kw: Any) -> Worker:
        kw.setdefault("heartbeat_interval", HB)
        kw.setdefault("liveness", 5)
        kw.setdefault("drain_timeout", 3.0)
        w = Worker("svc", handler, broker=broker, **kw)
        w.start()
        workers.append(w)
        return w

    yield make
    for w in workers:
        assert w.stop(timeout=10.0)


@pytest.fixture
def make_frontend(ctx: zmq.Context[Any]) -> Iterator[Callable[..., ScriptedFrontend]]:
    """Scripted broker front ends (``make_frontend(hold=False, start_after=0.0)``), closed at
    teardown."""
    made: list[ScriptedFrontend] = []

    def make(**kwargs: Any) -> ScriptedFrontend:
        made.append(ScriptedFrontend(ctx, **kwargs))
        return made[-1]

    yield make
    for b in made:
        b.close()


@pytest.fixture
def frontend(make_frontend: Callable[..., ScriptedFrontend]) -> ScriptedFrontend:
    return make_frontend()
