"""The worker's handler metrics, JSON log lines and the zrouter-status table, without processes."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from zrouter.broker.status_cli import format_table
from zrouter.logfmt import JsonFormatter, configure_logging
from zrouter.worker._http import HandlerMetrics, parse_hostport


def samples(metrics: HandlerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(generate_latest(registry).decode()) for s in fam.samples}


def test_handler_metrics_count_calls_errors_and_in_flight_across_threads() -> None:
    metrics = HandlerMetrics("svc", capacity=4)
    inside = threading.Event()
    release = threading.Event()

    def handler(payload: Any) -> Any:
        if payload == "block":
            inside.set()
            release.wait(5)
        if payload == "bad":
            raise KeyError(payload)
        return payload

    timed = metrics.wrap(handler, is_async=False)
    threads = [threading.Thread(target=lambda: [timed(i) for i in range(50)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in range(3):
        with pytest.raises(KeyError):
            timed("bad")
    blocker = threading.Thread(target=timed, args=("block",))
    blocker.start()
    assert inside.wait(5)
    s = samples(metrics)
    svc = (("service", "svc"),)
    assert s[("zrouter_handler_duration_seconds_count", svc)] == 203  # every call counted, none lost
    assert s[("zrouter_handler_errors_total", (("service", "svc"), ("type", "KeyError")))] == 3
    assert s[("zrouter_handler_inflight", svc)] == 1
    assert s[("zrouter_handler_capacity", svc)] == 4
    release.set()
    blocker.join()
    assert samples(metrics)[("zrouter_handler_inflight", svc)] == 0


def test_handler_metrics_wrap_a_coroutine_as_a_coroutine() -> None:
    metrics = HandlerMetrics("svc", capacity=1)

    async def handler(payload: Any) -> Any:
        await asyncio.sleep(0)
        if payload is None:
            raise ValueError("none")
        return payload

    timed = metrics.wrap(handler, is_async=True)
    assert asyncio.iscoroutinefunction(timed)
    assert asyncio.run(timed(3)) == 3
    with pytest.raises(ValueError):
        asyncio.run(timed(None))
    s = samples(metrics)
    assert s[("zrouter_handler_duration_seconds_count", (("service", "svc"),))] == 2
    assert s[("zrouter_handler_errors_total", (("service", "svc"), ("type", "ValueError")))] == 1


def test_hostport_parsing() -> None:
    assert parse_hostport("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_hostport("[::1]:9100") == ("::1", 9100)
    for bad in ("9100", "host:", "host:99999", ":80"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


def test_json_log_lines_have_the_stable_keys() -> None:
    # configure_logging replaces the root handlers; put pytest's back afterwards, since a handler
    # on this test's captured stderr would outlive the capture and fail later tests' log calls.
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    formatter = configure_logging("INFO", "json", static={"service": "svc"},
                                  context=lambda: {"rid": 7}, stream=stream)  # fmt: skip
    assert isinstance(formatter, JsonFormatter)
    formatter.static["instance"] = "svc-1"
    log = logging.getLogger("zrouter.test")
    try:
        log.info("hello %s", "world")
        log.info("other", extra={"service": "billing", "instance": "b-2"})
        try:
            raise RuntimeError("x")
        except RuntimeError:
            log.exception("failed")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 3
    first = lines[0]
    assert first["event"] == "hello world" and first["level"] == "info" and first["logger"] == "zrouter.test"
    assert first["service"] == "svc" and first["instance"] == "svc-1" and first["rid"] == 7
    assert first["ts"].endswith("Z") and first["ts"][10] == "T"
    assert lines[1]["service"] == "billing" and lines[1]["instance"] == "b-2"  # the call's own extra wins
    assert lines[2]["level"] == "error" and "RuntimeError: x" in lines[2]["exc"]
    with pytest.raises(ValueError):
        configure_logging("INFO", "xml")


def test_status_table_lists_services_and_workers() -> None:
    doc = {
        "broker": {"frontend": "tcp://f", "backend": "tcp://b", "version": "1", "uptime_seconds": 5.0,
                   "inflight": 1, "consul": {"enabled": False, "up": None}},
        "services": [{
            "name": "echo", "live": True, "policy": "round-robin", "queue_depth": 0,
            "workers_by_state": {"ready": 1, "draining": 1},
            "last_minute": {"rate": 12.5, "error_rate": 0.0, "p50_seconds": 0.0004, "p99_seconds": 0.02},
            "workers": [
                {"instance": "echo-a", "state": "ready", "inflight": 1, "capacity": 8, "weight": 2.0,
                 "admin_weight": 2.0, "latency_ewma_seconds": 0.0005, "seconds_since_heartbeat": 0.3,
                 "served": 10, "host": "h", "pid": "1"},
                {"instance": "echo-b", "state": "draining", "inflight": 0, "capacity": 8, "weight": 1.0,
                 "admin_weight": None, "latency_ewma_seconds": 0.0, "seconds_since_heartbeat": 0.1,
                 "served": 3, "host": "h", "pid": "2"},
            ],
        }],
    }  # fmt: skip
    text = format_table(doc)
    lines = text.splitlines()
    assert any(line.split()[:3] == ["echo", "round-robin", "0"] and "12.5" in line for line in lines)
    row_a = next(line for line in lines if "echo-a" in line).split()
    assert row_a[:5] == ["echo", "echo-a", "ready", "1/8", "2*"]
    assert "draining" in next(line for line in lines if "echo-b" in line)
    assert "set by an operator" in text
