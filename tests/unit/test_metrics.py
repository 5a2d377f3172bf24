"""The broker's metrics without sockets: the router's counters after known traffic, the
snapshot, the Prometheus families, quantiles, admin operations, and their bounds."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from zrouter import protocol as p
from zrouter.broker.counters import BOUNDS, MAX_SERVICES, OTHER_SERVICE, Histogram, quantile
from zrouter.broker.metrics import BrokerCollector, take_snapshot
from zrouter.broker.router import Router
from zrouter.broker.state import WorkerState
from zrouter.consul import Instance


class Sink:
    def __init__(self) -> None:
        self.to_workers: list[tuple[bytes, list[Any]]] = []
        self.to_clients: list[list[Any]] = []

    def to_worker(self, ident: bytes, header: bytes, payload: Any) -> bool:
        self.to_workers.append((ident, msgpack.unpackb(header)))
        return True

    def to_client(self, client: bytes, header: bytes, payload: Any) -> None:
        self.to_clients.append(msgpack.unpackb(header))

    def rids(self, ident: bytes) -> list[int]:
        return [h[1] for i, h in self.to_workers if i == ident and h[0] == p.REQUEST]


def make(**kw: Any) -> tuple[Router, Sink]:
    sink = Sink()
    return Router(sink, rng=random.Random(1), **kw), sink


def ready(r: Router, name: str, capacity: int = 2, service: str = "svc", now: float = 0.0) -> WorkerState:
    return r.worker_ready(name.encode(), p.Ready(service, capacity, 1, {"instance": name, "host": "h", "pid": "7"}), now)


def send(r: Router, crid: int, now: float, service: str = "svc", timeout_ms: int = 10_000, flags: int = 0) -> None:
    r.request(b"c", crid, service, timeout_ms, 0, flags, None, b"x", now)


def scrape(r: Router, consul: Any = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape as {(name, sorted labels): value}, through the text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(lambda: take_snapshot(r, consul)))
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def L(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def test_counters_and_histograms_after_known_traffic() -> None:
    r, sink = make(grace=0.5)
    ready(r, "w1", capacity=1)
    for crid in range(3):  # one dispatched at once, two queued behind the single credit
        send(r, crid, now=0.0)
    r.worker_reply(r.workers[b"w1"], sink.rids(b"w1")[0], p.STATUS_OK, 0, None, None, b"", 0.002)  # 2 ms
    r.worker_reply(r.workers[b"w1"], sink.rids(b"w1")[1], p.STATUS_REMOTE_ERROR, 0, "boom", "ValueError", b"", 0.030)
    r.worker_reply(r.workers[b"w1"], sink.rids(b"w1")[2], p.STATUS_OK, 0, None, None, b"", 0.031)
    r.worker_reply(r.workers[b"w1"], 999, p.STATUS_OK, 0, None, None, b"", 0.032)  # matches nothing: late
    send(r, 10, now=1.0, service="nobody")
    r.expire(1.6)  # grace over, nobody serves it: unavailable
    r.count_status("", p.STATUS_BAD_REQUEST)
    r.count_bad("frontend", "malformed")

    m = scrape(r)
    assert m[("zrouter_requests_total", L(service="svc", status="ok"))] == 2
    assert m[("zrouter_requests_total", L(service="svc", status="remote_error"))] == 1
    assert m[("zrouter_requests_total", L(service="svc", status="timeout"))] == 0
    assert m[("zrouter_requests_total", L(service="nobody", status="unavailable"))] == 1
    assert m[("zrouter_requests_total", L(service="", status="bad_request"))] == 1
    assert ("zrouter_requests_total", L(service="svc", status="unknown")) not in m  # shown only once it happens
    assert m[("zrouter_request_duration_seconds_count", L(service="svc"))] == 3
    assert m[("zrouter_request_duration_seconds_sum", L(service="svc"))] == pytest.approx(0.002 + 0.030 + 0.031)
    assert m[("zrouter_request_duration_seconds_bucket", L(service="svc", le="0.0025"))] == 1  # the 2 ms one
    assert m[("zrouter_request_duration_seconds_bucket", L(service="svc", le="0.025"))] == 1
    assert m[("zrouter_request_duration_seconds_bucket", L(service="svc", le="0.05"))] == 3
    assert m[("zrouter_request_duration_seconds_bucket", L(service="svc", le="+Inf"))] == 3
    assert m[("zrouter_request_duration_seconds_count", L(service="nobody"))] == 1
    # Queue wait: 0 for the first, 2 ms and 30 ms for the two that waited for the credit.
    assert m[("zrouter_queue_wait_seconds_count", L(service="svc"))] == 3
    assert m[("zrouter_queue_wait_seconds_sum", L(service="svc"))] == pytest.approx(0.032)
    assert m[("zrouter_queue_wait_seconds_bucket", L(service="svc", le="0.0001"))] == 1
    assert m[("zrouter_late_replies_total", ())] == 1
    assert m[("zrouter_bad_messages_total", L(port="frontend", kind="malformed"))] == 1
    assert m[("zrouter_workers", L(service="svc", state="ready"))] == 1
    assert m[("zrouter_workers", L(service="svc", state="draining"))] == 0
    assert m[("zrouter_worker_capacity", L(service="svc", instance="w1"))] == 1
    assert m[("zrouter_worker_inflight", L(service="svc", instance="w1"))] == 0
    assert m[("zrouter_queue_depth", L(service="svc"))] == 0
    assert ("zrouter_consul_up", ()) not in m  # no Consul, no Consul metric


def test_counters_survive_the_service_record() -> None:
    """A service without workers or queue is forgotten by the router; its counters are not."""
    r, sink = make(grace=0.5)
    w = ready(r, "w1")
    send(r, 1, now=0.0)
    r.worker_reply(w, sink.rids(b"w1")[0], p.STATUS_OK, 0, None, None, b"", 0.001)
    r.remove_worker(w, "test", 0.1)
    r.tick(5.0, heartbeat=False)
    assert "svc" not in r.services
    m = scrape(r)
    assert m[("zrouter_requests_total", L(service="svc", status="ok"))] == 1
    assert ("zrouter_queue_depth", L(service="svc")) not in m  # gauges only for live services
    ready(r, "w2", now=6.0)  # the service comes back: counting goes on from where it was
    assert r.services["svc"].stats is r.service_stats["svc"]


def test_requeued_requests_are_counted_per_service_and_wait_again() -> None:
    r, _ = make()
    lost = ready(r, "w1", capacity=2)
    send(r, 1, now=0.0, flags=p.FLAG_IDEMPOTENT)
    send(r, 2, now=0.0, flags=p.FLAG_IDEMPOTENT)
    r.remove_worker(lost, "test", now=1.0)  # both requeued at t=1
    ready(r, "w2", capacity=2, now=1.5)  # dispatched at t=1.5: waited 0.5 s each
    m = scrape(r)
    assert m[("zrouter_requeued_total", L(service="svc"))] == 2
    assert m[("zrouter_queue_wait_seconds_count", L(service="svc"))] == 4
    assert m[("zrouter_queue_wait_seconds_sum", L(service="svc"))] == pytest.approx(1.0)


def test_a_worker_reply_with_a_status_no_protocol_defines_counts_as_unknown() -> None:
    r, sink = make()
    w = ready(r, "w1")
    for crid, status in enumerate([42, -1, "ok", None]):
        send(r, crid, now=0.0)
        r.worker_reply(w, sink.rids(b"w1")[-1], status, 0, None, None, b"", 0.001)  # type: ignore[arg-type]
    m = scrape(r)
    assert m[("zrouter_requests_total", L(service="svc", status="unknown"))] == 4
    assert w.outstanding == 0 and len(sink.to_clients) == 4  # each still answered, credit back


def test_service_names_beyond_the_bound_share_one_series() -> None:
    r, _ = make()
    for i in range(MAX_SERVICES + 50):
        r.count_status(f"typo-{i}", p.STATUS_UNAVAILABLE)
    assert len(r.service_stats) == MAX_SERVICES + 1
    assert r.service_stats[OTHER_SERVICE].counts[p.STATUS_UNAVAILABLE] == 50


def test_histogram_buckets_follow_prometheus_le() -> None:
    h = Histogram()
    for v in (0.0, BOUNDS[0], BOUNDS[0] * 1.01, 61.0):
        h.observe(v)
    assert h.buckets[0] == 2 and h.buckets[1] == 1 and h.buckets[-1] == 1 and h.count == 4


def test_quantile_interpolates_inside_a_bucket_like_histogram_quantile() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert quantile(0.5, [0, 10, 0, 0], bounds) == pytest.approx(1.5)
    assert quantile(0.99, [0, 10, 0, 0], bounds) == pytest.approx(1.99)
    assert quantile(0.5, [5, 0, 5, 0], bounds) == pytest.approx(1.0)
    assert quantile(0.99, [0, 0, 0, 3], bounds) == 4.0  # in +Inf: the top bound is all we know
    assert quantile(0.5, [0, 0, 0, 0], bounds) is None


def test_worker_states_follow_drain_and_consuls_view() -> None:
    r, _ = make()
    d = [ready(r, n) for n in ("a", "b", "c", "d")][-1]

    class View:
        def __init__(self) -> None:
            self.up = True
            self.views = {"svc": {
                "b": Instance("b", "svc", "warning", False, 1, 1, {}, "", 0),
                "c": Instance("c", "svc", "passing", True, 1, 1, {}, "", 0),
            }}  # fmt: skip

    r.drain_worker("a", 0.0)
    r.set_health(d, False, None, 0.0)  # Consul lists it nowhere
    snap = take_snapshot(r, View())
    states = {w.instance: w.state for w in snap.services["svc"].workers}
    assert states == {"a": "draining", "b": "consul-warning", "c": "maintenance", "d": "consul-critical"}
    assert scrape(r, View())[("zrouter_consul_up", ())] == 1


def test_admin_drain_stops_new_work_and_sends_the_worker_nothing() -> None:
    r, sink = make()
    w = ready(r, "a")
    sent = len(sink.to_workers)
    assert r.drain_worker("a", 0.0) is w and w.draining
    assert len(sink.to_workers) == sent  # no DRAIN: the worker did not ask to leave
    send(r, 1, now=0.0)
    assert not sink.rids(b"a") and len(r.services["svc"].queue) == 1
    assert r.drain_worker("nope", 0.0) is None


def test_admin_weight_overrides_until_consul_says_otherwise() -> None:
    r, _ = make(default_policy="weighted")
    w = ready(r, "a")
    assert r.set_worker_weight("a", 5, 0.0) is w and w.weight == 5.0
    r.set_worker_weight("a", 0, 0.0)
    assert not w.in_policy  # weight 0: out of rotation
    r.set_worker_weight("a", 3, 0.0)
    assert w.in_policy and w.weight == 3.0
    r.set_health(w, True, 2.0, 1.0)  # Consul's new verdict (weight 2) wins
    assert w.admin_weight is None and w.weight == 2.0
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError):
            r.set_worker_weight("a", bad, 0.0)
    assert r.set_worker_weight("nope", 1, 0.0) is None


def test_admin_policy_switch_keeps_the_workers_and_goes_on_dispatching() -> None:
    r, sink = make()
    ready(r, "a")
    ready(r, "b")
    svc = r.set_service_policy("svc", "round-robin", 0.0)
    assert svc is not None and svc.policy.name == "round-robin" and len(svc.policy) == 2
    for crid in range(4):
        send(r, crid, now=0.0)
    assert len(sink.rids(b"a")) == 2 and len(sink.rids(b"b")) == 2
    with pytest.raises(ValueError):
        r.set_service_policy("svc", "nope", 0.0)
    assert r.set_service_policy("missing", "random", 0.0) is None
    r.remove_worker(r.workers[b"a"], "t", 0.0)
    r.remove_worker(r.workers[b"b"], "t", 0.0)
    r.tick(10.0, heartbeat=False)
    ready(r, "c", now=11.0)
    assert r.services["svc"].policy.name == "round-robin"  # kept for the service's next life


def test_status_last_minute_rates_and_quantiles_from_the_sampled_history() -> None:
    from zrouter.broker.http import BrokerHTTP

    r, sink = make()
    w = ready(r, "w1", capacity=100)

    class Loop:
        router = r
        frontend_endpoint = "tcp://f"
        backend_endpoint = "tcp://b"

        def call_soon(self, fn: Any) -> None:
            fn()  # a test stand-in for the broker's loop: run at once, on this thread

    app = BrokerHTTP(Loop(), "127.0.0.1:0")
    crid = 0
    for second in range(3):  # 10 requests a second, each answered in 2 ms
        snap = take_snapshot(r)
        snap.taken_at = 100.0 + second
        app._remember(snap)
        for _ in range(10):
            send(r, crid, now=second)
            r.worker_reply(w, sink.rids(b"w1")[-1], p.STATUS_OK if crid % 5 else p.STATUS_REMOTE_ERROR, 0, None,
                           None, b"", second + 0.002)  # fmt: skip
            crid += 1
    snap = take_snapshot(r)
    snap.taken_at = 103.0
    doc = app.status(snap)
    minute = next(s for s in doc["services"] if s["name"] == "svc")["last_minute"]
    assert minute["window_seconds"] == 3.0
    assert minute["rate"] == pytest.approx(10.0) and minute["error_rate"] == pytest.approx(2.0)
    assert minute["rate_series"] == [pytest.approx(10.0)] * 2  # 100->101, 101->102 (103 is not sampled yet)
    assert 0.001 < minute["p50_seconds"] <= 0.0025 and 0.001 < minute["p99_seconds"] <= 0.0025
    assert doc["services"][0]["workers"][0]["instance"] == "w1"
