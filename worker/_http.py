"""A worker's own metrics (``Worker(..., http="HOST:PORT")``, ``zrouter-worker --http``).

``GET /metrics`` on that address, Prometheus text format::

    zrouter_handler_duration_seconds{service}     histogram: each handler call, wall time
    zrouter_handler_inflight{service}             gauge: handler calls running now
    zrouter_handler_errors_total{service,type}    counter: calls that raised, by exception class
    zrouter_handler_capacity{service}             gauge: the worker's declared capacity

plus prometheus_client's process metrics (CPU, memory, open files).

The handler is wrapped only when metrics are asked for (without ``http`` nothing is timed).
Each thread that runs handlers (pool threads, the asyncio thread, the inline I/O thread) keeps
its own plain counters, so the hot path takes no lock and loses no count; a scrape sums them.
At most MAX_ERROR_TYPES exception class names are kept apart, the others count as ``other``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import Any, Final

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["BOUNDS", "HandlerMetrics", "MetricsServer", "parse_hostport"]

log = logging.getLogger("zrouter.worker")

# Seconds, as the broker's (zrouter.broker.counters.BOUNDS): 100 µs to a minute.
BOUNDS: Final[tuple[float, ...]] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
MAX_ERROR_TYPES: Final = 100


def parse_hostport(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``[::1]:PORT`` for IPv6; port 0 picks a free one) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"http must look like HOST:PORT, got {text!r}")
    return host, int(port)


class _Recorder:
    """One thread's counters; only that thread writes them."""

    __slots__ = ("buckets", "errors", "finished", "started", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BOUNDS) + 1)
        self.sum = 0.0
        self.started = 0
        self.finished = 0
        self.errors: dict[str, int] = {}


class HandlerMetrics(Collector):
    """Handler timings of one worker, and the collector that exports them."""

    def __init__(self, service: str, capacity: int) -> None:
        self.service = service
        self.capacity = capacity
        self._recorders: list[_Recorder] = []
        self._lock = threading.Lock()  # taken once per thread (new recorder) and per scrape
        self._local = threading.local()
        self._error_types: set[str] = set()

    def _recorder(self) -> _Recorder:
        rec = _Recorder()
        with self._lock:
            self._recorders.append(rec)
        self._local.rec = rec
        return rec

    def _error(self, rec: _Recorder, exc: BaseException) -> None:
        name = type(exc).__name__
        if name not in self._error_types:
            with self._lock:
                if len(self._error_types) >= MAX_ERROR_TYPES:
                    name = "other"
                else:
                    self._error_types.add(name)
        rec.errors[name] = rec.errors.get(name, 0) + 1

    def _finished(self, rec: _Recorder, t0: float) -> None:
        d = perf_counter() - t0
        rec.buckets[bisect_left(BOUNDS, d)] += 1
        rec.sum += d
        rec.finished += 1

    def wrap(self, handler: Callable[[Any], Any], is_async: bool) -> Callable[[Any], Any]:
        """``handler`` timed and counted (a coroutine function stays one)."""
        local = self._local
        recorder, error, finished = self._recorder, self._error, self._finished

        if is_async:
            async def timed_async(payload: Any) -> Any:
                rec = getattr(local, "rec", None) or recorder()
                rec.started += 1
                t0 = perf_counter()
                try:
                    return await handler(payload)
                except BaseException as exc:
                    error(rec, exc)
                    raise
                finally:
                    finished(rec, t0)

            assert inspect.iscoroutinefunction(timed_async)
            return functools.wraps(handler)(timed_async)

        def timed(payload: Any) -> Any:
            rec = getattr(local, "rec", None) or recorder()
            rec.started += 1
            t0 = perf_counter()
            try:
                return handler(payload)
            except BaseException as exc:
                error(rec, exc)
                raise
            finally:
                finished(rec, t0)

        return functools.wraps(handler)(timed)

    # -- the collector ------------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            recs = list(self._recorders)
        buckets = [0] * (len(BOUNDS) + 1)
        total_sum, inflight = 0.0, 0
        errors: dict[str, int] = {}
        for rec in recs:
            for i, n in enumerate(list(rec.buckets)):
                buckets[i] += n
            total_sum += rec.sum
            inflight += rec.started - rec.finished
            for name, n in list(rec.errors.items()):
                errors[name] = errors.get(name, 0) + n
        hist = HistogramMetricFamily("zrouter_handler_duration_seconds", "Handler calls, wall time.", labels=["service"])
        acc, cumulative = 0, []
        for bound, n in zip(BOUNDS, buckets, strict=False):
            acc += n
            cumulative.append((repr(bound), float(acc)))
        cumulative.append(("+Inf", float(acc + buckets[-1])))
        hist.add_metric([self.service], cumulative, total_sum)
        yield hist
        yield _gauge("zrouter_handler_inflight", "Handler calls running now.", self.service, max(0, inflight))
        err = CounterMetricFamily("zrouter_handler_errors_total", "Handler calls that raised, by exception class.",
                                  labels=["service", "type"])  # fmt: skip
        for name, n in sorted(errors.items()):
            err.add_metric([self.service, name], n)
        yield err
        yield _gauge("zrouter_handler_capacity", "Requests this worker may hold (its declared capacity).",
                     self.service, self.capacity)  # fmt: skip


def _gauge(name: str, doc: str, service: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["service"])
    g.add_metric([service], value)
    return g


class MetricsServer:
    """prometheus_client's HTTP server for one worker's registry, on a thread of its own."""

    def __init__(self, address: str, metrics: HandlerMetrics) -> None:
        self.host, self.port = parse_hostport(address)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(metrics)
        self.registry.register(ProcessCollector(registry=None))
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> None:
        self._server, self._thread = start_http_server(self.port, self.host, self.registry)
        port = self._server.server_port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{port}"
        log.info("worker metrics on %s/metrics", self.url)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
