"""``zrouter-status``: a running broker's live instance list, from its ``GET /status``.

    zrouter-status --url 127.0.0.1:8080            # one table
    zrouter-status --url 127.0.0.1:8080 --watch    # redrawn in place every second (Ctrl-C ends)
    zrouter-status --url 127.0.0.1:8080 --json     # the /status document, for scripts

The broker must run with ``--http``. Exit status: 0, or 1 when the broker cannot be reached
(the error goes to stderr; with ``--watch`` it is shown and retried).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["fetch_status", "format_table", "main"]

DEFAULT_URL = "http://127.0.0.1:8080"
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen: --watch redraws in place


def _base(url: str) -> str:
    url = url if "://" in url else f"http://{url}"
    return url.rstrip("/").removesuffix("/status")  # the /status address itself works too


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """The broker's ``/status`` document. OSError (URLError) when unreachable, ValueError for
    an answer that is not the JSON object expected."""
    with urllib.request.urlopen(_base(url) + "/status", timeout=timeout) as resp:
        doc = json.loads(resp.read())
    if not isinstance(doc, dict) or "services" not in doc:
        raise ValueError(f"{url} did not answer a zrouter /status document")
    return doc


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.2f}" if seconds < 0.01 else f"{seconds * 1000:.0f}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def format_table(doc: dict[str, Any]) -> str:
    """The instance list as text: one line per service, then one per worker."""
    b = doc["broker"]
    consul = b["consul"]
    lines = [
        f"broker {b['frontend']} (workers {b['backend']}), v{b['version']}, up {b['uptime_seconds']:.0f}s, "
        f"{b['inflight']} in flight; Consul: "
        + ("not used" if not consul["enabled"] else "up" if consul["up"] else "unreachable"),
        "",
    ]
    rows = [["SERVICE", "POLICY", "QUEUED", "REQ/S", "ERR/S", "P50MS", "P99MS", "WORKERS"]]
    for s in doc["services"]:
        if not s["live"]:
            continue
        m = s["last_minute"]
        states = ", ".join(f"{n} {k}" for k, n in s["workers_by_state"].items() if n) or "none"
        rows.append([s["name"], str(s["policy"]), str(s["queue_depth"]), f"{m['rate']:.1f}", f"{m['error_rate']:.2f}",
                     _ms(m["p50_seconds"]), _ms(m["p99_seconds"]), states])  # fmt: skip
    lines += _table(rows) if len(rows) > 1 else ["(no services)"]
    rows = [["SERVICE", "INSTANCE", "STATE", "INFLIGHT", "WEIGHT", "EWMA_MS", "HEARTBEAT_S", "SERVED", "HOST", "PID"]]
    for s in doc["services"]:
        for w in s["workers"]:
            weight = f"{w['weight']:g}" + ("*" if w["admin_weight"] is not None else "")
            rows.append([s["name"], w["instance"], w["state"], f"{w['inflight']}/{w['capacity']}", weight,
                         _ms(w["latency_ewma_seconds"]), f"{w['seconds_since_heartbeat']:.1f}", str(w["served"]),
                         w["host"], str(w["pid"])])  # fmt: skip
    lines.append("")
    lines += _table(rows) if len(rows) > 1 else ["(no workers)"]
    if any(r[4].endswith("*") for r in rows[1:]):
        lines.append("* weight set by an operator (PUT /workers/{instance}/weight)")
    return "\n".join(lines)


def _show(url: str, as_json: bool, out: TextIO) -> bool:
    try:
        doc = fetch_status(url)
    except (OSError, ValueError) as exc:
        print(f"zrouter-status: cannot read {_base(url)}/status: {exc}", file=sys.stderr)
        return False
    out.write(json.dumps(doc, indent=1) + "\n" if as_json else format_table(doc) + "\n")
    out.flush()
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zrouter-status", description="A running broker's live instance list.")
    p.add_argument("--url", default=os.environ.get("ZROUTER_HTTP", DEFAULT_URL), metavar="URL",
                   help="the broker's --http address, HOST:PORT or http://HOST:PORT "
                        f"(default: $ZROUTER_HTTP or {DEFAULT_URL})")  # fmt: skip
    p.add_argument("--watch", nargs="?", const=1.0, type=float, metavar="SECONDS",
                   help="redraw in place every SECONDS (default 1) until Ctrl-C")
    p.add_argument("--json", action="store_true", help="print the /status JSON document instead of a table")
    args = p.parse_args(argv)
    if args.watch is None:
        return 0 if _show(args.url, args.json, sys.stdout) else 1
    if args.watch <= 0:
        p.error("--watch wants a positive number of seconds")
    try:
        while True:
            if not args.json and sys.stdout.isatty():
                sys.stdout.write(_CLEAR)
            _show(args.url, args.json, sys.stdout)
            time.sleep(args.watch)  # a terminal refresh period, not synchronisation
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
