"""Many zrouter workers in one process, for measuring the broker at scale.

    python -m bench.fakeworkers --broker EP --service echo --count 1000 --capacity 4

Opens ``--count`` connections to the broker's back end, one per fake worker, each speaking
zrouter's worker protocol (``zrouter.protocol``): READY on connect, a HEARTBEAT every
``--heartbeat`` seconds (spread evenly over the interval, as independent workers would be), READY
again when the broker says DISCONNECT, and an immediate echo REPLY to every REQUEST.

To the broker these are ``--count`` separate workers: each is its own TCP connection with its own
routing id and its own READY, exactly what a DEALER per worker gives. Here they are the
connections of one ROUTER socket (``ROUTING_ID`` and ``CONNECT_ROUTING_ID`` set before each
``connect``), so the process reads one socket instead of polling a thousand DEALERs: a
``zmq.Poller`` over 1,000 sockets costs more per wake-up than the broker does per request, and
would make the fake workers, not the broker, the bottleneck of the under-load measurement.
Real worker processes would not fit a 2-core machine by the thousand.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections import deque
from typing import Any

import zmq

from zrouter import protocol
from zrouter.transport import NOBLOCK, recv_frames, send_frames

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fakeworkers", description=__doc__.splitlines()[0])
    p.add_argument("--broker", required=True, help="the broker's back-end endpoint")
    p.add_argument("--service", default="echo")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--capacity", type=int, default=4)
    p.add_argument("--heartbeat", type=float, default=1.0)
    p.add_argument("--name", default="fake")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

    ctx = zmq.Context()
    pid = os.getpid()
    sig = protocol.SIGNATURE
    aliases = [b"w%d" % i for i in range(args.count)]
    readies = {
        alias: protocol.encode_ready(args.service, args.capacity, 1, {"instance": f"{args.name}-{pid}-{i}"})
        for i, alias in enumerate(aliases)
    }
    sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.sndhwm = sock.rcvhwm = 0
    for i, alias in enumerate(aliases):
        sock.setsockopt(zmq.ROUTING_ID, b"%s-%d-%d" % (args.name.encode(), pid, i))  # what the broker sees
        sock.setsockopt(zmq.CONNECT_ROUTING_ID, alias)  # how this process addresses the connection
        sock.connect(args.broker)
        send_frames(sock, [alias, sig, readies[alias]])  # queued on the pipe until the connection is up
    print(f"fake workers started: {args.count}", file=sys.stderr, flush=True)

    interval = args.heartbeat
    now = time.monotonic()
    due: deque[tuple[float, bytes]] = deque(
        (now + interval * (i + 1) / args.count, alias) for i, alias in enumerate(aliases)
    )
    heartbeat = protocol.encode_heartbeat()
    decode = protocol.decode_broker_message
    reply_ok = protocol.encode_reply
    ok, msgpack_flag = protocol.STATUS_OK, protocol.FLAG_MSGPACK
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while True:
        now = time.monotonic()
        while due and due[0][0] <= now:
            at, alias = due.popleft()
            send_frames(sock, [alias, sig, heartbeat])
            due.append((at + interval, alias))
        if not poller.poll(max(0, int((due[0][0] - now) * 1000) + 1)):
            continue
        while True:
            try:
                frames = recv_frames(sock, NOBLOCK)
            except zmq.Again:
                break
            alias = frames[0].bytes
            msg = decode(frames[2].buffer)
            if type(msg) is protocol.Request:
                payload = frames[3] if len(frames) > 3 else b""
                send_frames(sock, [alias, sig, reply_ok(msg.rid, ok, msg.flags & msgpack_flag), payload])
            elif type(msg) is protocol.Disconnect:
                send_frames(sock, [alias, sig, readies[alias]])


if __name__ == "__main__":
    main()
