"""What one frame less per message would save: the case for merging signature and header.

    python -m bench.frames [--rounds N] [--duration S]

zrouter's messages are three frames (signature, header, payload; the broker's ROUTER sockets add
the peer's routing id), so a request and its reply make 28 frame operations in the main threads
of client, broker and workers, and as many in their libzmq I/O threads. This runs the same
topology as the throughput bench (one pipelined client with 100 in flight, a ROUTER/ROUTER
forwarder, two echo workers, tcp on loopback) with the least Python possible: every process only
moves frames with zrouter's compiled receive and send (``zrouter._native.wire``), nothing is
decoded. Once with the three frames zrouter sends, once with the signature and header in one
frame (20 operations). The difference in CPU per request, summed over all four processes, is
the saving a protocol revision merging the two frames can expect (before anything zrouter does
with the messages). Runs alternate; prints the median of ``--rounds`` pairs. Needs the compiled
path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import zmq

from bench.harness import cpu_seconds
from zrouter import protocol as p
from zrouter.transport import free_tcp_endpoint

HEADER = p.encode_request(1000, "echo", 10_000, 0, 0)  # a REQUEST-sized header
PAYLOAD = b"x" * 100
IN_FLIGHT = 100


def _wire() -> Any:
    from zrouter import _speedups

    if not _speedups.native():
        sys.exit(f"bench.frames measures the compiled path: {_speedups.why_pure()}")
    return _speedups.load_native("wire")


def forwarder(front: str, back: str, workers: int) -> None:
    """Client messages to the workers in turn, worker messages to the (one) client."""
    wire = _wire()
    ctx: zmq.Context[Any] = zmq.Context.instance()
    f, b = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    f.bind(front)
    b.bind(back)
    idents = [b.recv_multipart()[0] for _ in range(workers)]  # each worker says hello first
    print("ready", flush=True)
    poller = zmq.Poller()
    poller.register(f, zmq.POLLIN)
    poller.register(b, zmq.POLLIN)
    client, turn = b"", 0
    while True:
        poller.poll()
        while (frames := wire.recv_or_none(f)) is not None:
            client, frames[0] = frames[0], idents[turn]
            turn = (turn + 1) % workers
            wire.send_frames(b, frames, zmq.NOBLOCK)
        while (frames := wire.recv_or_none(b)) is not None:
            frames[0] = client
            wire.send_frames(f, frames, zmq.NOBLOCK)


def echo(back: str) -> None:
    wire = _wire()
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.connect(back)
    s.send(b"hello")
    while True:
        s.poll()
        while (frames := wire.recv_or_none(s)) is not None:
            wire.send_frames(s, frames, zmq.NOBLOCK)


def drive(sock: zmq.Socket[Any], message: list[bytes], seconds: float) -> float:
    """Keep IN_FLIGHT messages going for ``seconds``; returns replies per second."""
    wire = _wire()
    for _ in range(IN_FLIGHT):
        wire.send_frames(sock, message, zmq.NOBLOCK)
    got, t0 = 0, time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        sock.poll()
        while wire.recv_or_none(sock) is not None:
            got += 1
            wire.send_frames(sock, message, zmq.NOBLOCK)
    rate = got / (time.perf_counter() - t0)
    while sock.poll(1000):  # the last IN_FLIGHT, so the next round starts clean
        while wire.recv_or_none(sock) is not None:
            pass
    return rate


def one_round(frames: int, seconds: float) -> dict[str, float]:
    front, back = free_tcp_endpoint(), free_tcp_endpoint()
    py = sys.executable
    fwd = subprocess.Popen([py, "-m", "bench.frames", "forwarder", front, back], stdout=subprocess.PIPE, text=True)
    workers = [subprocess.Popen([py, "-m", "bench.frames", "echo", back]) for _ in range(2)]
    procs = [fwd, *workers]
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    try:
        assert fwd.stdout is not None and fwd.stdout.readline().strip() == "ready"
        sock.connect(front)
        message = [p.SIGNATURE, HEADER, PAYLOAD] if frames == 3 else [p.SIGNATURE + HEADER, PAYLOAD]
        drive(sock, message, 0.5)  # warm up
        pids = [proc.pid for proc in procs] + [0]
        before = [cpu_seconds(pid) if pid else time.process_time() for pid in pids]
        t0 = time.perf_counter()
        rate = drive(sock, message, seconds)
        requests = rate * (time.perf_counter() - t0)
        used = [(cpu_seconds(pid) if pid else time.process_time()) - b for pid, b in zip(pids, before, strict=True)]
    finally:
        sock.close(0)
        for proc in procs:
            proc.kill()
            proc.wait(10)
    per = [u / requests * 1e6 for u in used]
    return {"rate": rate, "forwarder": per[0], "workers": per[1] + per[2], "client": per[3], "total": sum(per)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("forwarder", "echo"):
        role, *eps = sys.argv[1:]
        if role == "forwarder":
            forwarder(eps[0], eps[1], 2)
        else:
            echo(eps[0])
        return
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--rounds", type=int, default=5, help="pairs of runs (3 frames, then 2)")
    args.add_argument("--duration", type=float, default=4.0, help="seconds of load per run")
    opts = args.parse_args()
    _wire()
    runs: dict[int, list[dict[str, float]]] = {3: [], 2: []}
    for _ in range(opts.rounds):
        for frames in (3, 2):
            runs[frames].append(one_round(frames, opts.duration))
            print(json.dumps({"frames": frames, **{k: round(v, 2) for k, v in runs[frames][-1].items()}}),
                  file=sys.stderr, flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    print(f"frame moving alone, median of {opts.rounds}: CPU µs per request (forwarder / workers / client = all)")
    for n in (3, 2):
        m = med[n]
        print(f"  {n} frames per message: {m['rate']:>9,.0f} req/s  {m['forwarder']:.2f} / {m['workers']:.2f} / "
              f"{m['client']:.2f} = {m['total']:.2f} µs")
    saved = med[3]["total"] - med[2]["total"]
    print(f"  one frame less: {saved:.2f} µs per request ({saved / med[3]['total']:.0%} of frame moving), "
          f"{med[2]['rate'] / med[3]['rate']:.2f}x the rate")


if __name__ == "__main__":
    main()
