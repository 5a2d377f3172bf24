"""``zrouter-demo``: a broker on its embedded registry, three workers and a client, on loopback.

What a newcomer runs first: it shows requests routed and balanced (what was sent, which worker
served it, per-worker counts), then a worker killed while it holds requests and nothing lost.
Everything it starts is a real process, stopped when the demo ends.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from zrouter.client import Client
from zrouter.transport import free_tcp_endpoint

__all__ = ["main"]


def _spawn(args: list[str], quiet: bool) -> subprocess.Popen[bytes]:
    out = subprocess.DEVNULL if quiet else None
    return subprocess.Popen([sys.executable, *args], stdout=out, stderr=out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zrouter-demo", description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--requests", type=int, default=30, help="requests in the balanced run")
    ap.add_argument("--policy", default="least-outstanding")
    ap.add_argument("--verbose", action="store_true", help="show the broker's and workers' logs")
    args = ap.parse_args(argv)

    front, back = free_tcp_endpoint(), free_tcp_endpoint()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        print(f"starting broker (clients: {front}, workers: {back}, policy {args.policy})")
        procs.append(_spawn(["-m", "zrouter.broker", "--frontend", front, "--backend", back,
                             "--policy", args.policy, "--heartbeat", "0.5"], not args.verbose))
        workers = []
        for n, delay in enumerate(["0", "0", "0.05"]):
            cmd = ["-m", "zrouter.worker", "--service", "demo", "--broker", back, "--capacity", "2",
                   "--heartbeat", "0.5", "--delay", delay, "zrouter.worker.examples:whoami"]
            workers.append(_spawn(cmd, not args.verbose))
            print(f"starting worker {n + 1} (pid {workers[-1].pid}){' - slow: 50 ms a request' if delay != '0' else ''}")
        procs.extend(workers)

        with Client(front, timeout=10.0) as client:
            print("\nwaiting for the workers to say READY ...")
            deadline = time.monotonic() + 20
            seen: set[str] = set()
            while len(seen) < 3 and time.monotonic() < deadline:
                seen.add(str(client.request("demo", "hello", timeout=5.0)["worker"]))
            print(f"\n{args.requests} requests, 10 in flight at a time:")
            counts: collections.Counter[str] = collections.Counter()
            sent = 0
            while sent < args.requests:
                batch = [client.submit("demo", {"n": sent + i}) for i in range(min(10, args.requests - sent))]
                for pending in batch:
                    answer = pending.result()
                    counts[str(answer["worker"])] += 1
                    print(f"  sent {answer['payload']!s:<12} served by {answer['worker']}")
                sent += len(batch)
            print("\nper-worker counts (the slow worker gets less under least-outstanding):")
            for worker, count in sorted(counts.items()):
                print(f"  {worker:<40} {count:>4}  {'#' * count}")

            print(f"\nkilling worker pid {workers[0].pid} with SIGKILL while requests are in flight ...")
            batch = [client.submit("demo", {"n": i}) for i in range(20)]
            os.kill(workers[0].pid, signal.SIGKILL)
            answers = [p.result() for p in batch]
            print(f"  {len(answers)} of 20 answered, none lost (requeued to the other workers)")
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    print("\ndone: broker and workers stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
