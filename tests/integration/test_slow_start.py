"""Slow start end to end: a real broker started with ``--slow-start``, real worker processes."""

from __future__ import annotations

import collections
import re
import time

import pytest

from tests.procs import ProcessGroup
from zrouter.client import Client

pytestmark = pytest.mark.timeout(60)


def test_a_worker_joining_an_established_service_starts_with_one_credit(procs: ProcessGroup) -> None:
    """Two workers of capacity 4, 0.5 s a request, and 8 requests at once: least-outstanding
    would send each 4. The second joined an established service, so for the first half of its
    30 s window it has one credit: it serves at most 2 of the 8 (one, then one more when its
    first reply frees the credit), the first worker the rest."""
    broker = procs.broker("--slow-start", "30", "--service-slow-start", "other=0")
    procs.worker(broker, capacity=4, delay=0.5)
    broker.wait_workers(1)
    # Workers that join within the broker's liveness timeout of the service's appearance are not
    # slowed (they may be all the workers of a restarted broker): wait that out, it is the condition.
    time.sleep(3 * broker.heartbeat + 0.1)
    procs.worker(broker, capacity=4, delay=0.5)
    broker.wait_for(r"joined service 'svc' .*slow start over 30s")
    [line] = [ln for ln in broker.lines if "slow start over" in ln]
    match = re.search(r"worker (\S+) joined", line)
    assert match is not None
    newcomer = match.group(1)
    with Client(broker.frontend, timeout=20) as client:
        answers = [f.result() for f in [client.submit("svc", i) for i in range(8)]]
    served = collections.Counter(str(a["worker"]) for a in answers)
    assert sum(served.values()) == 8
    assert 1 <= served[newcomer] <= 2, served
