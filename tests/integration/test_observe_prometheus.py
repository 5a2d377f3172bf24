"""A real Prometheus server scrapes a real broker: what it stores is what the broker counted.

Prometheus (Debian's package, scripts/get-prometheus) runs on a free loopback port with a
generated config that scrapes the broker's /metrics every 200 ms; the test sends a known
number of requests and asks Prometheus's HTTP API for ``zrouter_requests_total``.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.consul_agent import free_port
from tests.observe_helpers import broker_with_http, find_tool
from tests.helpers import eventually
from tests.procs import ProcessGroup
from zrouter.client import Client

pytestmark = pytest.mark.timeout(90)


class Prometheus:
    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 200ms\n  scrape_timeout: 150ms\n"
            "scrape_configs:\n  - job_name: zrouter-broker\n    honor_labels: true\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.workdir = workdir

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as resp:
            return json.loads(resp.read()) if "json" in resp.headers.get("Content-Type", "") else resp.read()

    def ready(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited:\n" + (self.workdir / "prometheus.log").read_text()[-3000:]
        try:
            self.get("/-/ready")
            return True
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        doc = self.get("/api/v1/query", query=expr)
        assert doc["status"] == "success", doc
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
def prometheus_bin() -> str:
    return find_tool("PROMETHEUS_BIN", "get-prometheus")


@pytest.fixture
def broker_url(procs: ProcessGroup) -> Iterator[tuple[str, str]]:
    broker, url = broker_with_http(procs)
    procs.worker(broker, service="prom", capacity=4, handler="zrouter.worker.examples:echo",
                 extra=["--meta", "instance=prom-a"])
    broker.wait_workers(1)
    yield broker.frontend, url


def test_prometheus_scrapes_the_request_count(prometheus_bin: str, broker_url: tuple[str, str], tmp_path: Path) -> None:
    frontend, url = broker_url
    prom = Prometheus(prometheus_bin, url.removeprefix("http://"), tmp_path)
    try:
        eventually(prom.ready, timeout=30, what="Prometheus ready")
        with Client(frontend, timeout=10) as client:
            pending = [client.submit("prom", i) for i in range(37)]
            assert [x.result() for x in pending] == list(range(37))
        expr = 'zrouter_requests_total{service="prom",status="ok"}'

        def stored() -> float | None:
            result = prom.query(expr)
            return float(result[0]["value"][1]) if result and float(result[0]["value"][1]) == 37 else None

        assert eventually(stored, timeout=20, what=f"{expr} == 37 in Prometheus") == 37
        up = prom.query('up{job="zrouter-broker"}')
        assert [float(r["value"][1]) for r in up] == [1.0]
        # The other families reach Prometheus too: histograms and per-worker gauges.
        count = prom.query('zrouter_request_duration_seconds_count{service="prom"}')
        assert float(count[0]["value"][1]) == 37
        cap = prom.query('zrouter_worker_capacity{service="prom",instance="prom-a"}')
        assert float(cap[0]["value"][1]) == 4
        # Every query of docs/grafana-dashboard.json parses and finds data, with Grafana's
        # variables filled in as Grafana would.
        dashboard = json.loads((Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = (target["expr"].replace("$__rate_interval", "10s").replace("$service", ".*")
                        .replace("$job", ".*"))  # fmt: skip
                if "consul" in expr or "late_replies" in expr or "bad_messages" in expr:
                    prom.query(expr)  # parses (no data: nothing of the kind happened)
                else:  # a rate needs two scrapes in its window: they come within a second
                    eventually(lambda e=expr: prom.query(e), timeout=10, what=f"{panel['title']}: {expr}")
    finally:
        prom.stop()
