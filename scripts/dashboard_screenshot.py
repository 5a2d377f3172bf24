"""Make docs/dashboard.png: a broker with a few workers under traffic, seen in headless Chromium.

    .venv/bin/python scripts/dashboard_screenshot.py [OUTPUT.png]

Starts a broker (``--http``, admin token), three ``echo`` workers (one then drained through the
admin API), two ``billing`` workers (one slow, a handler that sometimes fails), sends traffic
for a few seconds, and screenshots the dashboard with the system Chromium (scripts/get-chromium)
through Playwright. Everything runs on loopback and is stopped at the end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from zrouter.client import Client, ZRouterError  # noqa: E402
from zrouter.transport import free_tcp_endpoint  # noqa: E402

TOKEN = "screenshot"


def spawn(args: list[str]) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def wait_line(lines: list[str], pattern: str, count: int = 1, timeout: float = 20.0) -> re.Match[str]:
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m for m in map(rx.search, list(lines)) if m]
        if len(found) >= count:
            return found[0]
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {pattern!r}:\n{''.join(lines[-20:])}")


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "dashboard.png"
    front, back = free_tcp_endpoint(), free_tcp_endpoint()
    procs = []
    broker, blines = spawn(["-m", "zrouter.broker", "--frontend", front, "--backend", back, "--http", "127.0.0.1:0",
                            "--admin-token", TOKEN, "--policy", "p2c-ewma",
                            "--service-policy", "billing=weighted-least-outstanding"])  # fmt: skip
    procs.append(broker)
    try:
        url = wait_line(blines, r"HTTP on (http://[^/\s]+)/").group(1)
        workers = [("echo", "echo-7f3a", "zrouter.worker.examples:slow_echo", "8"),
                   ("echo", "echo-91c2", "zrouter.worker.examples:slow_echo", "8"),
                   ("echo", "echo-c40d", "zrouter.worker.examples:slow_echo", "4"),
                   ("billing", "billing-2b8e", "zrouter.worker.examples:slow_echo", "4"),
                   ("billing", "billing-e615", "zrouter.worker.examples:fail", "2")]  # fmt: skip
        for service, instance, handler, cap in workers:
            procs.append(spawn(["-m", "zrouter.worker", "--service", service, "--broker", back, "--capacity", cap,
                                "--meta", f"instance={instance}", handler])[0])  # fmt: skip
        wait_line(blines, r"worker \S+ joined", len(workers))
        stop = threading.Event()

        def load(service: str, delay: float, period: float) -> None:
            with Client(front, timeout=5) as c:
                while not stop.is_set():
                    pending = [c.submit(service, {"delay": delay}) for _ in range(8)]
                    for p in pending:
                        try:
                            p.result()
                        except ZRouterError:
                            pass
                    time.sleep(period)  # a steady, modest rate for the picture

        threads = [threading.Thread(target=load, args=a, daemon=True)
                   for a in (("echo", 0.002, 0.02), ("echo", 0.004, 0.03), ("billing", 0.01, 0.05))]  # fmt: skip
        for t in threads:
            t.start()
        time.sleep(2.0)
        req = urllib.request.Request(f"{url}/workers/echo-c40d/drain", method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        print(json.loads(urllib.request.urlopen(req, timeout=5).read()))
        time.sleep(6.0)

        from playwright.sync_api import sync_playwright

        chromium = subprocess.run([str(REPO / "scripts" / "get-chromium")], capture_output=True, text=True,
                                  check=True).stdout.strip()  # fmt: skip
        with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
            ctx = pw.chromium.launch_persistent_context(
                profile, executable_path=chromium, headless=True, viewport={"width": 1280, "height": 760},
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            )  # fmt: skip
            page = ctx.new_page()
            page.goto(url + "/")
            page.wait_for_selector('tr[data-instance="echo-c40d"][data-state="draining"]', timeout=10_000)
            time.sleep(1.5)  # two more pushes: sparklines drawn
            page.screenshot(path=str(out), full_page=True)
            ctx.close()
        stop.set()
        print(f"wrote {out}")
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
