"""Observing and steering with Consul as the source of truth: a real agent, a real broker and
worker. The worker's Consul state shows in /status and /metrics, and Consul's next verdict
replaces an operator's weight (README, "Operating it")."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.consul_agent import ConsulAgent
from tests.observe_helpers import broker_with_http, http, scrape
from tests.helpers import unique
from tests.procs import ProcessGroup

pytestmark = [pytest.mark.consul, pytest.mark.timeout(90)]
TOKEN = "consul-admin"


def worker_doc(url: str, instance: str) -> dict[str, Any]:
    _, doc, _ = http("GET", url + "/status")
    found = [w for s in doc["services"] for w in s["workers"] if w["instance"] == instance]
    assert len(found) == 1, doc
    return dict(found[0], consul=doc["broker"]["consul"])


def test_consul_verdicts_show_and_replace_an_operators_weight(procs: ProcessGroup, consul_agent: ConsulAgent) -> None:
    svc, inst = unique("obsc"), unique("obsc-a")
    broker, url = broker_with_http(procs, "--consul", consul_agent.http_addr, "--admin-token", TOKEN,
                                   "--broker-service", unique("zb"))  # fmt: skip
    worker = procs.worker(broker, service=svc, extra=["--consul", consul_agent.http_addr, "--meta", f"instance={inst}"])
    pattern = r"registered in Consul at \S+ as (\S+)"
    worker.wait_for(pattern)
    service_id = next(m.group(1) for m in map(re.compile(pattern).search, worker.lines) if m)
    broker.wait_for(rf"worker {inst}: Consul says passing: routable, weight 1")
    w = worker_doc(url, inst)
    assert w["state"] == "ready" and w["consul"] == {"enabled": True, "up": True}

    status, _, _ = http("PUT", f"{url}/workers/{inst}/weight", {"weight": 5}, token=TOKEN)
    assert status == 200 and worker_doc(url, inst)["weight"] == 5

    out = consul_agent.cli("maint", "-enable", f"-service={service_id}", "-reason=test")
    assert out.returncode == 0, out.stderr
    broker.wait_for(rf"worker {inst}: Consul says critical \(maintenance\): no new work")
    w = worker_doc(url, inst)
    assert w["state"] == "maintenance" and w["admin_weight"] is None  # Consul's verdict replaced it
    assert broker.count(rf"worker {inst}: Consul's new verdict replaces the weight 5") == 1
    m = scrape(url)
    assert m[("zrouter_workers", (("service", svc), ("state", "maintenance")))] == 1
    assert m[("zrouter_consul_up", ())] == 1

    out = consul_agent.cli("maint", "-disable", f"-service={service_id}")
    assert out.returncode == 0, out.stderr
    broker.wait_for(rf"worker {inst}: Consul says passing: routable, weight 1", count=2)
    w = worker_doc(url, inst)
    assert w["state"] == "ready" and w["weight"] == 1 and w["admin_weight"] is None
