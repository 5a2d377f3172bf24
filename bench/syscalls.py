"""Where the time goes below Python: system calls and context switches per request.

``python -m bench.syscalls [--duration S] [--system zrouter,zrouter-pure,proxy]`` runs the
pipelined workload of the throughput section (one client, 100 in flight, ~100 B payloads, 2 echo
workers) against each system and counts, with ``perf stat`` on every thread of every process, the
system calls the loop makes (poll, getpid from libzmq's fork check, eventfd read/write between a
socket's thread and libzmq's I/O thread, epoll, send/recv) and the context switches, divided by
the requests served in the same window. Requires ``perf`` (Debian: linux-perf) and permission to
trace (root, or kernel.perf_event_paranoid <= 1). Counting slows every process a little: compare
the systems within one run, not with the throughput section's figures.

It answers why zrouter's broker spends several times zmq.proxy's CPU per request when the
routing code is a few µs: the table shows how often each process wakes up (context switches)
and what each wake-up costs in calls into the kernel.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from bench.harness import Cluster, progress, run_client, start_zrouter
from bench.peers import ZROUTER_WORKER_ARGS, start_proxy

__all__ = ["EVENTS", "count", "main"]

EVENTS = ("poll", "getpid", "write", "read", "epoll_wait", "epoll_ctl", "sendto", "recvfrom")
_LINE = re.compile(r"^\s*(\S+)-(\d+)\s+([\d,<>a-z ]+?)\s+(syscalls:sys_enter_(\w+)|context-switches)\s*$")


def _perf_stat(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    events = ",".join([*(f"syscalls:sys_enter_{e}" for e in EVENTS), "context-switches"])
    return subprocess.Popen(
        ["perf", "stat", "--per-thread", "-x", ",", "-e", events, "-p", str(pid), "-o", str(out), "--", "sleep",
         str(seconds)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _parse(text: str) -> dict[str, dict[str, int]]:
    """perf's CSV (-x ,): thread-pid,count,unit,event,... -> {thread: {event: count}}, threads
    named "main" (the process's Python thread) or "io" (libzmq's I/O thread)."""
    per: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) < 4 or not parts[1].strip().isdigit():
            continue
        thread = "io" if parts[0].startswith("ZMQbg/IO") else "main" if parts[0].startswith("python") else ""
        if not thread:
            continue
        event = parts[3].removeprefix("syscalls:sys_enter_").replace("context-switches", "switches")
        per.setdefault(thread, {}).setdefault(event, 0)
        per[thread][event] += int(parts[1])
    return per


def count(system: str, pids: dict[str, int], endpoint: str, duration: float) -> dict[str, Any]:
    """Run the pipelined client for ``duration`` s (plus warm-up) against ``endpoint`` while
    ``perf stat`` counts each of ``pids`` (role -> pid) over the middle of the run."""
    warmup = 1.0
    window = max(1.0, duration - 1.0)
    with TemporaryDirectory() as tmp:
        outs = {role: Path(tmp) / f"{role}.txt" for role in pids}
        stats: list[subprocess.Popen[bytes]] = []

        def start_counting() -> None:
            stats.extend(_perf_stat(pid, window, outs[role]) for role, pid in pids.items())

        timer = threading.Timer(warmup + 0.5, start_counting)
        timer.start()
        res = run_client(["pipe", "--system", system, "--endpoint", endpoint, "--size", "100", "--inflight", "100",
                          "--warmup", str(warmup), "--duration", str(duration)], timeout=duration + 120)
        timer.join()
        for p in stats:
            p.wait(timeout=window + 30)
        counts = {role: _parse(out.read_text()) if out.exists() else {} for role, out in outs.items()}
    requests = res["rate"] * window
    per_request = {
        role: {thread: {e: n / requests for e, n in events.items()} for thread, events in threads.items()}
        for role, threads in counts.items()
    }
    return {"rate": res["rate"], "per_request": per_request}


def _table(results: dict[str, dict[str, Any]]) -> str:
    cols = [*EVENTS, "switches"]
    lines = [f"{'system / process / thread':34}{'req/s':>9}" + "".join(f"{c:>11}" for c in cols) + f"{'all':>8}"]
    for system, res in results.items():
        for role, threads in res["per_request"].items():
            for thread, events in sorted(threads.items()):
                total = sum(events.get(e, 0.0) for e in EVENTS)
                lines.append(f"{system + ' / ' + role + ' / ' + thread:34}{res['rate']:>9,.0f}"
                             + "".join(f"{events.get(c, 0.0):>11.2f}" for c in cols) + f"{total:>8.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.syscalls", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=6.0, help="seconds of load per system")
    p.add_argument("--system", default="zrouter,proxy", help="comma-separated: zrouter, zrouter-pure, proxy")
    args = p.parse_args(argv)
    if shutil.which("perf") is None:
        sys.exit("perf is not installed (apt-get install linux-perf)")
    results: dict[str, dict[str, Any]] = {}
    for system in [s.strip() for s in args.system.split(",") if s.strip()]:
        with Cluster() as cluster:
            if system == "proxy":
                peer = start_proxy(cluster, 2)
                endpoint, procs = peer.endpoint, [peer.broker, *peer.workers]
            else:
                env = {"ZROUTER_PURE": "1"} if system == "zrouter-pure" else None
                zs = start_zrouter(cluster, 2, capacity=50, worker_args=ZROUTER_WORKER_ARGS, env=env)
                endpoint, procs = zs.frontend, [zs.broker, *zs.workers]
            pids = {"broker": procs[0].pid, "worker 1": procs[1].pid, "worker 2": procs[2].pid}
            progress(f"syscalls: {system}")
            results[system] = count("zrouter" if system.startswith("zrouter") else system, pids, endpoint,
                                    args.duration)
    print("system calls and context switches per request (perf stat, per thread)")
    print(_table(results))


if __name__ == "__main__":
    main()
