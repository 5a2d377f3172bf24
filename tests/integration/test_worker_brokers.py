"""One worker, several real broker processes, all under load, while brokers are added, dropped,
killed and restarted: together they never send the worker more than its capacity."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest

from tests.helpers import eventually
from tests.procs import BrokerProc, ProcessGroup
from zrouter.client import Client
from zrouter.worker import Worker

pytestmark = pytest.mark.timeout(120)

CAPACITY = 4


def _load(broker: BrokerProc, stop: threading.Event, answered: list[int]) -> None:
    """Keep 2 x CAPACITY requests waiting at ``broker``; errors (a broker left without the
    worker answers UNAVAILABLE, a killed one times out) are expected and not counted."""
    with Client(broker.frontend, timeout=3) as client:
        while not stop.is_set():
            results = client.map("svc", range(2 * CAPACITY), return_exceptions=True)
            answered[0] += sum(1 for r in results if not isinstance(r, BaseException))


def test_adding_and_removing_brokers_under_load_never_overfills_the_worker(procs: ProcessGroup) -> None:
    brokers = [procs.broker(heartbeat=0.1) for _ in range(3)]
    lock = threading.Lock()
    running = [0, 0]  # handlers running now, most ever
    served = [0]

    def handler(payload: Any) -> Any:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
            served[0] += 1
        return payload

    worker = Worker("svc", handler, broker=brokers[0].backend, capacity=CAPACITY, heartbeat_interval=0.1)
    worker.start()
    stop = threading.Event()
    answered = [[0] for _ in brokers]
    loads = [threading.Thread(target=_load, args=(b, stop, a), daemon=True) for b, a in zip(brokers, answered, strict=True)]
    for t in loads:
        t.start()
    rng = random.Random(8)
    try:
        brokers[0].wait_workers(1)
        for step in range(14):
            if step == 7:  # one broker dies outright and comes back: the worker reconnects
                brokers[1].kill()
                brokers[1].restart()
            else:
                listed = [b for b in brokers if rng.random() < 0.7] or [brokers[step % 3]]
                worker.set_brokers([b.backend for b in listed])
            mark = served[0]
            eventually(lambda mark=mark: served[0] >= mark + 40, timeout=20, what="requests served")  # type: ignore[misc]
    finally:
        stop.set()
        for t in loads:
            t.join(15)
        assert worker.stop(timeout=10.0)
    engine = worker._engine
    assert engine.overfilled == 0, f"{engine.overfilled} requests arrived beyond the capacity"
    assert running[1] == CAPACITY  # full all along, never more
    assert sum(a[0] for a in answered) >= 500
