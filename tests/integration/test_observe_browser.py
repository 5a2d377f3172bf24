"""The dashboard in a real headless browser: Debian's Chromium (scripts/get-chromium) driven
by Playwright. A worker that joins appears, and is gone once it is killed, without a reload.

Playwright's own browser download (`playwright install`) is never used: the system Chromium is
launched as its executable, with a fresh profile, and every network feature that would reach
beyond loopback turned off.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.observe_helpers import broker_with_http, find_tool
from tests.procs import ProcessGroup
from zrouter.client import Client

pytestmark = pytest.mark.timeout(90)

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = find_tool("CHROMIUM_BIN", "get-chromium")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 720},
        )  # fmt: skip
        try:
            yield context.new_page()
        finally:
            context.close()


def test_dashboard_shows_a_worker_join_and_go_without_a_reload(procs: ProcessGroup, page: Any) -> None:
    broker, url = broker_with_http(procs)
    procs.worker(broker, service="shop", capacity=4, extra=["--meta", "instance=shop-steady"])
    broker.wait_workers(1)
    page.goto(url + "/")
    page.wait_for_selector('#conn.live', timeout=10_000)
    page.wait_for_selector('tr[data-instance="shop-steady"]', timeout=10_000)
    assert page.locator('tr[data-instance="shop-new"]').count() == 0

    newcomer = procs.worker(broker, service="shop", capacity=2, extra=["--meta", "instance=shop-new"])
    broker.wait_workers(2)
    row = page.wait_for_selector('tr[data-instance="shop-new"]', timeout=10_000)
    assert row is not None and "ready" in row.inner_text() and "0 / 2" in row.inner_text()
    with Client(broker.frontend, timeout=10) as client:
        for i in range(40):
            client.request("shop", i)
    if os.environ.get("ZROUTER_SCREENSHOT"):  # docs/dashboard.png: ZROUTER_SCREENSHOT=1 pytest this test
        page.wait_for_function("document.querySelector('.fig .v').textContent !== '0.0'", timeout=10_000)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

    newcomer.kill()
    broker.wait_for(r"worker shop-new left service 'shop' \(connection closed\)")
    page.wait_for_selector('tr[data-instance="shop-new"]', state="detached", timeout=10_000)
    # Same page, never reloaded: the other worker is still listed and the stream still live.
    assert page.locator('tr[data-instance="shop-steady"]').count() == 1
    assert page.locator("#conn").inner_text() == "live"
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
