"""``python -m bench.fuzz`` (``make fuzz``): a million or more hostile inputs, with the counts.

Runs the fuzz suite (``tests/fuzz``) with raised counts and, by default, a new seed:

- over real sockets (``tests/fuzz/test_broker_fuzz.py``): a real broker process and a real
  worker process; random and mutated messages on both ports from client-port peers and from
  worker-port peers before and after READY (and ones naming the real worker's instance),
  interleaved with valid requests from the real client and a raw witness client;
- in-process: the same mutator's frames straight into every decoder, and hypothesis's own
  generators (``tests/fuzz/test_decoders.py``).

Prints: inputs sent over the sockets and in-process, broker exits (must be 0), valid requests
and their correct replies (must be equal: exactly one each), the broker's RSS at the start and
the end. Exit status: pytest's (non-zero if any check failed).

    python -m bench.fuzz                       # 800,000 over sockets + 220,000 in-process, new seed
    python -m bench.fuzz --fixed               # the fixed seed `make test` uses, at these counts
    python -m bench.fuzz --socket 100000 --in-process 20000 --decoder-examples 500
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", type=int, default=800_000, help="hostile messages over the sockets (about)")
    ap.add_argument("--examples", type=int, default=400, help="hypothesis examples for the socket run")
    ap.add_argument("--in-process", type=int, default=220_000, help="mutated frames fed to the decoders")
    ap.add_argument("--decoder-examples", type=int, default=1000,
                    help="hypothesis examples per in-process decoder test (3 tests)")
    ap.add_argument("--fixed", action="store_true", help="the fixed seed of `make test` instead of a new one")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.jsonl"
        env = {
            **os.environ,
            "ZROUTER_FUZZ_SOCKET_EXAMPLES": str(args.examples),
            "ZROUTER_FUZZ_SOCKET_MESSAGES": str(max(1, args.socket // args.examples)),
            "ZROUTER_FUZZ_INPROCESS": str(args.in_process),
            "ZROUTER_FUZZ_EXAMPLES": str(args.decoder_examples),
            "ZROUTER_FUZZ_RANDOM": "0" if args.fixed else "1",
            "ZROUTER_FUZZ_REPORT": str(report),
        }
        started = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=1800",
                              "tests/fuzz"], cwd=REPO, env=env)
        seconds = time.monotonic() - started
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    sock = next((r for r in rows if r["test"] == "broker_fuzz"), None)
    mutated = next((r for r in rows if r["test"] == "in_process_mutated"), None)
    hyp = 3 * args.decoder_examples
    total = (sock["hostile_messages"] if sock else 0) + (mutated["inputs"] if mutated else 0)
    print(f"fuzz run: {seconds:.0f} s, seed {'fixed' if args.fixed else 'new'}, pytest exit status {rc}")
    if sock:
        print(f"  over sockets:   {sock['hostile_messages']:>10,} hostile messages from {sock['hostile_peers']:,} peers "
              f"in {sock['examples']} examples ({sock['seconds']} s)")
        print(f"                  {sock['answers_to_hostile']:>10,} answers read back by hostile peers")
        print(f"  valid traffic:  {sock['valid_requests']:>10,} requests, {sock['valid_replies']:,} correct replies "
              "(exactly one each)")
        print(f"  broker exits:   {sock['broker_exits']:>10}")
        print(f"  broker RSS:     {sock['rss_start_kb'] / 1024:>10.1f} MiB at start, {sock['rss_end_kb'] / 1024:.1f} MiB "
              "at end")
    else:
        print("  over sockets:   no report (the socket test failed before reporting: see pytest's output)")
    if mutated:
        print(f"  in-process:     {mutated['inputs']:>10,} mutated frames into 5 decoders each "
              f"({mutated['accepted']:,} decodes accepted, all within limits)")
    print(f"  hypothesis:     {hyp:>10,} more generated inputs to the decoders (up to; 3 tests)")
    print(f"  total inputs:   {total:>10,} (+ {hyp:,} hypothesis)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
