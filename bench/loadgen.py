"""The measuring client process: ``python -m bench.loadgen MODE --system S --endpoint EP ...``.

It runs one measurement against an already running system and prints one JSON object on its
last stdout line. Modes:

- ``pipe``: keep ``--inflight`` requests in flight for ``--warmup`` + ``--duration`` seconds;
  req/s over the measured window (plus the total count, for CPU-per-request figures); with
  ``--pace R``, at most R req/s (the same load for every system), replies in bursts of about
  ``--burst``;
- ``sync``: one request at a time, ``--count`` latencies after ``--warmup`` requests;
- ``open`` (zrouter only): open-loop Poisson arrivals at ``--rate`` req/s through AsyncClient,
  one record per request; ``--kill-pid``/``--kill-at`` SIGKILL a worker mid-run (failover);
- ``fill`` (zrouter only): queue ``--count`` requests for a service nobody serves, prove they
  all reached the broker (a probe request sent after them is answered), print, then hold them
  until a line arrives on stdin (the harness measures the broker meanwhile).

zrouter is driven through its own client library: ``Client.submit`` for pipelining,
``Client.request`` one at a time, ``AsyncClient`` for open-loop load.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import signal
import sys
import time
from collections import deque
from typing import Any

from bench.mq import nats_pipe, nats_sync, rabbitmq_pipe, rabbitmq_sync
from bench.peers import BURST, SYSTEMS, PipeCounter, mdp_pipe, mdp_sync, proxy_pipe, proxy_sync
from bench.harness import percentile

__all__ = ["main"]


def zrouter_pipe(endpoint: str, payload: bytes, inflight: int, counter: PipeCounter, service: str = "echo",
                 timeout: float = 30.0) -> dict[str, Any]:
    from zrouter.client import Client

    with Client(endpoint, timeout=timeout) as c:
        c.request(service, payload)  # connection up, workers warm
        counter.total += 1
        window = deque(c.submit(service, payload) for _ in range(inflight))
        stopping = False
        while window:
            window.popleft().result()
            if stopping:
                counter.done()
                continue
            stopping = counter.done()
            if not stopping:
                window.append(c.submit(service, payload))
    return counter.result()


def zrouter_sync(endpoint: str, payload: bytes, warmup: int, count: int, service: str = "echo",
                 timeout: float = 30.0) -> list[float]:
    from zrouter.client import Client

    clock = time.perf_counter
    lat: list[float] = []
    with Client(endpoint, timeout=timeout) as c:
        request = c.request
        for i in range(warmup + count):
            t0 = clock()
            request(service, payload)
            if i >= warmup:
                lat.append(clock() - t0)
    return lat


def summarize(lat: list[float]) -> dict[str, Any]:
    """Percentiles in µs, and the quantile curve (0..100 %) for a CDF plot."""
    us = sorted(x * 1e6 for x in lat)
    return {
        "count": len(us),
        "p50_us": percentile(us, 50),
        "p90_us": percentile(us, 90),
        "p99_us": percentile(us, 99),
        "p999_us": percentile(us, 99.9),
        "mean_us": sum(us) / len(us),
        "curve_us": [percentile(us, q / 2) for q in range(1, 201)],
    }


async def open_loop(args: argparse.Namespace) -> dict[str, Any]:
    """Poisson arrivals at ``args.rate`` for ``args.duration`` s; a record per request."""
    from zrouter.client import AsyncClient
    from zrouter.errors import ZRouterError

    rng = random.Random(args.seed)
    loop = asyncio.get_running_loop()
    records: list[list[Any]] = []
    workers: dict[str, int] = {}
    outstanding: set[asyncio.Future[Any]] = set()
    kill_time: list[float] = []
    async with AsyncClient(args.endpoint, timeout=args.timeout) as ac:
        for _ in range(args.warmup):  # connection up, every worker's code paths warm
            await ac.request(args.service, {"warmup": True})
        t0 = loop.time()

        def on_done(fut: asyncio.Future[Any], *, t_send: float) -> None:
            t_done = loop.time()
            outstanding.discard(fut)
            attempt, worker, status = -1, -1, "ok"
            try:
                reply = fut.result()
            except ZRouterError as exc:
                status = type(exc).__name__
            else:
                if isinstance(reply, dict) and "attempt" in reply:
                    attempt = int(reply["attempt"])
                    worker = workers.setdefault(str(reply["worker"]), len(workers))
            records.append([round(t_send - t0, 6), round(t_done - t_send, 6), status, attempt, worker])

        if args.kill_pid:
            def kill() -> None:
                kill_time.append(loop.time() - t0)
                os.kill(args.kill_pid, signal.SIGKILL)

            loop.call_at(t0 + args.kill_at, kill)
        end = t0 + args.duration
        next_t = t0
        i = 0
        while next_t < end:
            now = loop.time()
            if now < next_t:
                await asyncio.sleep(next_t - now)
            now = loop.time()
            while next_t <= now and next_t < end:
                fut = ac.submit(args.service, {"i": i}, timeout=args.timeout)
                t_send = loop.time()
                outstanding.add(fut)
                fut.add_done_callback(functools.partial(on_done, t_send=t_send))
                i += 1
                next_t += rng.expovariate(args.rate)
        while outstanding:
            await asyncio.wait(set(outstanding))
            await asyncio.sleep(0)  # let the done callbacks run
    return {
        "records": sorted(records),
        "sent": i,
        "elapsed": loop.time() - t0,
        "kill_at": kill_time[0] if kill_time else None,
        "workers": sorted(workers, key=workers.__getitem__),
    }


def fill(args: argparse.Namespace) -> None:
    """Queue ``args.count`` requests at the broker and hold them until stdin says stop."""
    from zrouter.client import Client

    c = Client(args.endpoint, timeout=args.timeout, max_inflight=args.count + 1)  # all at the broker at once
    c.request(args.probe, b"probe", timeout=60.0)  # connected
    t0 = time.perf_counter()
    pend = [c.submit(args.service, b"x" * args.size, timeout=args.timeout) for _ in range(args.count)]
    c.request(args.probe, b"probe", timeout=120.0)  # one connection, in order: all queued before it
    elapsed = time.perf_counter() - t0
    failed = sum(1 for p in pend if p.done() and p.exception() is not None)
    print(json.dumps({"queued": args.count, "seconds": elapsed, "failed_early": failed}), flush=True)
    sys.stdin.readline()
    os._exit(0)  # skip settling 100,000 pending requests on close: the broker is killed next


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every flag's help, and the module docstring's layout kept."""


def _at_least(low: float, kind: type = float) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {text}")
        return value
    return parse


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=_HelpFormatter)
    p.add_argument("mode", choices=["pipe", "sync", "open", "fill"])
    p.add_argument("--system", default="zrouter", choices=SYSTEMS,
                   help="zrouter-pure: zrouter's client on its pure-Python path (ZROUTER_PURE=1)")
    p.add_argument("--endpoint", required=True, help="where clients connect: the broker's front end")
    p.add_argument("--size", type=int, default=100, help="payload bytes")
    p.add_argument("--inflight", type=int, default=100, help="pipe: requests kept in flight")
    p.add_argument("--warmup", type=float, default=0.5, help="pipe: seconds; sync/open: requests")
    p.add_argument("--duration", type=float, default=3.0, help="seconds")
    p.add_argument("--count", type=int, default=2000, help="sync: requests measured; fill: requests queued")
    p.add_argument("--service", default="echo",
                   help="zrouter modes; the other systems' workers serve their one fixed service")
    p.add_argument("--rate", type=float, default=500.0, help="open: mean arrivals per second")
    p.add_argument("--pace", type=_at_least(0.0), default=0.0,
                   help="pipe: hold the run to this many req/s (0: as fast as it goes)")
    p.add_argument("--burst", type=_at_least(1, int), default=BURST,
                   help="pipe with --pace: the client sleeps once it is BURST replies ahead of the schedule, so "
                        "replies come in bursts of about BURST, BURST / PACE s apart")
    p.add_argument("--seed", type=int, default=1, help="open: the arrivals' random seed")
    p.add_argument("--timeout", type=float, default=30.0, help="request timeout, s")
    p.add_argument("--kill-pid", type=int, default=0, help="open: a worker to SIGKILL mid-run (0: none)")
    p.add_argument("--kill-at", type=float, default=0.0, help="seconds after the load starts")
    p.add_argument("--probe", default="probe", help="fill: a service with a worker, to prove ordering")
    args = p.parse_args(argv)
    payload = b"x" * args.size
    out: dict[str, Any]
    if args.system == "zrouter-pure":
        os.environ["ZROUTER_PURE"] = "1"  # before anything imports zrouter._speedups
    if args.mode == "pipe":
        __import__({"zrouter": "zrouter.client", "zrouter-pure": "zrouter.client", "proxy": "zmq",
                    "majortomo": "majortomo", "nats": "nats", "rabbitmq": "aio_pika"}[args.system])
        cpu0 = sum(os.times()[:2])
        counter = PipeCounter(args.warmup, args.duration, pace=args.pace, burst=args.burst)
        if args.system.startswith("zrouter"):
            out = zrouter_pipe(args.endpoint, payload, args.inflight, counter, args.service, args.timeout)
        else:
            drive = {"proxy": proxy_pipe, "majortomo": mdp_pipe, "nats": nats_pipe, "rabbitmq": rabbitmq_pipe}[args.system]
            out = drive(args.endpoint, payload, args.inflight, counter)
        out["client_cpu_s"] = round(sum(os.times()[:2]) - cpu0, 3)
        if args.pace and out["rate"] < 0.95 * args.pace:
            print(f"loadgen: warning: {out['rate']:,.0f} req/s, below --pace {args.pace:,.0f}", file=sys.stderr)
    elif args.mode == "sync":
        if args.system.startswith("zrouter"):
            lat = zrouter_sync(args.endpoint, payload, int(args.warmup), args.count, args.service, args.timeout)
        else:
            measure = {"proxy": proxy_sync, "majortomo": mdp_sync, "nats": nats_sync, "rabbitmq": rabbitmq_sync}[args.system]
            lat = measure(args.endpoint, payload, int(args.warmup), args.count)
        out = summarize(lat)
    elif args.mode == "open" and args.system in ("nats", "rabbitmq"):
        from bench import mq

        out = asyncio.run(mq.open_loop(args.system, args.endpoint, args.rate, args.duration, int(args.warmup), args.seed,
                                       args.timeout, args.kill_pid, args.kill_at))
    elif args.mode == "open":
        args.warmup = int(args.warmup)
        out = asyncio.run(open_loop(args))
    else:
        fill(args)
        return
    if args.system.startswith("zrouter"):
        from zrouter import _speedups

        out["implementation"] = _speedups.implementation()  # the table says which path ran
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
