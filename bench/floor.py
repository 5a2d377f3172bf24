"""The latency floor of a Python process in the request path.

    python -m bench.floor

A raw ZRT1 client (one request at a time) and one raw ZRT1 echo worker, both bare pyzmq loops,
talk through (a) the zrouter broker and (b) a minimal Python ROUTER/ROUTER forwarder that does
nothing but pass frames between the two. If (a) is no slower than (b), the broker's own work
adds nothing measurable to one-at-a-time latency: what remains to zmq.proxy is the cost of
waking a Python process at all. Each runs ROUNDS times, interleaved; prints req/s and µs/round trip.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import msgpack
import zmq

from zrouter import protocol as p
from zrouter.transport import free_tcp_endpoint

ROUNDS = 3  # interleaved runs per system: single runs swing on a shared 2-core machine
COUNT = 3000  # round trips per run


def _forwarder(front: str, back: str) -> None:
    ctx = zmq.Context()
    f, b = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    f.bind(front)
    b.bind(back)
    poller = zmq.Poller()
    poller.register(f, zmq.POLLIN)
    poller.register(b, zmq.POLLIN)
    worker = client = b""
    while True:
        events = dict(poller.poll())
        if b in events:
            m = b.recv_multipart()
            cmd = msgpack.unpackb(m[2])[0]
            if cmd == p.READY:
                worker = m[0]
            elif cmd == p.REPLY:
                f.send_multipart([client, *m[1:]])
        if f in events:
            m = f.recv_multipart()
            client = m[0]
            b.send_multipart([worker, *m[1:]])


def _worker(back: str) -> None:
    s = zmq.Context().socket(zmq.DEALER)
    s.connect(back)
    s.send_multipart([p.SIGNATURE, p.encode_ready("echo", 1, 1, {"instance": f"floor-{time.time()}"})])
    while True:
        if not s.poll(500):
            s.send_multipart([p.SIGNATURE, p.encode_heartbeat()])
            continue
        m = s.recv_multipart()
        h = msgpack.unpackb(m[1])
        if h[0] == p.REQUEST:
            s.send_multipart([p.SIGNATURE, p.encode_reply(h[1], 0, h[5] & p.FLAG_MSGPACK), m[2]])
        else:
            s.send_multipart([p.SIGNATURE, p.encode_heartbeat()])


def _client(front: str) -> float:
    s = zmq.Context().socket(zmq.DEALER)
    s.connect(front)
    payload = b"x" * 100
    s.send_multipart([p.SIGNATURE, p.encode_request(0, "echo", 10_000), payload])
    if not s.poll(20_000):
        raise SystemExit("no reply: is the worker connected?")
    s.recv_multipart()
    t0 = time.perf_counter()
    for rid in range(1, COUNT + 1):
        s.send_multipart([p.SIGNATURE, p.encode_request(rid, "echo", 10_000), payload])
        s.recv_multipart()
    return COUNT / (time.perf_counter() - t0)


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "bench.floor", *args], stderr=subprocess.DEVNULL)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("forwarder", "worker"):  # the processes main() starts
        role, *eps = sys.argv[1:]
        if role == "forwarder":
            _forwarder(*eps)
        else:
            _worker(eps[0])
        return
    argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0]).parse_args()
    systems = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name in ("zrouter broker", "python forwarder"):
            front, back = free_tcp_endpoint(), free_tcp_endpoint()
            if name == "zrouter broker":
                procs.append(subprocess.Popen([sys.executable, "-m", "zrouter.broker", "--frontend", front, "--backend",
                                               back, "--log-level", "WARNING"]))
            else:
                procs.append(_spawn("forwarder", front, back))
            procs.append(_spawn("worker", back))
            systems[name] = front
        rates: dict[str, list[float]] = {n: [] for n in systems}
        for _ in range(ROUNDS):
            for name, front in systems.items():
                rates[name].append(_client(front))
        for name, r in rates.items():
            med = statistics.median(r)
            print(f"{name:18s} one at a time: {med:8,.0f} req/s  {1e6 / med:6.0f} µs per round trip "
                  f"(runs: {', '.join(f'{x:,.0f}' for x in r)})")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


if __name__ == "__main__":
    main()
