"""``python -m bench.codec``: what checking every header field costs on the broker's hot path.

Compares, in one process, the validating ``zrouter.protocol.decode_request`` with the unchecked
decode the broker used before it (msgpack, then a few ``type()`` tests, fields by position), on
the same REQUEST header. Timings on a shared 2-core machine swing; for a repeatable figure, count
instructions instead:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.codec --calls 20000 --only checked
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.codec --calls 20000 --only unchecked
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.codec --calls 0

and divide the differences by the number of calls.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import msgpack

from zrouter import protocol as p

__all__ = ["main"]


def _unchecked(frame: Any) -> int:
    """The broker's decode before the validating decoders (kept here only as the baseline)."""
    header = msgpack.unpackb(frame)
    _, rid, service, timeout_ms, attempt, flags, _key = header[:7]
    if (header[0] != p.REQUEST or type(rid) is not int or type(service) is not str
            or type(timeout_ms) is not int or timeout_ms <= 0 or type(flags) is not int
            or type(attempt) is not int):
        raise ValueError("bad request")
    return rid  # type: ignore[no-any-return]


def _checked(frame: Any) -> int:
    return p.decode_request(frame).rid


def _time(fn: Callable[[Any], int], frame: Any, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(frame)
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300_000)
    ap.add_argument("--only", choices=["checked", "unchecked"], help="run one variant (for callgrind)")
    args = ap.parse_args(argv)
    frame = memoryview(p.encode_request(12345, "echo", 5000, 0, p.FLAG_IDEMPOTENT, None))
    variants = {"unchecked": _unchecked, "checked": _checked}
    if args.only:
        for _ in range(args.calls):
            variants[args.only](frame)
        return 0
    for name, fn in variants.items():
        best = min(_time(fn, frame, args.calls) for _ in range(5))
        print(f"{name:>9}: {best:.2f} µs per REQUEST header (best of 5 x {args.calls:,})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
