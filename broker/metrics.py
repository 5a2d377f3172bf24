"""What a running broker shows: a snapshot of the router, as Prometheus metrics and as JSON.

:func:`take_snapshot` copies the router's plain counters (``zrouter.broker.counters``) and its
workers into a :class:`Snapshot` of plain values. It must run **on the broker's loop thread**
(the HTTP thread asks for it with ``Broker.call_soon`` and waits), so no dict is iterated while
the loop changes it and the hot path never takes a lock. Everything after it (formatting,
quantiles, JSON) runs on the HTTP thread from the copy.

:class:`BrokerCollector` is a prometheus_client custom collector: each scrape asks for a fresh
snapshot and turns it into metric families. Names follow Prometheus's conventions
(``zrouter_<thing>_<unit>``, ``_total`` for counters, seconds)::

    zrouter_requests_total{service,status}          counter: replies sent, by status
    zrouter_request_duration_seconds{service}       histogram: broker accept -> reply sent
    zrouter_queue_wait_seconds{service}             histogram: time queued before a dispatch
    zrouter_queue_depth{service}                    gauge
    zrouter_requeued_total{service}                 counter: taken back from a lost worker
    zrouter_workers{service,state}                  gauge: ready, draining, consul-warning,
                                                    consul-critical, maintenance
    zrouter_worker_inflight{service,instance}       gauge
    zrouter_worker_capacity{service,instance}       gauge
    zrouter_worker_weight{service,instance}         gauge: the effective weight
    zrouter_worker_latency_ewma_seconds{service,instance}  gauge
    zrouter_late_replies_total                      counter: replies for requests given up on
    zrouter_undeliverable_replies_total             counter: replies ZeroMQ would not queue (client
                                                    gone, or --max-client-unread replies unread)
    zrouter_unread_overflow_replies_total           counter: replies replaced by TOO_LARGE (client
                                                    at --max-client-unread-bytes)
    zrouter_bad_messages_total{port,kind}           counter: port frontend/backend
    zrouter_consul_up                               gauge (with --consul): 1 while Consul answers

``instance`` collides with the label Prometheus gives every target: scrape with
``honor_labels: true`` to keep it, or find it as ``exported_instance``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from zrouter.broker.counters import BOUNDS, STATUS_LABELS, Histogram, ServiceStats, quantile
from zrouter.broker.router import Router
from zrouter.broker.state import WorkerState
from zrouter.consul import Instance

__all__ = [
    "WORKER_STATES",
    "BrokerCollector",
    "ConsulView",
    "ServiceSnap",
    "Snapshot",
    "HistoryPoint",
    "WorkerSnap",
    "families",
    "history_point",
    "last_minute",
    "service_json",
    "take_snapshot",
    "worker_state",
]

WORKER_STATES: Final = ("ready", "draining", "consul-warning", "consul-critical", "maintenance")


class ConsulView(Protocol):
    """What a snapshot reads of the broker's Consul link (``zrouter.broker.consul_link``)."""

    views: dict[str, dict[str, Instance]]
    up: bool | None


@dataclass(slots=True)
class WorkerSnap:
    instance: str
    service: str
    state: str
    inflight: int
    capacity: int
    credit: int  # what it may hold now: below capacity during a slow start
    weight: float  # effective: what the policy uses
    declared_weight: int  # from READY/UPDATE (or Consul's Weights.Passing)
    admin_weight: float | None
    latency_ewma_seconds: float
    seconds_since_heartbeat: float
    served: int
    host: str
    pid: str

    def as_json(self) -> dict[str, Any]:
        return {
            "instance": self.instance, "state": self.state, "inflight": self.inflight,
            "capacity": self.capacity, "credit": self.credit, "weight": self.weight, "declared_weight": self.declared_weight,
            "admin_weight": self.admin_weight, "latency_ewma_seconds": round(self.latency_ewma_seconds, 6),
            "seconds_since_heartbeat": round(self.seconds_since_heartbeat, 3), "served": self.served,
            "host": self.host, "pid": self.pid,
        }  # fmt: skip


@dataclass(slots=True)
class ServiceSnap:
    name: str
    live: bool  # the router has the service now (else: counters only, kept so they never reset)
    policy: str | None
    queue_depth: int
    counts: list[int]  # by status code, see STATUS_LABELS
    requeued: int
    duration: tuple[list[int], float]  # (buckets, sum)
    wait: tuple[list[int], float]
    workers: list[WorkerSnap] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def errors(self) -> int:
        return self.total - self.counts[0]


@dataclass(slots=True)
class Snapshot:
    taken_at: float  # time.monotonic() on the loop
    wall: float  # time.time()
    services: dict[str, ServiceSnap]
    totals: dict[str, int]
    late_replies: int
    bad_messages: dict[tuple[str, str], int]
    inflight: int
    accepting: bool
    consul_enabled: bool
    consul_up: bool | None


def worker_state(w: WorkerState, consul: ConsulView | None) -> str:
    """One word for the dashboard and ``zrouter_workers{state}`` (see WORKER_STATES)."""
    if w.draining:
        return "draining"
    inst = None
    if consul is not None:
        view = consul.views.get(w.service.name)
        inst = view.get(w.instance) if view is not None else None
    if inst is not None:
        if inst.maintenance:
            return "maintenance"
        if inst.status == "critical":
            return "consul-critical"
        if inst.status == "warning":
            return "consul-warning"
    if not w.healthy:  # Consul lists it nowhere (not registered yet, or deregistered)
        return "consul-critical"
    return "ready"


def _hist(h: Histogram) -> tuple[list[int], float]:
    return list(h.buckets), h.sum


def _service(st: ServiceStats, router: Router, now: float, consul: ConsulView | None, workers: bool) -> ServiceSnap:
    svc = router.services.get(st.name)
    snap = ServiceSnap(st.name, svc is not None, None, 0, list(st.counts), st.requeued, _hist(st.duration),
                       _hist(st.wait))  # fmt: skip
    if svc is not None:
        snap.policy = svc.policy.name
        snap.queue_depth = len(svc.queue)
        if workers:
            snap.workers = [
                WorkerSnap(
                    w.instance, svc.name, worker_state(w, consul), w.outstanding, w.capacity, w.credit, w.weight,
                    w.base_weight, w.admin_weight, w.latency_ewma, max(0.0, now - w.last_seen), w.served,
                    w.meta.get("host", ""), w.meta.get("pid", ""),
                )
                for w in svc.workers.values()
            ]
            snap.workers.sort(key=lambda x: x.instance)
    return snap


def take_snapshot(router: Router, consul: ConsulView | None = None, *, workers: bool = True) -> Snapshot:
    """Copy what the metrics and the status page show. Call on the broker's loop thread only.

    ``workers`` False skips the per-worker records (the once-a-second history needs counters only).
    """
    now = time.monotonic()
    services: dict[str, ServiceSnap] = {}
    for name, st in router.service_stats.items():
        services[name] = _service(st, router, now, consul, workers)
    for name, svc in router.services.items():  # a service is always in service_stats, but be sure
        if name not in services:
            services[name] = _service(svc.stats, router, now, consul, workers)
    return Snapshot(
        taken_at=now, wall=time.time(), services=services, totals=router.stats.as_dict(),
        late_replies=router.stats.late, bad_messages=dict(router.bad_messages), inflight=router.n_inflight,
        accepting=router.accepting, consul_enabled=consul is not None,
        consul_up=consul.up if consul is not None else None,
    )  # fmt: skip


_LE: Final = tuple(repr(b) for b in BOUNDS)  # Prometheus writes bounds as shortest floats too


def _buckets(buckets: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    acc = 0
    for le, n in zip(_LE, buckets, strict=False):
        acc += n
        out.append((le, acc))
    out.append(("+Inf", acc + buckets[-1]))
    return out


def families(snap: Snapshot) -> Iterator[Metric]:
    """The snapshot as Prometheus metric families (see the module docstring)."""
    requests = CounterMetricFamily("zrouter_requests_total", "Replies sent to clients, by service and status.",
                                   labels=["service", "status"])  # fmt: skip
    duration = HistogramMetricFamily("zrouter_request_duration_seconds",
                                     "From the broker accepting a request to its reply being sent.", labels=["service"])
    wait = HistogramMetricFamily("zrouter_queue_wait_seconds",
                                 "Time a request waited in the broker's queue before each dispatch.", labels=["service"])
    depth = GaugeMetricFamily("zrouter_queue_depth", "Requests waiting in the broker for a worker.", labels=["service"])
    requeued = CounterMetricFamily("zrouter_requeued_total", "Requests taken back from a lost worker and queued again.",
                                   labels=["service"])  # fmt: skip
    n_workers = GaugeMetricFamily("zrouter_workers", "Connected workers by state.", labels=["service", "state"])
    wl = ["service", "instance"]
    inflight = GaugeMetricFamily("zrouter_worker_inflight", "Requests a worker holds.", labels=wl)
    capacity = GaugeMetricFamily("zrouter_worker_capacity", "Requests a worker may hold (its credits).", labels=wl)
    weight = GaugeMetricFamily("zrouter_worker_weight", "A worker's effective dispatch weight.", labels=wl)
    ewma = GaugeMetricFamily("zrouter_worker_latency_ewma_seconds", "A worker's reply latency EWMA.", labels=wl)
    for name, s in sorted(snap.services.items()):
        for label, n in zip(STATUS_LABELS, s.counts, strict=True):
            if n or label != "unknown":
                requests.add_metric([name, label], n)
        duration.add_metric([name], _buckets(s.duration[0]), s.duration[1])
        wait.add_metric([name], _buckets(s.wait[0]), s.wait[1])
        requeued.add_metric([name], s.requeued)
        if not s.live:
            continue
        depth.add_metric([name], s.queue_depth)
        states = dict.fromkeys(WORKER_STATES, 0)
        for w in s.workers:
            states[w.state] = states.get(w.state, 0) + 1
            inflight.add_metric([name, w.instance], w.inflight)
            capacity.add_metric([name, w.instance], w.capacity)
            weight.add_metric([name, w.instance], w.weight)
            ewma.add_metric([name, w.instance], w.latency_ewma_seconds)
        for state, n in states.items():
            n_workers.add_metric([name, state], n)
    yield from (requests, duration, wait, depth, requeued, n_workers, inflight, capacity, weight, ewma)
    yield CounterMetricFamily("zrouter_late_replies_total",
                              "Worker replies for requests the broker had already given up on (dropped).",
                              value=snap.late_replies)  # fmt: skip
    yield CounterMetricFamily("zrouter_undeliverable_replies_total",
                              "Replies ZeroMQ would not queue for their client (gone, or not reading): dropped.",
                              value=snap.totals.get("undeliverable", 0))  # fmt: skip
    yield CounterMetricFamily("zrouter_unread_overflow_replies_total",
                              "Replies replaced by TOO_LARGE: their client had its bound of unread reply bytes.",
                              value=snap.totals.get("unread_overflow", 0))  # fmt: skip
    bad = CounterMetricFamily("zrouter_bad_messages_total", "Malformed or unexpected messages, by port and kind.",
                              labels=["port", "kind"])  # fmt: skip
    for (port, kind), n in sorted(snap.bad_messages.items()):
        bad.add_metric([port, kind], n)
    yield bad
    yield GaugeMetricFamily("zrouter_inflight_requests", "Requests held by workers.", value=snap.inflight)
    if snap.consul_enabled:
        yield GaugeMetricFamily("zrouter_consul_up", "1 while the broker's Consul link gets answers, else 0.",
                                value=1 if snap.consul_up else 0)  # fmt: skip


class BrokerCollector(Collector):
    """Reads a fresh :class:`Snapshot` from ``snapshot()`` at every scrape. ``snapshot`` may
    raise (e.g. the loop did not answer in time): the scrape then fails rather than lies."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        return families(self._snapshot())

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: the series depend on the services seen


def service_json(s: ServiceSnap) -> dict[str, Any]:
    """A service's part of ``GET /status`` (without the last-minute figures)."""
    return {
        "name": s.name, "live": s.live, "policy": s.policy, "queue_depth": s.queue_depth,
        "requests": {label: n for label, n in zip(STATUS_LABELS, s.counts, strict=True) if n or label != "unknown"},
        "requeued": s.requeued,
        "workers_by_state": _states(s.workers),
        "inflight": sum(w.inflight for w in s.workers), "capacity": sum(w.capacity for w in s.workers),
        "workers": [w.as_json() for w in s.workers],
    }  # fmt: skip


def _states(workers: list[WorkerSnap]) -> Mapping[str, int]:
    out = dict.fromkeys(WORKER_STATES, 0)
    for w in workers:
        out[w.state] = out.get(w.state, 0) + 1
    return out


# (taken_at, {service: (replies, errors, duration buckets)}): one sample of the counters, kept a
# minute by the HTTP side's sampler for the "last minute" figures.
HistoryPoint = tuple[float, dict[str, tuple[int, int, list[int]]]]


def history_point(snap: Snapshot) -> HistoryPoint:
    return snap.taken_at, {name: (s.total, s.errors, s.duration[0]) for name, s in snap.services.items()}


def last_minute(s: ServiceSnap, now: float, history: Sequence[HistoryPoint], window: float = 60.0) -> dict[str, Any]:
    """A service's figures over the last ``window`` seconds, from the oldest sample within it to
    ``s`` (taken at ``now``): ``rate`` and ``error_rate`` (replies per second), ``p50_seconds``
    and ``p99_seconds`` (of the duration histogram's increase, by ``quantile``; None without
    replies), ``window_seconds`` (how much history there was), and ``rate_series``: replies per
    second between consecutive samples, the last minute's, for a sparkline."""
    empty = (0, 0, [0] * len(s.duration[0]))
    recent = list(history[-61:])
    series = [max(0.0, (b[1].get(s.name, empty)[0] - a[1].get(s.name, empty)[0]) / max(b[0] - a[0], 1e-3))
              for a, b in itertools.pairwise(recent)]  # fmt: skip
    out: dict[str, Any] = {"window_seconds": 0.0, "rate": 0.0, "error_rate": 0.0, "p50_seconds": None,
                           "p99_seconds": None, "rate_series": series}  # fmt: skip
    old = next((p for p in history if now - p[0] <= window), None)
    if old is not None and now - old[0] > 0.5:
        span = now - old[0]
        total0, errors0, buckets0 = old[1].get(s.name, empty)
        delta = [b - a for a, b in zip(buckets0, s.duration[0], strict=True)]
        out.update(window_seconds=round(span, 1), rate=(s.total - total0) / span, error_rate=(s.errors - errors0) / span,
                   p50_seconds=quantile(0.5, delta), p99_seconds=quantile(0.99, delta))  # fmt: skip
    return out
