"""The client's own cost per request, without a broker, workers or a second process.

    python -m bench.client_path [--rounds N]

One process, one thread, inproc sockets: a ROUTER here stands in for the broker. Each round
``Client.submit`` sends ``BATCH`` requests (100-byte raw payloads), the ROUTER echoes every one
as an OK REPLY (not timed), then ``result()`` takes each reply in. The time of the two client
halves is divided by ``BATCH``. ``raw`` times the floor under the same traffic: the compiled
codec and socket calls alone (encode, send; receive, decode), with no request table, deadline or
future. Prints the best round of ``--rounds`` in µs per request (on a shared machine every other
round has someone else's work in it); a figure for comparing two versions of the client one after
the other. The full picture is ``python -m bench --only throughput``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import zmq

from zrouter import _speedups
from zrouter import protocol as p
from zrouter._speedups import decode_reply, encode_request, recv_or_none, send_frames
from zrouter.client import Client
from zrouter.transport import NOBLOCK

BATCH = 500  # requests per round: under the sockets' default high-water mark of 1,000
ENDPOINT = "inproc://bench-client-path"
PAYLOAD = b"x" * 100


def echo_all(router: zmq.Socket[Any], count: int) -> None:
    """Answer ``count`` REQUESTs waiting on ``router`` with OK REPLYs carrying their payload."""
    for _ in range(count):
        peer, _sig, header, payload = router.recv_multipart(copy=False)
        rid = p.decode_request(header.bytes).rid
        router.send_multipart([peer, p.SIGNATURE, p.encode_reply(rid, p.STATUS_OK, 0), payload], copy=False)


def settle(sock: zmq.Socket[Any]) -> None:
    """Give the inproc pipe a moment, so every reply is queued before the timing starts."""
    assert sock.poll(1000)
    time.sleep(0.005)


def library_round(client: Client, router: zmq.Socket[Any], sock: zmq.Socket[Any]) -> float:
    t0 = time.perf_counter()
    pendings = [client.submit("echo", PAYLOAD) for _ in range(BATCH)]
    sent = time.perf_counter() - t0
    echo_all(router, BATCH)
    settle(sock)
    t0 = time.perf_counter()
    for pending in pendings:
        assert pending.result() == PAYLOAD
    return (sent + time.perf_counter() - t0) / BATCH


def raw_round(dealer: zmq.Socket[Any], router: zmq.Socket[Any], rid: list[int]) -> float:
    t0 = time.perf_counter()
    for _ in range(BATCH):
        rid[0] += 1
        send_frames(dealer, (p.SIGNATURE, encode_request(rid[0], "echo", 10_000), PAYLOAD), NOBLOCK)
    sent = time.perf_counter() - t0
    echo_all(router, BATCH)
    settle(dealer)
    t0 = time.perf_counter()
    n = 0
    while n < BATCH:
        frames = recv_or_none(dealer)
        if frames is None:
            continue
        decode_reply(frames[1])
        n += 1
    return (sent + time.perf_counter() - t0) / BATCH


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--rounds", type=int, default=60, help=f"rounds of {BATCH} requests each")
    rounds = args.parse_args().rounds
    ctx: zmq.Context[Any] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(ENDPOINT)
    try:
        client = Client(ENDPOINT, context=ctx, timeout=60.0)
        try:
            first = client.submit("echo", PAYLOAD)
            echo_all(router, 1)
            first.result()
            conn = client._core.connection(ENDPOINT)
            assert conn is not None
            library = min(library_round(client, router, conn.sock) for _ in range(rounds))
        finally:
            client.close()
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(ENDPOINT)
        rid = [0]
        try:
            raw = min(raw_round(dealer, router, rid) for _ in range(rounds))
        finally:
            dealer.close(0)
    finally:
        router.close(0)
        ctx.term()
    print(f"client request path ({_speedups.implementation()}), best of {rounds} x {BATCH}: "
          f"Client.submit + result() {library * 1e6:.2f} µs/request, raw codec + socket calls "
          f"{raw * 1e6:.2f} µs/request (send, then receive; one thread)")


if __name__ == "__main__":
    main()
