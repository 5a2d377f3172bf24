"""Worker handlers for the benchmarks (``python -m zrouter.worker ... bench.handlers:NAME``).

The service time comes from the environment (``BENCH_SERVICE_MS``), so one handler serves fast
and slow workers alike; ``BENCH_ROLE`` (e.g. "fast", "slow") is echoed back in every reply,
with the worker's instance id and the request's attempt number.

- :func:`serial`: a single-server worker. Requests are served one after another, FIFO, for
  ``BENCH_SERVICE_MS`` each; the rest of the worker's credits wait in line inside the worker, as
  they would behind a CPU-bound handler. A slow worker holding many credits therefore makes its
  requests wait: exactly what a load-aware policy should avoid. The server is virtual: each
  request's completion time is fixed when it arrives (``max(now, previous completion) +
  service``) and the handler sleeps until then, so a late timer wake-up delays that one reply
  but never shrinks the worker's capacity (chained sleeps would add every overshoot to it).
- :func:`attempt`: sleeps ``BENCH_SERVICE_MS`` (requests in parallel, up to the capacity); the
  reply's attempt number lets the failover section tell requeued requests from first tries.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from zrouter.worker import current_request

__all__ = ["attempt", "serial"]

_SERVICE_S = float(os.environ.get("BENCH_SERVICE_MS", "1")) / 1000.0
_ROLE = os.environ.get("BENCH_ROLE", "worker")
_free_at = 0.0  # serial(): when the virtual server finishes what it already holds


def _who() -> dict[str, Any]:
    info = current_request()
    return {
        "attempt": info.attempt if info is not None else -1,
        "worker": f"{_ROLE}:{info.instance_id if info is not None else os.getpid()}",
    }


async def serial(payload: Any) -> dict[str, Any]:
    global _free_at
    now = asyncio.get_running_loop().time()
    _free_at = max(now, _free_at) + _SERVICE_S
    await asyncio.sleep(_free_at - now)
    return _who()


async def attempt(payload: Any) -> dict[str, Any]:
    await asyncio.sleep(_SERVICE_S)
    return _who()
