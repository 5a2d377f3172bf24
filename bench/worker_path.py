"""The worker's own cost per request, without the broker, the client or a second thread.

    python -m bench.worker_path [--rounds N] [--only inline|pool]

One process, one thread, inproc sockets: a ROUTER here queues ``BATCH`` REQUESTs (100-byte raw
payloads) on a worker engine's DEALER, then the engine's own methods take them through the
request path as its I/O thread would: read and decode, make the job, decode the payload, call
the echo handler, encode, send the reply. ``inline`` times the inline engine (read, then run the
queue); ``pool`` times the pool engine's read, the pool's per-job work (run here, in this thread,
so no thread hand-off is timed) and the replies going out. Prints the best round of ``--rounds``
in µs per request: the best, because on a shared machine every other round has someone else's
work in it. A figure for comparing two versions of the worker run one after the other, not a
throughput: the full picture is ``python -m bench --only throughput``.

Timings on a shared machine swing; for a repeatable figure count instructions instead, and
divide the difference by the extra requests (10 rounds x 500 = 5,000):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.worker_path --only inline --rounds 12
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.worker_path --only inline --rounds 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from zrouter import protocol as p
from zrouter.worker._engine import Engine
from zrouter.worker._handlers import SyncPool
from zrouter.worker._inline import InlineEngine
from zrouter.worker.examples import echo

BATCH = 500  # requests per round: under the sockets' default high-water mark of 1,000
ENDPOINT = "inproc://bench-worker-path"
SETTINGS: dict[str, Any] = {
    "service": "echo", "capacity": BATCH, "weight": 1, "heartbeat_interval": 100.0, "liveness": 3, "meta": {},
    "drain_timeout": 1.0, "brokers": [ENDPOINT],
}  # fmt: skip


class Bench:
    """A ROUTER in this thread connected to ``engine``'s one broker connection."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(ENDPOINT)
        engine._ctx = self.ctx
        self.conn = engine.conns[0]
        engine._open(self.conn, time.monotonic())
        self.peer = self.router.recv_multipart()[0]  # READY
        self.sent = 0

    def feed(self) -> zmq.Socket[Any]:
        """Queue a batch of REQUESTs on the engine's socket; returns that socket once they are in."""
        payload = b"x" * 100
        for _ in range(BATCH):
            self.sent += 1
            header = p.encode_request(self.sent, "echo", 10_000, 0, 0)
            self.router.send_multipart([self.peer, p.SIGNATURE, header, payload])
        sock = self.conn.sock
        assert sock is not None and sock.poll(1000)
        time.sleep(0.005)  # let the whole batch cross the inproc pipe before timing
        return sock

    def replies(self) -> int:
        n = 0
        while self.router.poll(0):
            if msgpack.unpackb(self.router.recv_multipart()[2])[0] == p.REPLY:
                n += 1
        return n

    def close(self) -> None:
        self.router.close(0)
        self.conn.close(0)
        self.ctx.term()


def inline_round(bench: Bench) -> float:
    engine = bench.engine
    assert isinstance(engine, InlineEngine)
    sock = bench.feed()
    t0 = time.perf_counter()
    now = time.monotonic()
    while engine._queue or sock.poll(0):
        engine._on_broker(bench.conn, sock, now)
        now = engine._run_queue(now)
    elapsed = time.perf_counter() - t0
    assert bench.replies() == BATCH
    return elapsed / BATCH


def pool_round(bench: Bench, pool: SyncPool) -> float:
    engine = bench.engine
    sock = bench.feed()
    t0 = time.perf_counter()
    now = time.monotonic()
    while sock.poll(0):
        engine._on_broker(bench.conn, sock, now)
    pool._queue.put(None)  # the pool's loop (run here) ends after the batch
    pool._serve()
    engine._on_replies(now)
    elapsed = time.perf_counter() - t0
    assert bench.replies() == BATCH
    return elapsed / BATCH


def best(rounds: int, one: Callable[[], float]) -> float:
    return min(one() for _ in range(rounds))


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--rounds", type=int, default=60, help=f"rounds of {BATCH} requests each")
    args.add_argument("--only", choices=("inline", "pool"), help="time one engine only")
    opts = args.parse_args()
    rounds = opts.rounds
    figures = []
    if opts.only != "pool":
        inline = Bench(InlineEngine(handler=echo, instance_id="bench", **SETTINGS))
        try:
            figures.append(f"inline {best(rounds, lambda: inline_round(inline)) * 1e6:.2f} µs/request")
        finally:
            inline.close()
    if opts.only != "inline":
        engine = Engine(runner_factory=lambda post: SyncPool(post, "bench", echo, 1, "bench"), **SETTINGS)
        pool = SyncPool(engine.post, "bench", echo, 1, "bench")
        engine._submit = pool._queue.put
        bench = Bench(engine)
        try:
            figures.append(f"pool {best(rounds, lambda: pool_round(bench, pool)) * 1e6:.2f} µs/request")
        finally:
            bench.close()
    print(f"worker request path, best of {rounds} x {BATCH}: {', '.join(figures)} "
          "(read + job + handler + reply, one thread)")


if __name__ == "__main__":
    main()
