"""Plain counters the router keeps per service, read by the metrics collector at scrape time.

The hot path pays a list-item add per reply (its status), a ``bisect`` and an add per histogram
observation, and nothing else: no locks, no label lookups, no prometheus_client objects. Only the
broker's loop thread writes these; readers (``zrouter.broker.metrics``) copy them on that same
thread (``Broker.call_soon``), so nothing here is shared between threads.

Histograms follow Prometheus's (``le`` = less than or equal): ``buckets[i]`` counts the
observations ``v`` with ``BOUNDS[i-1] < v <= BOUNDS[i]``, and the last slot counts those above
every bound (``+Inf``); they are made cumulative only when exported.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Final

from zrouter import protocol

__all__ = [
    "BOUNDS",
    "LATENCY_ALPHA",
    "MAX_SERVICES",
    "OTHER_SERVICE",
    "STATUS_LABELS",
    "Histogram",
    "ServiceStats",
    "quantile",
]

# Seconds. The router answers in ~0.3 ms on loopback and requests may wait up to their deadline:
# from 100 µs to a minute, ~2.5x apart (Prometheus's default buckets start at 5 ms: too coarse).
BOUNDS: Final[tuple[float, ...]] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

# ``status`` label values, indexed by wire status code (zrouter.protocol.STATUS_NAMES with
# Prometheus's underscores), plus one slot for a code no version of the protocol defines (a
# misbehaving worker's reply: counted, never a crash).
STATUS_LABELS: Final[tuple[str, ...]] = (
    *(protocol.STATUS_NAMES[code].replace("-", "_") for code in range(len(protocol.STATUS_NAMES))),
    "unknown",
)
_UNKNOWN: Final = len(STATUS_LABELS) - 1

# Counters are kept for at most this many service names: a client may send any name, and
# every name is a set of series in every scrape. Names beyond the bound share OTHER_SERVICE.
MAX_SERVICES: Final = 1000
OTHER_SERVICE: Final = "__other__"

# Weight of each new reply in a worker's latency EWMA shown by /status and the dashboard (about
# the last 10 replies). Kept by the router for operators; the policies keep their own.
LATENCY_ALPHA: Final = 0.1


class Histogram:
    """Bucket counts and the sum of observations, in seconds (see the module docstring)."""

    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BOUNDS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(BOUNDS, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.buckets)


class ServiceStats:
    """Every counter of one service name. Outlives the router's ``Service`` record (which is
    dropped when the service has neither workers nor queued requests) so counters never go back."""

    __slots__ = ("counts", "duration", "name", "requeued", "wait")

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts = [0] * len(STATUS_LABELS)  # replies sent, by status code
        self.requeued = 0  # requests taken back from a lost worker and queued again
        self.duration = Histogram()  # broker accept -> reply sent, every reply
        self.wait = Histogram()  # time in the broker's queue before each dispatch

    def count(self, status: object) -> None:
        """One reply of wire status ``status``; any value is accepted (a worker's reply is
        untrusted input): codes outside the protocol count as ``unknown``."""
        if type(status) is int and 0 <= status < _UNKNOWN:
            self.counts[status] += 1
        else:
            self.counts[_UNKNOWN] += 1


def quantile(q: float, buckets: Sequence[int], bounds: Sequence[float] = BOUNDS) -> float | None:
    """The ``q``-quantile (0..1) of a bucketed distribution (non-cumulative ``buckets``, one more
    than ``bounds``), by linear interpolation inside the bucket it falls in, as Prometheus's
    ``histogram_quantile`` does. None without observations; an answer in the ``+Inf`` bucket is
    the highest bound (the histogram cannot tell more)."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lower = 0.0 if i == 0 else bounds[i - 1]
            return lower + (bounds[i] - lower) * max(0.0, rank - seen) / n
        seen += n
    return float(bounds[-1])
