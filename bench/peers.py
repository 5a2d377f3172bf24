"""The systems zrouter is compared with, as separate processes like zrouter's own.

``zmq.proxy`` baseline (the C floor of a ZeroMQ broker):
    python -m bench.peers proxy-broker --frontend EP --backend EP   zmq.proxy(ROUTER, DEALER)
    python -m bench.peers rep-worker --connect EP                   raw pyzmq REP echo
    client: a raw DEALER sending [b"", payload] (see :func:`proxy_pipe`, :func:`proxy_sync`)

majortomo 0.2 (MDP/0.2, a pure-Python Majordomo broker from PyPI, optional ``bench`` extra):
    python -m bench.peers mdp-broker --bind EP                      majortomo.broker.Broker
    python -m bench.peers mdp-worker --connect EP --service echo    majortomo.Worker echo loop
    client: majortomo.Client (one request at a time each; 100 of them for 100 in flight)

Every server prints a line on stderr when it is listening and when a peer has joined, so the
harness waits on those instead of sleeping. The majortomo broker runs with logging at WARNING:
its INFO level logs every request (its own default config), which would measure the logger.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import zmq

from bench.harness import Cluster, Proc, free_tcp_endpoint, progress, start_zrouter

__all__ = [
    "SYSTEMS",
    "PeerSystem",
    "System",
    "majortomo_available",
    "mdp_pipe",
    "mdp_sync",
    "proxy_pipe",
    "proxy_sync",
    "start_majortomo",
    "start_proxy",
    "start_python_forwarder",
    "start_systems",
]

SNDMORE: Final = int(zmq.SNDMORE)
SERVICE: Final = b"echo"
SYSTEMS: Final = ("zrouter", "zrouter-pure", "proxy", "majortomo", "nats", "rabbitmq")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def majortomo_available() -> bool:
    try:
        import majortomo  # noqa: F401 - 0.2.0 also needs six, which it imports without declaring
    except ImportError:
        return False
    return True


# -- server processes -------------------------------------------------------------------------


def _watch_backend(back: zmq.Socket[bytes]) -> None:
    """Say "backend peer connected" for each worker that connects (from a thread of its own)."""
    monitor = back.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)

    def watch() -> None:  # the monitor socket is used by this thread only
        while True:
            try:
                monitor.recv_multipart()
            except zmq.ZMQError:
                return
            _say("backend peer connected")

    threading.Thread(target=watch, daemon=True).start()


def _bind_proxy_sockets(frontend: str, backend: str) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    """(ROUTER bound to ``frontend``, DEALER bound to ``backend``), the DEALER watched."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.DEALER)
    front.bind(frontend)
    back.bind(backend)
    _watch_backend(back)
    return front, back


def proxy_broker(frontend: str, backend: str) -> None:
    front, back = _bind_proxy_sockets(frontend, backend)
    _say("proxy listening")
    zmq.proxy(front, back)


def python_forwarder(frontend: str, backend: str, copy: bool) -> None:
    """``zmq.proxy`` written in Python: the reference for what forwarding costs a Python broker
    that never copies a payload (``copy=False``: frames passed on by reference), and what one
    copy of every frame each way adds (``copy=True``). Used by the payload section only."""
    front, back = _bind_proxy_sockets(frontend, backend)
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    noblock = int(zmq.NOBLOCK)
    _say(f"python forwarder listening (copy={copy})")
    while True:
        for src, _ in poller.poll():
            dst = back if src is front else front
            for _ in range(256):
                try:
                    frame = src.recv(noblock, copy=False)
                except zmq.Again:
                    break
                while frame.more:
                    dst.send(frame.bytes if copy else frame, SNDMORE, copy=False)
                    frame = src.recv(0, copy=False)
                dst.send(frame.bytes if copy else frame, 0, copy=False)


def rep_worker(connect: str) -> None:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REP)
    sock.connect(connect)
    recv, send = sock.recv, sock.send
    while True:
        send(recv(0, copy=False), 0, copy=False)


def mdp_broker(bind: str) -> None:
    from majortomo.broker import Broker

    logging.basicConfig(level=logging.WARNING)

    class ReadyBroker(Broker):
        """majortomo's Broker, saying when a worker is READY (for the harness only)."""

        def _handle_worker_ready(self, worker_id: bytes, service: bytes) -> None:
            super()._handle_worker_ready(worker_id, service)
            _say("worker ready")

    broker: Any = ReadyBroker(bind=bind)
    _say("mdp broker listening")
    broker.run()


def mdp_worker(connect: str, service: str) -> None:
    from majortomo import Worker

    logging.basicConfig(level=logging.WARNING)
    worker = Worker(connect, service)
    worker.connect()
    while True:
        client, frames = worker.wait_for_request()
        worker.send_reply_final(client, frames)


# -- starting them ----------------------------------------------------------------------------


class PeerSystem:
    """A running baseline: its broker, its workers, and where a client connects."""

    def __init__(self, endpoint: str, broker: Proc, workers: list[Proc]) -> None:
        self.endpoint = endpoint
        self.broker = broker
        self.workers = workers


def start_proxy(cluster: Cluster, workers: int = 2, timeout: float = 30.0) -> PeerSystem:
    front, back = free_tcp_endpoint(), free_tcp_endpoint()
    broker = cluster.spawn("zmq.proxy broker", ["-m", "bench.peers", "proxy-broker", "--frontend", front, "--backend", back])
    broker.wait_for("proxy listening", timeout=timeout)
    procs = [cluster.spawn(f"REP worker {i}", ["-m", "bench.peers", "rep-worker", "--connect", back]) for i in range(workers)]
    broker.wait_for("backend peer connected", workers, timeout=timeout)
    return PeerSystem(front, broker, procs)


def start_python_forwarder(cluster: Cluster, copy: bool, workers: int = 2, timeout: float = 30.0) -> PeerSystem:
    front, back = free_tcp_endpoint(), free_tcp_endpoint()
    broker = cluster.spawn("python forwarder", ["-m", "bench.peers", "py-forwarder", "--frontend", front,
                                                "--backend", back, *(["--copy"] if copy else [])])
    broker.wait_for("python forwarder listening", timeout=timeout)
    procs = [cluster.spawn(f"REP worker {i}", ["-m", "bench.peers", "rep-worker", "--connect", back]) for i in range(workers)]
    broker.wait_for("backend peer connected", workers, timeout=timeout)
    return PeerSystem(front, broker, procs)


def start_majortomo(cluster: Cluster, workers: int = 2, timeout: float = 30.0) -> PeerSystem:
    ep = free_tcp_endpoint()
    broker = cluster.spawn("majortomo broker", ["-m", "bench.peers", "mdp-broker", "--bind", ep])
    broker.wait_for("mdp broker listening", timeout=timeout)
    procs = [
        cluster.spawn(f"majortomo worker {i}", ["-m", "bench.peers", "mdp-worker", "--connect", ep, "--service", "echo"])
        for i in range(workers)
    ]
    broker.wait_for("worker ready", workers, timeout=timeout)
    return PeerSystem(ep, broker, procs)


# Set from python -m bench --worker-pool to measure the thread-pool worker instead.
ZROUTER_WORKER_ARGS: list[str] = ["--inline"]

System = Any  # ZrouterSystem | PeerSystem: both have .endpoint, .broker and .workers


def start_systems(cluster: Cluster, workers: int = 2, capacity: int = 50, others: bool = True) -> dict[str, System]:
    """Every system side by side (idle ones cost nothing measurable), each with ``workers`` echo
    workers: zrouter on its compiled path and on its pure-Python one (ZROUTER_PURE=1 in every
    process), zmq.proxy, majortomo, NATS and RabbitMQ (bench/mq.py). zrouter's workers get
    ``capacity`` credits each, RabbitMQ's a prefetch of as many. Those not installed are left out.
    ``others`` False: zrouter (compiled), zmq.proxy and majortomo only (the payload section)."""
    from bench.mq import start_all
    from zrouter import _speedups

    # --inline: the echo handler runs on the worker's I/O thread, as the baseline's
    # single-threaded REP workers do; a pool hand-off would measure threads, not routing.
    if not _speedups.native():
        progress(f"warning: zrouter's compiled path is not in use ({_speedups.why_pure()}): both columns are pure")
    systems: dict[str, System] = {
        "zrouter": start_zrouter(cluster, workers, capacity=capacity, worker_args=ZROUTER_WORKER_ARGS),
    }
    if others:
        systems["zrouter-pure"] = start_zrouter(cluster, workers, capacity=capacity, worker_args=ZROUTER_WORKER_ARGS,
                                                env={_speedups.PURE_ENV: "1"})
    systems["proxy"] = start_proxy(cluster, workers)
    if majortomo_available():
        systems["majortomo"] = start_majortomo(cluster, workers)
    else:
        progress("majortomo is not installed (pip install -e '.[bench]'): left out")
    if others:
        systems.update(start_all(cluster, workers, capacity))
    return systems


# -- client drivers (run inside the bench.loadgen process) ------------------------------------

Clock = Callable[[], float]


# A paced run's arrival pattern, stated because a broker's CPU per request depends on it (a
# process woken for every message pays a wake-up per message; one woken for a burst shares it).
# The driver sleeps once it is BURST requests ahead of the schedule, until it is back on it, so
# completions come in bursts of about BURST every BURST / pace seconds. Linux sleeps ~60 µs at
# least, so at 30,000 req/s bursts under ~2 requests cannot be made smoother than that.
BURST = 16


class PipeCounter:
    """Counts completions of a pipelined run: total, and over the measured window only.

    ``pace`` (req/s, 0 for none) holds the run to that rate: :meth:`done` sleeps once the
    completions are ``burst`` requests ahead of the schedule, until they are back on it, so the
    driver's next sends wait (``burst=1``: after every early completion). A driver that falls
    behind (a stall) is never more than ``burst`` requests late on the schedule either: it does
    not catch up with one long burst. Pacing stops with the measured window, so the run's last
    replies drain at once. Raises ValueError for a negative pace or a burst below 1.

    CPU per request depends on the rate and on how bursty the arrivals are, so systems are
    compared on CPU at one paced rate and arrival pattern as well as at their own top speed."""

    def __init__(self, warmup: float, duration: float, clock: Clock = time.perf_counter, pace: float = 0.0,
                 sleep: Callable[[float], None] = time.sleep, burst: int = BURST) -> None:
        if pace < 0 or burst < 1:
            raise ValueError(f"pace must be >= 0 and burst >= 1, not {pace}, {burst}")
        self.clock = clock
        self.sleep = sleep
        self.pace = pace
        self.burst = burst
        self.start = clock()
        self.measure_from = self.start + warmup
        self.stop_at = self.measure_from + duration
        self.total = 0
        # The schedule: completion number base_n is due at base_t, then one every 1 / pace s.
        # Counted from a base rather than summed, so no rounding error builds up.
        self.base_n, self.base_t = 0, self.start
        self.at_window_start: tuple[int, float] | None = None
        self.at_window_end: tuple[int, float] | None = None

    def done(self, n: int = 1) -> bool:
        """Record ``n`` completions; True once the run should stop sending."""
        self.total += n
        now = self.clock()
        if self.pace and self.at_window_end is None:
            due = self.base_t + (self.total - self.base_n) / self.pace
            if (due - now) * self.pace > self.burst - 1:  # this burst's last completion came early
                self.sleep(due - now)
                now = self.clock()
            elif now - due > self.burst / self.pace:  # behind after a stall: restart the schedule
                self.base_n, self.base_t = self.total, now - self.burst / self.pace
        if self.at_window_start is None:
            if now >= self.measure_from:
                self.at_window_start = (self.total, now)
            return False
        if now >= self.stop_at:
            if self.at_window_end is None:
                self.at_window_end = (self.total, now)
            return True
        return False

    def result(self) -> dict[str, Any]:
        assert self.at_window_start is not None and self.at_window_end is not None
        (n0, t0), (n1, t1) = self.at_window_start, self.at_window_end
        return {"rate": round((n1 - n0) / (t1 - t0), 1), "measured": n1 - n0, "total": self.total}


def proxy_pipe(endpoint: str, payload: bytes, inflight: int, counter: PipeCounter) -> dict[str, Any]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    send, recv = sock.send, sock.recv
    send(b"", SNDMORE)
    send(payload)
    recv()
    recv()
    counter.total += 1
    for _ in range(inflight):
        send(b"", SNDMORE)
        send(payload, 0, copy=False)
    outstanding = inflight
    stopping = False
    while outstanding:
        recv()  # the empty delimiter
        recv(0, copy=False)
        outstanding -= 1
        if not stopping:
            stopping = counter.done()
            if not stopping:
                send(b"", SNDMORE)
                send(payload, 0, copy=False)
                outstanding += 1
        else:
            counter.done()
    sock.close(linger=0)
    return counter.result()


def proxy_sync(endpoint: str, payload: bytes, warmup: int, count: int) -> list[float]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    send, recv = sock.send, sock.recv
    clock = time.perf_counter
    lat: list[float] = []
    for i in range(warmup + count):
        t0 = clock()
        send(b"", SNDMORE)
        send(payload, 0, copy=False)
        recv()
        recv(0, copy=False)
        if i >= warmup:
            lat.append(clock() - t0)
    sock.close(linger=0)
    return lat


def mdp_pipe(endpoint: str, payload: bytes, inflight: int, counter: PipeCounter) -> dict[str, Any]:
    from majortomo import Client

    clients: list[Any] = [Client(endpoint) for _ in range(inflight)]
    for c in clients:
        c.connect()
    clients[0].send(SERVICE, payload)
    clients[0].recv_all_as_list(timeout=30.0)
    counter.total += 1
    poller = zmq.Poller()
    by_socket: dict[Any, Any] = {}
    for c in clients:
        sock = c._socket  # majortomo's Client has no poll API: wait on its socket, then recv_part
        by_socket[sock] = c
        poller.register(sock, zmq.POLLIN)
        c.send(SERVICE, payload)
    outstanding = inflight
    stopping = False
    while outstanding:
        events = poller.poll(30_000)
        if not events:
            raise TimeoutError("majortomo: no reply in 30 s")
        for sock, _ in events:
            c = by_socket[sock]
            if c.recv_part() is None:
                continue
            outstanding -= 1
            if not stopping:
                stopping = counter.done()
                if not stopping:
                    c.send(SERVICE, payload)
                    outstanding += 1
            else:
                counter.done()
    for c in clients:
        c.close()
    return counter.result()


def mdp_sync(endpoint: str, payload: bytes, warmup: int, count: int) -> list[float]:
    from majortomo import Client

    client: Any = Client(endpoint)
    client.connect()
    clock = time.perf_counter
    lat: list[float] = []
    for i in range(warmup + count):
        t0 = clock()
        client.send(SERVICE, payload)
        client.recv_all_as_list(timeout=30.0)
        if i >= warmup:
            lat.append(clock() - t0)
    client.close()
    return lat


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description="Baseline brokers and workers.")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("proxy-broker")
    s.add_argument("--frontend", required=True)
    s.add_argument("--backend", required=True)
    s = sub.add_parser("py-forwarder")
    s.add_argument("--frontend", required=True)
    s.add_argument("--backend", required=True)
    s.add_argument("--copy", action="store_true", help="copy every frame (the reference for one copy each way)")
    s = sub.add_parser("rep-worker")
    s.add_argument("--connect", required=True)
    s = sub.add_parser("mdp-broker")
    s.add_argument("--bind", required=True)
    s = sub.add_parser("mdp-worker")
    s.add_argument("--connect", required=True)
    s.add_argument("--service", default="echo")
    args = p.parse_args(argv)
    try:
        if args.what == "proxy-broker":
            proxy_broker(args.frontend, args.backend)
        elif args.what == "py-forwarder":
            python_forwarder(args.frontend, args.backend, args.copy)
        elif args.what == "rep-worker":
            rep_worker(args.connect)
        elif args.what == "mdp-broker":
            mdp_broker(args.bind)
        else:
            mdp_worker(args.connect, args.service)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
