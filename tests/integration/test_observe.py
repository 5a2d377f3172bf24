"""Observing and steering a running broker: /metrics after known traffic, /status through a
worker's life, admin actions with and without the token, zrouter-status, JSON logs, and a
worker's own metrics. Real broker and worker processes, real sockets, real HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
import zmq

from tests.observe_helpers import broker_with_http, http, scrape, worker_with_http
from tests.procs import ProcessGroup
from zrouter import protocol as p
from zrouter.client import Client, RemoteError, ServiceUnavailable
from zrouter.transport import recv_frames

pytestmark = pytest.mark.timeout(60)
TOKEN = "t0ken-for-tests"


def L(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def worker_doc(url: str, instance: str) -> dict[str, Any] | None:
    _, doc, _ = http("GET", url + "/status")
    for svc in doc["services"]:
        for w in svc["workers"]:
            if w["instance"] == instance:
                return dict(w, service=svc["name"])
    return None


def test_metrics_after_known_traffic(procs: ProcessGroup, ctx: zmq.Context[Any]) -> None:
    broker, url = broker_with_http(procs, "--grace", "0.2")
    _, ok_url = worker_with_http(procs, broker, "obs-ok", service="obs", capacity=4)
    _, boom_url = worker_with_http(procs, broker, "obs-boom", service="boom",
                                   handler="zrouter.worker.examples:fail")  # fmt: skip
    broker.wait_workers(2)
    with Client(broker.frontend, timeout=10) as client:
        for i in range(20):
            client.request("obs", i)
        for _ in range(3):
            with pytest.raises(RemoteError):
                client.request("boom", 1)
        with pytest.raises(ServiceUnavailable):
            client.request("nobody-serves-this", 1)
    raw = ctx.socket(zmq.DEALER)
    raw.connect(broker.frontend)
    raw.send_multipart([p.SIGNATURE, b"\xc1 not msgpack", b""])
    assert raw.poll(5000)
    assert msgpack_status(recv_frames(raw)) == p.STATUS_BAD_REQUEST
    raw.close(0)

    m = scrape(url)
    assert m[("zrouter_requests_total", L(service="obs", status="ok"))] == 20
    assert m[("zrouter_requests_total", L(service="obs", status="remote_error"))] == 0
    assert m[("zrouter_requests_total", L(service="boom", status="remote_error"))] == 3
    assert m[("zrouter_requests_total", L(service="nobody-serves-this", status="unavailable"))] == 1
    assert m[("zrouter_requests_total", L(service="", status="bad_request"))] == 1
    assert m[("zrouter_request_duration_seconds_count", L(service="obs"))] == 20
    assert m[("zrouter_request_duration_seconds_bucket", L(service="obs", le="+Inf"))] == 20
    assert 0 < m[("zrouter_request_duration_seconds_sum", L(service="obs"))] < 20 * 1.0
    assert m[("zrouter_queue_wait_seconds_count", L(service="obs"))] == 20
    assert m[("zrouter_queue_depth", L(service="obs"))] == 0
    assert m[("zrouter_workers", L(service="obs", state="ready"))] == 1
    assert m[("zrouter_worker_capacity", L(service="obs", instance="obs-ok"))] == 4
    assert m[("zrouter_worker_inflight", L(service="obs", instance="obs-ok"))] == 0
    assert m[("zrouter_requeued_total", L(service="obs"))] == 0
    assert m[("zrouter_late_replies_total", ())] == 0
    assert m[("zrouter_bad_messages_total", L(port="frontend", kind="not_msgpack"))] == 1
    assert m[("process_cpu_seconds_total", ())] > 0

    # The workers' own metrics: handler timings and errors by exception type.
    w = scrape(ok_url)
    assert w[("zrouter_handler_duration_seconds_count", L(service="obs"))] == 20
    assert w[("zrouter_handler_inflight", L(service="obs"))] == 0
    assert w[("zrouter_handler_capacity", L(service="obs"))] == 4
    b = scrape(boom_url)
    assert b[("zrouter_handler_errors_total", L(service="boom", type="ValueError"))] == 3


def msgpack_status(frames: list[zmq.Frame]) -> int:
    header = p.decode_header(frames[1].buffer)
    return int(header[2])


def test_status_follows_a_worker_through_join_drain_kill_and_return(procs: ProcessGroup) -> None:
    broker, url = broker_with_http(procs, "--admin-token", TOKEN)
    first = procs.worker(broker, service="life", capacity=3, extra=["--meta", "instance=life-a"])
    broker.wait_workers(1)
    w = worker_doc(url, "life-a")
    assert w is not None and w["service"] == "life" and w["state"] == "ready"
    assert w["capacity"] == 3 and w["inflight"] == 0 and w["weight"] == 1 and w["served"] == 0
    assert w["pid"] == str(first.pid) and w["seconds_since_heartbeat"] < 2
    with Client(broker.frontend, timeout=10) as client:
        for i in range(5):
            client.request("life", i)
    w = worker_doc(url, "life-a")
    assert w is not None and w["served"] == 5 and w["latency_ewma_seconds"] > 0
    _, doc, _ = http("GET", url + "/status")
    svc = next(s for s in doc["services"] if s["name"] == "life")
    assert svc["live"] and svc["policy"] == "least-outstanding" and svc["requests"]["ok"] == 5
    assert svc["workers_by_state"]["ready"] == 1

    status, _, _ = http("POST", f"{url}/workers/life-a/drain", token=TOKEN)
    assert status == 200
    assert (worker_doc(url, "life-a") or {}).get("state") == "draining"

    first.kill()
    broker.wait_for(r"worker life-a left service 'life' \(connection closed\)")
    assert worker_doc(url, "life-a") is None

    again = procs.worker(broker, service="life", capacity=3, extra=["--meta", "instance=life-a"])
    broker.wait_workers(2)
    w = worker_doc(url, "life-a")
    assert w is not None and w["state"] == "ready" and w["served"] == 0 and w["pid"] == str(again.pid)


def test_admin_actions_need_the_token_and_a_good_body(procs: ProcessGroup) -> None:
    broker, url = broker_with_http(procs, "--admin-token", TOKEN)
    procs.worker(broker, service="adm", extra=["--meta", "instance=adm-a"])
    broker.wait_workers(1)
    drain = f"{url}/workers/adm-a/drain"

    for token in (None, "wrong"):
        status, doc, headers = http("POST", drain, token=token)
        assert status == 401 and "Bearer" in doc["error"] and headers["WWW-Authenticate"].startswith("Bearer")
        status, _, _ = http("PUT", f"{url}/workers/adm-a/weight", {"weight": 9}, token=token)
        assert status == 401
    assert (worker_doc(url, "adm-a") or {})["state"] == "ready"  # nothing happened
    assert (worker_doc(url, "adm-a") or {})["weight"] == 1

    status, doc, _ = http("PUT", f"{url}/workers/adm-a/weight", {"weight": 5}, token=TOKEN)
    assert status == 200 and doc == {"instance": "adm-a", "service": "adm", "weight": 5.0, "admin_weight": 5.0}
    assert (worker_doc(url, "adm-a") or {})["weight"] == 5
    for body in ({"weight": "x"}, {"weight": -1}, {"weight": True}, {}, [5]):
        status, doc, _ = http("PUT", f"{url}/workers/adm-a/weight", body, token=TOKEN)
        assert status == 400 and doc["error"], body
    status, _, _ = http("PUT", f"{url}/workers/adm-a/weight", raw=b"{not json", token=TOKEN)
    assert status == 400
    status, _, _ = http("PUT", f"{url}/workers/adm-a/weight", raw=b" " * (64 * 1024 + 1), token=TOKEN)
    assert status == 413
    status, doc, _ = http("PUT", f"{url}/workers/nobody/weight", {"weight": 1}, token=TOKEN)
    assert status == 404 and "nobody" in doc["error"]

    status, doc, _ = http("PUT", f"{url}/services/adm/policy", {"policy": "round-robin"}, token=TOKEN)
    assert status == 200 and doc == {"service": "adm", "policy": "round-robin", "previous": "least-outstanding"}
    _, st, _ = http("GET", url + "/status")
    assert next(s for s in st["services"] if s["name"] == "adm")["policy"] == "round-robin"
    status, _, _ = http("PUT", f"{url}/services/adm/policy", {"policy": "fastest"}, token=TOKEN)
    assert status == 400
    status, _, _ = http("PUT", f"{url}/services/nope/policy", {"policy": "random"}, token=TOKEN)
    assert status == 404

    status, _, _ = http("POST", f"{url}/workers/nobody/drain", token=TOKEN)
    assert status == 404
    status, doc, _ = http("POST", drain, token=TOKEN)
    assert status == 200 and doc["state"] == "draining"
    with Client(broker.frontend, timeout=10) as client, pytest.raises(ServiceUnavailable):
        client.request("adm", 1, timeout=3)  # drained: nobody takes new work (grace, then unavailable)

    assert http("GET", drain)[0] == 405
    assert http("POST", f"{url}/workers/adm-a/explode", token=TOKEN)[0] == 404
    assert http("GET", f"{url}/no/such/page")[0] == 404
    for pattern in (r"admin weight adm-a .*: 200", r"admin policy adm .*: 200", r"admin drain adm-a .*: 200",
                    r"refused: bad or missing token", r"admin weight nobody .*: 404"):
        assert broker.count(pattern) >= 1, pattern

    # Admin off (no token): every admin action is refused, whatever the header says.
    _, plain = broker_with_http(procs)
    status, doc, _ = http("POST", f"{plain}/workers/adm-a/drain", token=TOKEN)
    assert status == 403 and "--admin-token" in doc["error"]


def test_zrouter_status_and_the_event_stream_show_the_instance_list(procs: ProcessGroup) -> None:
    broker, url = broker_with_http(procs)
    procs.worker(broker, service="cli", capacity=2, extra=["--meta", "instance=cli-a"])
    broker.wait_workers(1)
    cmd = [sys.executable, "-m", "zrouter.broker.status_cli", "--url", url]
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    row = next(line for line in table.splitlines() if "cli-a" in line).split()
    assert row[:4] == ["cli", "cli-a", "ready", "0/2"]
    doc = json.loads(subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=30, check=True).stdout)
    assert [w["instance"] for s in doc["services"] for w in s["workers"]] == ["cli-a"]
    down = subprocess.run([*cmd[:-1], "127.0.0.1:1"], capture_output=True, text=True, timeout=30, check=False)
    assert down.returncode == 1 and "cannot read" in down.stderr

    # What the dashboard reads: the same document, pushed (server-sent events).
    with urllib.request.urlopen(url + "/events", timeout=10) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        docs = []
        while len(docs) < 2:  # the first at once, the next a second later
            line = resp.readline().decode()
            if line.startswith("data: "):
                docs.append(json.loads(line[6:]))
    for doc in docs:
        assert [w["instance"] for s in doc["services"] for w in s["workers"]] == ["cli-a"]
    assert docs[1]["broker"]["time"] > docs[0]["broker"]["time"]


def test_json_logs_parse_line_by_line(procs: ProcessGroup) -> None:
    broker = procs.broker("--log-format", "json")
    worker = procs.worker(broker, service="jl", extra=["--meta", "instance=jl-a", "--log-format", "json"])
    broker.wait_for(r'"event": "worker jl-a joined')
    with Client(broker.frontend, timeout=10) as client:
        client.request("jl", 1)
    worker.stop()
    broker.wait_for(r"worker jl-a left")
    broker.stop()
    for proc in (broker, worker):
        lines = [json.loads(line) for line in proc.lines if line.strip()]  # every line is one JSON object
        assert lines, proc.name
        for doc in lines:
            assert {"ts", "level", "logger", "event"} <= set(doc), doc
    joined = next(d for d in map(json.loads, broker.lines) if "joined" in d["event"])
    assert joined["service"] == "jl" and joined["instance"] == "jl-a" and joined["level"] == "info"
    for doc in map(json.loads, worker.lines):
        assert doc["service"] == "jl" and doc.get("instance", "jl-a") == "jl-a"
    assert any(json.loads(line).get("instance") == "jl-a" for line in worker.lines)
