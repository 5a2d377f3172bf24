"""Section 10: memory under floods. Broker RSS over time while one peer misbehaves, per flood of
issue 7, against a broker with default settings; each curve should level off at or below the
bound README.md documents for it (the dashed line: RSS before the flood + that bound).

- ``unserved``: 4,000 req/s of 4 KB to a service nobody serves, from 8 connections (500 req/s
  each, within every per-client bound), every one answered UNAVAILABLE after the 1 s grace
  period. Bound: a grace period of requests (4,000 x (4 KB + ~1.5 kB of bookkeeping)).
- ``hoard``: a worker declares capacity 1,000,000 and neither reads nor replies; one client
  sends 256 KB requests at 200 req/s with 1 s deadlines. Bound: --max-worker-bytes (what the
  worker holds, 16 MiB) + the client's --max-client-bytes (16 MiB).
- ``noread``: a client sends 150,000 x 4 KB to an echo worker as fast as it can and never reads.
  Bound: its --max-client-bytes of requests + --max-client-unread-bytes of replies (32 MiB);
  with 4 KB payloads the count bounds come first (1,000 requests, 1,000 replies, and 128
  requests read ahead).
- ``bigreply``: a client that never reads asks, 100 times a second, a worker that answers every
  request with 1 MiB. Bound: --max-client-unread-bytes (16 MiB, + 1/16) and the reply being
  routed (1 MiB); the rest are answered TOO_LARGE.
- ``oversize``: a client sends a 64 MiB frame 4 times a second (limit 16 MiB). Bound: nothing:
  libzmq drops the connection when it reads the frame's size.

Run alone: ``python -m bench --only memory`` (``--quick``: 6 s floods instead of 18 s). The peers
are this module's command line (``python -m bench.memory PEER ...``): raw ZeroMQ sockets
speaking the protocol, so each misbehaves exactly as described.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import Cluster, Proc, Row, Settings, free_tcp_endpoint, progress, rss_bytes

__all__ = ["FLOODS", "main", "plot", "rows", "run"]

MB = 1024 * 1024
SAMPLE_EVERY = 0.25  # seconds between RSS samples
AFTER = 3.0  # seconds sampled after the flood stops

# name -> (title, documented bound in MB above the RSS before the flood)
FLOODS: dict[str, tuple[str, float]] = {
    "unserved": ("4,000 req/s x 4 KB to a service nobody serves", 4000 * (4 + 1.5) / 1024),
    "hoard": ("worker: capacity 1,000,000, never reads or replies; 256 KB at 200/s", 16 + 16),
    "noread": ("client: 150,000 x 4 KB, never reads", 16 + 16),
    "bigreply": ("client never reads 1 MiB replies", 16 * 17 / 16 + 1),
    "oversize": ("client: 64 MiB frames, limit 16 MiB", 0.0),
}
# Peaks may pass a bound by the allocator's slack (freed memory glibc keeps for reuse).
SLACK_MB = 8.0


# -- the section --------------------------------------------------------------------------------


def _broker(cluster: Cluster, *args: str) -> tuple[Proc, str, str]:
    front, back = free_tcp_endpoint(), free_tcp_endpoint()
    broker = cluster.spawn("zrouter broker", ["-m", "zrouter.broker", "--frontend", front, "--backend", back,
                                              "--stats-interval", "3600", *args])
    broker.wait_for("broker listening")
    return broker, front, back


def _peer(cluster: Cluster, name: str, *args: str) -> Proc:
    return cluster.spawn(f"memory peer {name}", ["-m", "bench.memory", name, *args])


def _sample(broker: Proc, driver: Proc, duration: float, base: int) -> list[tuple[float, float]]:
    """RSS above ``base`` (MB) every SAMPLE_EVERY s until the driver exits (at most ``duration``
    + 30 s), then for AFTER s more."""
    out: list[tuple[float, float]] = []
    t0 = time.monotonic()
    stop_at: float | None = None
    limit = t0 + duration + 30.0
    while True:
        now = time.monotonic()
        out.append((now - t0, (rss_bytes(broker.pid) - base) / MB))
        if stop_at is None and (not driver.alive() or now > limit):
            stop_at = now + AFTER
        if stop_at is not None and now >= stop_at:
            return out
        time.sleep(SAMPLE_EVERY)


def _stats(broker: Proc) -> dict[str, int]:
    """The counters the broker logs when it stops ("broker stopped: {...}")."""
    for line in reversed(broker.err):
        if "broker stopped: " in line:
            return dict(ast.literal_eval(line.split("broker stopped: ", 1)[1]))
    return {}


def flood(name: str, duration: float) -> dict[str, Any]:
    """Run one flood against a fresh broker; RSS samples, the driver's counts, the broker's."""
    with Cluster() as cluster:
        broker, front, back = _broker(cluster)
        workers: list[Proc] = []
        if name == "hoard":
            workers.append(_peer(cluster, "hoard", "--backend", back))
        elif name == "noread":
            workers.append(cluster.spawn("echo worker", ["-m", "zrouter.worker", "--service", "echo", "--broker",
                                                         back, "--capacity", "50", "--inline",
                                                         "zrouter.worker.examples:echo"]))
        elif name == "bigreply":
            workers.append(_peer(cluster, "bigreply", "--backend", back, "--size", str(MB)))
        if workers:
            broker.wait_for(r"worker \S+ joined", len(workers))
        # Warm up: the baseline includes what every broker allocates once.
        warm = _peer(cluster, "load", "--endpoint", front, "--service", "nobody", "--count", "2000",
                     "--rate", "4000", "--size", "4096")
        warm.wait_for('"sent"', stdout=True, timeout=60)
        time.sleep(1.5)  # past the grace period: the warm-up's service is forgotten
        base = rss_bytes(broker.pid)
        d = str(duration)
        if name == "unserved":
            args = ["load", "--endpoint", front, "--service", "nobody", "--rate", "4000", "--size", "4096",
                    "--duration", d, "--conns", "8"]
        elif name == "hoard":
            args = ["load", "--endpoint", front, "--service", "hoard", "--rate", "200", "--size", str(256 * 1024),
                    "--duration", d, "--timeout-ms", "1000"]
        elif name == "noread":
            args = ["load", "--endpoint", front, "--service", "echo", "--count", "150000", "--rate", "0",
                    "--size", "4096", "--duration", d, "--no-read"]
        elif name == "bigreply":
            args = ["load", "--endpoint", front, "--service", "big", "--rate", "100", "--size", "10",
                    "--duration", d, "--no-read"]
        else:
            args = ["oversize", "--endpoint", front, "--size", str(64 * MB), "--every", "0.25", "--duration", d]
        driver = _peer(cluster, args[0], *args[1:])
        samples = _sample(broker, driver, duration, base)
        driver.popen.wait(30)
        counts = json.loads(driver.out[-1]) if driver.out else {}
        for w in workers:
            w.kill()
        broker.stop(timeout=10)
        stats = _stats(broker)
    title, bound = FLOODS[name]
    rss = [mb for _, mb in samples]
    return {
        "title": title,
        "bound_mb": bound,
        "base_mb": base / MB,
        "peak_mb": max(rss),
        "last_mb": rss[-1],
        "samples": samples,
        "driver": counts,
        "broker": {k: stats.get(k, 0) for k in ("accepted", "replied", "timeouts", "unavailable", "overloaded",
                                                "late", "undeliverable", "unread_overflow")},
    }


def run(cfg: Settings) -> dict[str, Any]:
    duration = cfg.pick(18.0, 6.0)
    out: dict[str, Any] = {"duration": duration, "floods": {}}
    for name in FLOODS:
        res = out["floods"][name] = flood(name, duration)
        progress(f"memory {name:<9} RSS +{res['peak_mb']:.1f} MB at peak, +{res['last_mb']:.1f} MB at the end "
                 f"(bound +{res['bound_mb']:.0f} MB); driver {res['driver']}; broker {res['broker']}")
    return out


def rows(res: dict[str, Any]) -> list[Row]:
    out = [Row(f"10 memory floods ({res['duration']:g} s each): broker RSS growth, MB peak / end")]
    for name, f in res["floods"].items():
        ok = f["peak_mb"] <= f["bound_mb"] + SLACK_MB
        out.append(Row(f"  {name}: {f['title']}", f"+{f['peak_mb']:.1f} / +{f['last_mb']:.1f}", "", "",
                       f"base {f['base_mb']:.0f} MB", f"<= +{f['bound_mb']:.0f} MB", "ok" if ok else "MISS"))
    return out


def plot(res: dict[str, Any], outdir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    floods = res["floods"]
    cols = 3
    rows_ = (len(floods) + cols - 1) // cols
    fig, grid = plt.subplots(rows_, cols, figsize=(4.4 * cols, 3.4 * rows_), sharey=True, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(floods):]:
        ax.set_visible(False)
    for ax, (name, f) in zip(axes, floods.items(), strict=False):
        t = [s[0] for s in f["samples"]]
        ax.plot(t, [s[1] for s in f["samples"]], color="#1f77b4", label="broker RSS growth")
        ax.axhline(f["bound_mb"], color="#d62728", linestyle="--", linewidth=1, label="documented bound")
        ax.axvline(res["duration"], color="k", linestyle=":", linewidth=1, label="flood stops")
        ax.set_title(f"{name}\n{f['title']}", fontsize=8)
        ax.set_xlabel("s")
        ax.grid(True, alpha=0.3)
    for row in grid:
        row[0].set_ylabel(f"MB above RSS before (~{min(f['base_mb'] for f in floods.values()):.0f} MB)")
    axes[0].legend(loc="lower right", fontsize=7)
    fig.suptitle("Broker memory under floods, default settings: every curve levels off at its bound", fontsize=10)
    fig.tight_layout()
    path = outdir / "memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# -- the misbehaving peers (python -m bench.memory PEER ...) -------------------------------------


def _dealer(ctx: Any, endpoint: str, **options: int) -> Any:
    import zmq

    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name.upper()), value)
    sock.connect(endpoint)
    return sock


def _load(args: argparse.Namespace) -> dict[str, Any]:
    """Paced raw clients: ``rate`` requests/s in all (0: as fast as possible) over ``conns``
    connections, for ``duration`` s or ``count`` requests; replies read unless ``--no-read``."""
    import zmq

    from zrouter import protocol as p
    from zrouter.transport import recv_frames

    ctx = zmq.Context()
    opts = {"sndhwm": 0, "rcvhwm": 0} if args.read else {"sndhwm": 0, "rcvhwm": 1, "rcvbuf": 4096}
    socks = [_dealer(ctx, args.endpoint, **opts) for _ in range(args.conns)]
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    payload = zmq.Frame(b"x" * args.size)
    statuses: Counter[str] = Counter()
    sent = got = 0
    t0 = time.monotonic()
    end = t0 + args.duration

    def read(ms: int) -> None:
        nonlocal got
        for s, _ in poller.poll(ms):
            while True:
                try:
                    frames = recv_frames(s, zmq.NOBLOCK)
                except zmq.Again:
                    break
                got += 1
                statuses[p.STATUS_NAMES.get(p.decode_reply(frames[1].buffer).status, "?")] += 1

    while (now := time.monotonic()) < end and (not args.count or sent < args.count):
        due = int((now - t0) * args.rate) if args.rate else sent + 1000
        if args.count:
            due = min(due, args.count)
        while sent < due:
            sent += 1
            socks[sent % args.conns].send_multipart(
                [p.SIGNATURE, p.encode_request(sent, args.service, args.timeout_ms), payload], copy=False)
        if args.read:
            read(5)
        else:
            time.sleep(0.005)
    if args.read:
        t1 = time.monotonic() + args.timeout_ms / 1000.0 + 5.0
        while got < sent and time.monotonic() < t1:
            read(50)
    else:
        time.sleep(max(0.0, end - time.monotonic()))  # keep the connections (and what they hold) to the end
    return {"sent": sent, "replies": got, "statuses": dict(statuses), "seconds": round(time.monotonic() - t0, 2)}


def _worker(args: argparse.Namespace, reply_size: int | None) -> None:
    """A raw worker: READY with ``capacity``, a heartbeat every second; with ``reply_size`` it
    answers every request with that many bytes, without it it reads and answers nothing."""
    import zmq

    from zrouter import protocol as p

    ctx = zmq.Context()
    opts = {} if reply_size is not None else {"rcvhwm": 1, "rcvbuf": 4096}
    sock = _dealer(ctx, args.backend, **opts)
    sock.send_multipart([p.SIGNATURE, p.encode_ready(args.service, args.capacity, 1, {"instance": args.service})])
    body = b"y" * (reply_size or 0)
    beat = time.monotonic()
    while True:
        if reply_size is not None and sock.poll(100):
            frames = sock.recv_multipart()
            msg = p.decode_broker_message(frames[1])
            if type(msg) is p.Request:
                sock.send_multipart([p.SIGNATURE, p.encode_reply(msg.rid), body], copy=False)
        elif reply_size is None:
            time.sleep(0.1)
        if time.monotonic() >= beat:
            sock.send_multipart([p.SIGNATURE, p.encode_heartbeat()])
            beat = time.monotonic() + 1.0


def _oversize(args: argparse.Namespace) -> dict[str, Any]:
    import zmq

    from zrouter import protocol as p

    ctx = zmq.Context()
    sock = _dealer(ctx, args.endpoint, sndhwm=2)
    big = zmq.Frame(b"z" * args.size)
    sent = 0
    end = time.monotonic() + args.duration
    while time.monotonic() < end:
        try:
            sock.send_multipart([p.SIGNATURE, p.encode_request(sent + 1, "echo", 10_000), big], zmq.NOBLOCK,
                                copy=False)
            sent += 1
        except zmq.Again:
            pass  # still pushing the previous one out
        time.sleep(args.every)
    return {"sent": sent, "replies": 0 if not sock.poll(100) else 1}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description="Misbehaving peers for the memory section.")
    sub = ap.add_subparsers(dest="peer", required=True)
    load = sub.add_parser("load")
    load.add_argument("--endpoint", required=True)
    load.add_argument("--service", default="nobody")
    load.add_argument("--rate", type=float, default=1000.0, help="requests/s in all; 0: as fast as possible")
    load.add_argument("--count", type=int, default=0, help="stop after this many (0: no limit)")
    load.add_argument("--size", type=int, default=4096)
    load.add_argument("--duration", type=float, default=10.0)
    load.add_argument("--conns", type=int, default=1)
    load.add_argument("--timeout-ms", type=int, default=10_000)
    load.add_argument("--no-read", dest="read", action="store_false")
    for name in ("hoard", "bigreply"):
        w = sub.add_parser(name)
        w.add_argument("--backend", required=True)
        w.add_argument("--service", default="hoard" if name == "hoard" else "big")
        w.add_argument("--capacity", type=int, default=1_000_000 if name == "hoard" else 100)
        w.add_argument("--size", type=int, default=MB)
    big = sub.add_parser("oversize")
    big.add_argument("--endpoint", required=True)
    big.add_argument("--size", type=int, default=64 * MB)
    big.add_argument("--every", type=float, default=0.25)
    big.add_argument("--duration", type=float, default=10.0)
    args = ap.parse_args(argv)
    if args.peer == "load":
        print(json.dumps(_load(args)), flush=True)
    elif args.peer == "oversize":
        print(json.dumps(_oversize(args)), flush=True)
    else:
        _worker(args, None if args.peer == "hoard" else args.size)


if __name__ == "__main__":
    sys.exit(main())
