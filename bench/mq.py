"""NATS request-reply and RabbitMQ RPC: what a Python team would pick instead of zrouter, run
with the same shape (a server process, 2 echo worker processes, 1 measuring client process).

NATS (Debian's ``nats-server``, client ``nats-py``):
    python -m bench.mq nats-server --port P           exec nats-server on 127.0.0.1:P
    python -m bench.mq nats-worker --url URL          subscribe "echo" in queue group "echo"
    client: ``nc.request("echo", payload)``; 100 of them in flight as 100 tasks

RabbitMQ (Debian's ``rabbitmq-server``, client ``aio-pika``):
    python -m bench.mq rabbitmq-server --port P --dir D   exec the server: node, Mnesia, logs,
                                                          cookie and epmd port all under D
    python -m bench.mq rabbitmq-worker --url URL      consume queue "echo" (prefetch = capacity),
                                                      publish the reply to reply_to, then ack
    client: RPC over direct reply-to (``amq.rabbitmq.reply-to``, no-ack), correlation ids

Both servers are ``exec``-ed by the Python launcher, so the harness's pid is the server's own
(its CPU per request is read from /proc like every broker's). RabbitMQ's replies go out with
``mandatory=False``: aio-pika's default ``mandatory=True`` makes RabbitMQ bounce direct reply-to
replies. Channels run without publisher confirms: an RPC's reply is its confirmation, and
waiting for a confirm on every publish would measure something no RPC client does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from bench.harness import Cluster, Proc, free_tcp_endpoint, progress

__all__ = [
    "NATS_BIN",
    "RABBITMQ_BIN",
    "nats_available",
    "nats_pipe",
    "open_loop",
    "nats_sync",
    "rabbitmq_available",
    "rabbitmq_pipe",
    "rabbitmq_sync",
    "start_nats",
    "start_rabbitmq",
]

SUBJECT: Final = "echo"
NATS_BIN: Final = "nats-server"
RABBITMQ_BIN: Final = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the script, not the su wrapper
REPLY_TO: Final = "amq.rabbitmq.reply-to"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _port() -> int:
    return int(free_tcp_endpoint().rsplit(":", 1)[1])


def nats_available() -> bool:
    try:
        import nats  # noqa: F401
    except ImportError:
        return False
    return shutil.which(NATS_BIN) is not None


def rabbitmq_available() -> bool:
    try:
        import aio_pika  # noqa: F401
    except ImportError:
        return False
    return os.access(RABBITMQ_BIN, os.X_OK)


# -- servers (exec-ed from the launcher) -------------------------------------------------------


def exec_nats(port: int) -> None:
    os.execvp(NATS_BIN, [NATS_BIN, "-a", "127.0.0.1", "-p", str(port)])


def exec_rabbitmq(port: int, base: Path) -> None:
    """The RabbitMQ node, everything it writes under ``base`` and every port it opens (AMQP,
    Erlang distribution, epmd) a free loopback one. Started in the foreground with ``exec`` all
    the way down (script -> erl -> beam.smp), without an Erlang shell."""
    (base / "enabled_plugins").write_text("[].\n")
    env = dict(os.environ)
    env.update({
        "HOME": str(base),  # the Erlang cookie goes here
        "RABBITMQ_NODENAME": f"bench{port}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(_port()),
        "ERL_EPMD_PORT": os.environ.get("BENCH_EPMD_PORT", str(_port())),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_LOGS": "-",
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
        "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
        # Set: the script execs erl in the foreground (one pid); -noshell: no shell on stdin.
        "RABBITMQ_ALLOW_INPUT": "1",
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-noshell",
    })  # fmt: skip
    os.execve(RABBITMQ_BIN, [RABBITMQ_BIN], env)


class ServerSystem:
    """A running server, its workers, and where a client connects."""

    def __init__(self, endpoint: str, broker: Proc, workers: list[Proc]) -> None:
        self.endpoint = endpoint
        self.broker = broker
        self.workers = workers


def start_nats(cluster: Cluster, workers: int = 2, timeout: float = 30.0, mode: str = "echo",
               worker_env: list[dict[str, str]] | None = None) -> ServerSystem:
    port = _port()
    server = cluster.spawn("nats-server", ["-m", "bench.mq", "nats-server", "--port", str(port)])
    server.wait_for("Server is ready", timeout=timeout)
    url = f"nats://127.0.0.1:{port}"
    procs = [cluster.spawn(f"nats worker {i}", ["-m", "bench.mq", "nats-worker", "--url", url, "--mode", mode],
                           worker_env[i] if worker_env else None) for i in range(workers)]
    for p in procs:
        p.wait_for("nats worker ready", timeout=timeout)
    return ServerSystem(url, server, procs)


def start_rabbitmq(cluster: Cluster, workers: int = 2, capacity: int = 50, timeout: float = 90.0, mode: str = "echo",
                   worker_env: list[dict[str, str]] | None = None) -> ServerSystem:
    base = Path(tempfile.mkdtemp(prefix="zrouter-bench-rabbitmq-"))
    port, epmd = _port(), _port()
    server = cluster.spawn("rabbitmq-server", ["-m", "bench.mq", "rabbitmq-server", "--port", str(port),
                                               "--dir", str(base)], env={"BENCH_EPMD_PORT": str(epmd)})

    def cleanup() -> None:
        # erl started epmd as a daemon on our private port: stop it, and remove the node's files.
        subprocess.run(["epmd", "-kill"], env={**os.environ, "ERL_EPMD_PORT": str(epmd)}, capture_output=True,
                       timeout=10, check=False)
        shutil.rmtree(base, ignore_errors=True)

    cluster.at_close(cleanup)  # after the node has stopped, also when starting it fails
    server.wait_for("Server startup complete", timeout=timeout, stdout=True)
    url = f"amqp://guest:guest@127.0.0.1:{port}/"
    procs = [cluster.spawn(f"rabbitmq worker {i}", ["-m", "bench.mq", "rabbitmq-worker", "--url", url,
                                                   "--prefetch", str(capacity), "--mode", mode],
                           worker_env[i] if worker_env else None) for i in range(workers)]
    for p in procs:
        p.wait_for("rabbitmq worker ready", timeout=timeout)
    return ServerSystem(url, server, procs)


# -- workers ----------------------------------------------------------------------------------


class Handler:
    """What a worker does with a request: ``echo`` returns the payload at once; ``attempt`` and
    ``serial`` are bench/handlers.py's (``BENCH_SERVICE_MS``, ``BENCH_ROLE``): requests sleep in
    parallel, or queue behind a virtual single server; both answer JSON naming the worker and
    the attempt (1 for a RabbitMQ redelivery: a request the broker requeued)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.service_s = float(os.environ.get("BENCH_SERVICE_MS", "1")) / 1000.0
        self.who = f"{os.environ.get('BENCH_ROLE', 'worker')}:{os.getpid()}"
        self.free_at = 0.0

    async def __call__(self, body: bytes, redelivered: bool = False) -> bytes:
        if self.mode == "echo":
            return body
        now = asyncio.get_running_loop().time()
        if self.mode == "serial":
            self.free_at = max(now, self.free_at) + self.service_s
            await asyncio.sleep(self.free_at - now)
        else:
            await asyncio.sleep(self.service_s)
        return json.dumps({"worker": self.who, "attempt": 1 if redelivered else 0}).encode()


async def nats_worker(url: str, mode: str) -> None:
    import nats

    nc = await nats.connect(url)
    handle = Handler(mode)
    tasks: set[asyncio.Task[None]] = set()

    async def serve(msg: Any) -> None:
        await msg.respond(await handle(msg.data))

    async def on_msg(msg: Any) -> None:
        if mode == "echo":
            await msg.respond(msg.data)
            return
        task = asyncio.create_task(serve(msg))  # requests in parallel, as a zrouter worker's credits
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await nc.subscribe(SUBJECT, queue=SUBJECT, cb=on_msg)
    await nc.flush()
    _say("nats worker ready")
    await asyncio.Event().wait()


async def rabbitmq_worker(url: str, prefetch: int, mode: str) -> None:
    import aio_pika

    conn = await aio_pika.connect(url)
    channel = await conn.channel(publisher_confirms=False)
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.declare_queue(SUBJECT, auto_delete=False)
    exchange = channel.default_exchange
    message_cls = aio_pika.Message
    handle = Handler(mode)
    tasks: set[asyncio.Task[None]] = set()

    async def serve(msg: Any) -> None:
        body = await handle(msg.body, msg.redelivered)
        await exchange.publish(message_cls(body, correlation_id=msg.correlation_id), routing_key=msg.reply_to,
                               mandatory=False)
        await msg.ack()

    async def on_msg(msg: Any) -> None:
        if mode == "echo":
            await serve(msg)
            return
        task = asyncio.create_task(serve(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await queue.consume(on_msg)
    _say("rabbitmq worker ready")
    await asyncio.Event().wait()


# -- client drivers (run inside the bench.loadgen process) -------------------------------------


async def _nats_pipe(url: str, payload: bytes, inflight: int, counter: Any) -> dict[str, Any]:
    import nats

    nc = await nats.connect(url)
    await nc.request(SUBJECT, payload, timeout=30.0)
    counter.total += 1
    stop = False

    async def lane() -> None:
        nonlocal stop
        while not stop:
            await nc.request(SUBJECT, payload, timeout=30.0)
            if counter.done():
                stop = True

    await asyncio.gather(*(lane() for _ in range(inflight)))
    await nc.close()
    result: dict[str, Any] = counter.result()
    return result


def nats_pipe(url: str, payload: bytes, inflight: int, counter: Any) -> dict[str, Any]:
    return asyncio.run(_nats_pipe(url, payload, inflight, counter))


async def _nats_sync(url: str, payload: bytes, warmup: int, count: int) -> list[float]:
    import nats

    nc = await nats.connect(url)
    clock = time.perf_counter
    lat: list[float] = []
    for i in range(warmup + count):
        t0 = clock()
        await nc.request(SUBJECT, payload, timeout=30.0)
        if i >= warmup:
            lat.append(clock() - t0)
    await nc.close()
    return lat


def nats_sync(url: str, payload: bytes, warmup: int, count: int) -> list[float]:
    return asyncio.run(_nats_sync(url, payload, warmup, count))


class _RpcClient:
    """RPC over direct reply-to: one consumer on the pseudo-queue, futures by correlation id."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[bytes]] = {}
        self.next_id = 0
        self.timeout = 30.0

    async def open(self, url: str, timeout: float = 30.0) -> None:
        self.timeout = timeout
        import aio_pika

        self.message_cls = aio_pika.Message
        self.conn = await aio_pika.connect(url)
        channel = await self.conn.channel(publisher_confirms=False)
        replies = await channel.get_queue(REPLY_TO, ensure=False)
        await replies.consume(self._on_reply, no_ack=True)  # direct reply-to takes no-ack consumers only
        self.exchange = channel.default_exchange

    async def _on_reply(self, msg: Any) -> None:
        fut = self.waiting.pop(msg.correlation_id, None)
        if fut is not None and not fut.done():
            fut.set_result(msg.body)

    async def call(self, payload: bytes) -> bytes:
        self.next_id += 1
        cid = str(self.next_id)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[cid] = fut
        await self.exchange.publish(self.message_cls(payload, correlation_id=cid, reply_to=REPLY_TO),
                                    routing_key=SUBJECT, mandatory=False)
        try:
            return await asyncio.wait_for(fut, self.timeout)
        finally:
            self.waiting.pop(cid, None)


async def _rabbitmq_pipe(url: str, payload: bytes, inflight: int, counter: Any) -> dict[str, Any]:
    rpc = _RpcClient()
    await rpc.open(url)
    await rpc.call(payload)
    counter.total += 1
    stop = False

    async def lane() -> None:
        nonlocal stop
        while not stop:
            await rpc.call(payload)
            if counter.done():
                stop = True

    await asyncio.gather(*(lane() for _ in range(inflight)))
    await rpc.conn.close()
    result: dict[str, Any] = counter.result()
    return result


def rabbitmq_pipe(url: str, payload: bytes, inflight: int, counter: Any) -> dict[str, Any]:
    return asyncio.run(_rabbitmq_pipe(url, payload, inflight, counter))


async def _rabbitmq_sync(url: str, payload: bytes, warmup: int, count: int) -> list[float]:
    rpc = _RpcClient()
    await rpc.open(url)
    clock = time.perf_counter
    lat: list[float] = []
    for i in range(warmup + count):
        t0 = clock()
        await rpc.call(payload)
        if i >= warmup:
            lat.append(clock() - t0)
    await rpc.conn.close()
    return lat


def rabbitmq_sync(url: str, payload: bytes, warmup: int, count: int) -> list[float]:
    return asyncio.run(_rabbitmq_sync(url, payload, warmup, count))


async def open_loop(system: str, url: str, rate: float, duration: float, warmup: int, seed: int, timeout: float,
                    kill_pid: int = 0, kill_at: float = 0.0) -> dict[str, Any]:
    """bench.loadgen's open mode for NATS or RabbitMQ: Poisson arrivals at ``rate`` for
    ``duration`` s, one record per request ``[sent at, latency, status, attempt, worker]``
    (status "ok" or the exception's name, e.g. a timeout), a SIGKILL of ``kill_pid`` at
    ``kill_at`` s; the same output, so bench.failover and bench.policy_quality analyse it."""
    import random
    import signal

    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    if system == "nats":
        import nats

        nc = await nats.connect(url)

        async def call(payload: bytes) -> bytes:
            msg = await nc.request(SUBJECT, payload, timeout=timeout)
            reply: bytes = msg.data
            return reply

        async def close() -> None:
            await nc.close()
    else:
        rpc = _RpcClient()
        await rpc.open(url, timeout)
        call = rpc.call

        async def close() -> None:
            await rpc.conn.close()

    for _ in range(warmup):
        await call(b"{}")
    records: list[list[Any]] = []
    workers: dict[str, int] = {}
    kill_time: list[float] = []
    t0 = loop.time()

    async def one(i: int, t_send: float) -> None:
        status, attempt, worker = "ok", -1, -1
        try:
            reply = json.loads(await call(json.dumps({"i": i}).encode()))
            attempt = int(reply["attempt"])
            worker = workers.setdefault(str(reply["worker"]), len(workers))
        except Exception as exc:  # a timeout: the request is lost
            status = type(exc).__name__
        records.append([round(t_send - t0, 6), round(loop.time() - t_send, 6), status, attempt, worker])

    if kill_pid:
        def kill() -> None:
            kill_time.append(loop.time() - t0)
            os.kill(kill_pid, signal.SIGKILL)

        loop.call_at(t0 + kill_at, kill)
    tasks = []
    next_t, i, end = t0, 0, t0 + duration
    while next_t < end:
        now = loop.time()
        if now < next_t:
            await asyncio.sleep(next_t - now)
        now = loop.time()
        while next_t <= now and next_t < end:
            tasks.append(asyncio.create_task(one(i, loop.time())))
            i += 1
            next_t += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    await close()
    return {"records": sorted(records), "sent": i, "elapsed": loop.time() - t0,
            "kill_at": kill_time[0] if kill_time else None, "workers": sorted(workers, key=workers.__getitem__)}


def start_all(cluster: Cluster, workers: int, capacity: int) -> dict[str, ServerSystem]:
    """NATS and RabbitMQ when installed (``make bench`` installs both), else a progress note."""
    out: dict[str, ServerSystem] = {}
    if nats_available():
        out["nats"] = start_nats(cluster, workers)
    else:
        progress("NATS is not installed (make bench: nats-server and nats-py): left out")
    if rabbitmq_available():
        out["rabbitmq"] = start_rabbitmq(cluster, workers, capacity)
    else:
        progress("RabbitMQ is not installed (make bench: rabbitmq-server and aio-pika): left out")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.mq", description="NATS and RabbitMQ servers and workers.")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("nats-server")
    s.add_argument("--port", type=int, required=True)
    s = sub.add_parser("rabbitmq-server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--dir", type=Path, required=True)
    s = sub.add_parser("nats-worker")
    s.add_argument("--url", required=True)
    s.add_argument("--mode", choices=["echo", "attempt", "serial"], default="echo")
    s = sub.add_parser("rabbitmq-worker")
    s.add_argument("--url", required=True)
    s.add_argument("--prefetch", type=int, default=50)
    s.add_argument("--mode", choices=["echo", "attempt", "serial"], default="echo")
    args = p.parse_args(argv)
    try:
        if args.what == "nats-server":
            exec_nats(args.port)
        elif args.what == "rabbitmq-server":
            exec_rabbitmq(args.port, args.dir)
        elif args.what == "nats-worker":
            asyncio.run(nats_worker(args.url, args.mode))
        else:
            asyncio.run(rabbitmq_worker(args.url, args.prefetch, args.mode))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
