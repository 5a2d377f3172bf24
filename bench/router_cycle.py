"""The broker's routing alone, in process: ``python -m bench.router_cycle``.

Times one request cycle (a REQUEST accepted and dispatched, a REPLY settled and answered)
through the calls the broker's drain loops make: the compiled routing
(zrouter/_native/route.pyx, via ``zrouter.broker.router.routes``) and the reference methods
(``Router.request``, ``Router.worker_reply``), in the same process, alternating, on the same kind
of state: 2 workers x 50 credits, 100 requests in flight, least-outstanding, a sink that keeps
nothing. Under ``ZROUTER_PURE=1`` both columns are the reference. Prints µs per cycle (median of
the rounds); no sockets, so it measures the routing, not libzmq.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from zrouter import _speedups, protocol
from zrouter.broker.router import Router, routes

__all__ = ["main", "measure"]

IN_FLIGHT = 100
CAPACITY = 50


class _Sink:
    def __init__(self) -> None:
        self.dispatched: deque[tuple[bytes, int]] = deque()

    def to_worker(self, ident: bytes, header: bytes, payload: Any) -> bool:
        self.dispatched.append((ident, protocol.decode_request(header).rid))
        return True

    def to_client(self, client: bytes, header: bytes, payload: Any) -> None:
        pass


def measure(compiled: bool, cycles: int, policy: str = "least-outstanding") -> float:
    """µs per request cycle through the compiled routing (``compiled``) or the reference."""
    sink = _Sink()
    router = Router(sink, default_policy=policy, rng=random.Random(1))

    def on_reply(ident: bytes, rid: int, status: int, flags: int, message: str | None, error_type: str | None,
                 payload: Any, now: float) -> None:
        w = router.workers[ident]
        w.last_seen = now
        router.worker_reply(w, rid, status, flags, message, error_type, payload, now)

    request: Callable[..., None] = router.request
    reply: Callable[..., None] = on_reply
    found = routes(router, on_reply) if compiled else None
    if found is not None:
        request, reply = found
    now = 1.0
    for i in range(2):
        router.worker_ready(b"w%d" % i, protocol.Ready("echo", CAPACITY, 1, {"instance": f"w{i}"}), now)
    payload = b"x" * 100
    crid = 0
    for crid in range(1, IN_FLIGHT + 1):
        request(b"c", crid, "echo", 5000, 0, protocol.FLAG_IDEMPOTENT, None, payload, now)
    pop = sink.dispatched.popleft
    t0 = time.perf_counter()
    for _ in range(cycles):
        ident, rid = pop()
        reply(ident, rid, protocol.STATUS_OK, 0, None, None, payload, now)
        crid += 1
        request(b"c", crid, "echo", 5000, 0, protocol.FLAG_IDEMPOTENT, None, payload, now)
        now += 1e-5
    return (time.perf_counter() - t0) / cycles * 1e6


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.router_cycle", description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=100_000, help="request cycles per measurement (default 100,000)")
    p.add_argument("--rounds", type=int, default=5,
                   help="measurements of each, alternating; the median is printed (default 5)")
    p.add_argument("--policy", default="least-outstanding", help="the service's dispatch policy")
    args = p.parse_args(argv)
    ref: list[float] = []
    twin: list[float] = []
    for _ in range(args.rounds):  # alternating, so load on the machine hits both alike
        ref.append(measure(False, args.cycles, args.policy))
        twin.append(measure(True, args.cycles, args.policy))
    path = ("columns: the reference methods (router.py), then the compiled twins (route.pyx)" if _speedups.native()
            else "pure path (ZROUTER_PURE=1 or not built): both columns are the reference")
    print(f"routing µs per request cycle, median of {args.rounds} ({args.policy}, {IN_FLIGHT} in flight; {path}; "
          f"includes ~0.5 µs of this loop's own decode)")
    print(f"reference {statistics.median(ref):.2f}   compiled routing {statistics.median(twin):.2f}")


if __name__ == "__main__":
    main()
