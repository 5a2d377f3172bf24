"""Helpers for the observability tests: brokers with an HTTP side, HTTP calls, the real tools.

``find_tool`` gives the Prometheus server and Chromium the way tests/consul_agent.py gives
Consul: ``$PROMETHEUS_BIN`` / ``$CHROMIUM_BIN`` when set, else what scripts/get-prometheus /
scripts/get-chromium print (they fetch or install it the first time). Never a skip: without
the tool the test fails and says how to get it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.procs import BrokerProc, ProcessGroup, WorkerProc

__all__ = ["Samples", "broker_with_http", "find_tool", "http", "scrape", "worker_with_http"]

REPO = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@functools.cache
def find_tool(env: str, script: str) -> str:
    path = os.environ.get(env)
    if path and os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    proc = subprocess.run([str(REPO / "scripts" / script)], capture_output=True, text=True, timeout=900, check=False)
    out = proc.stdout.strip()
    if proc.returncode != 0 or not out:
        raise AssertionError(f"scripts/{script} failed (set {env}, or run `make test`):\n{proc.stderr[-2000:]}")
    return out


def _url_from_log(proc: BrokerProc | WorkerProc, pattern: str) -> str:
    proc.wait_for(pattern)
    rx = re.compile(pattern)
    for line in proc.lines:
        m = rx.search(line)
        if m:
            return m.group(1)
    raise AssertionError(f"{pattern!r} not in the log")


def broker_with_http(procs: ProcessGroup, *extra: str) -> tuple[BrokerProc, str]:
    """A broker serving HTTP on a free loopback port; (broker, "http://127.0.0.1:PORT")."""
    broker = procs.broker("--http", "127.0.0.1:0", *extra)
    return broker, _url_from_log(broker, r"HTTP on (http://[^/\s]+)/")


def worker_with_http(procs: ProcessGroup, broker: BrokerProc, instance: str, **kw: Any) -> tuple[WorkerProc, str]:
    extra = ["--meta", f"instance={instance}", "--http", "127.0.0.1:0", *kw.pop("extra", ())]
    w = procs.worker(broker, extra=extra, **kw)
    return w, _url_from_log(w, r"worker metrics on (http://[^/\s]+)/metrics")


def http(method: str, url: str, body: Any = None, token: str | None = None,
         raw: bytes | None = None, timeout: float = 10.0) -> tuple[int, Any, dict[str, str]]:
    """(status, decoded JSON or text, headers) of one request; never raises for 4xx/5xx."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload, headers = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        status, payload, headers = exc.code, exc.read(), dict(exc.headers)
    ctype = headers.get("Content-Type", "")
    return status, json.loads(payload) if "json" in ctype else payload.decode(), headers


def scrape(url: str) -> Samples:
    """Every sample of ``GET url/metrics`` as {(name, sorted labels): value}."""
    status, text, headers = http("GET", url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain"), (status, headers)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}
