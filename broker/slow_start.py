"""Slow start: a worker that joins an established service gets its weight and its credits ramped
up linearly over a window (``--slow-start SECONDS``, ``--service-slow-start SERVICE=SECONDS``),
so a cold worker (empty caches, a JIT still warming, a slow disk) is not handed a full share
before its first replies show what it can do.

The ramp follows Envoy's ``slow_start_config`` and HAProxy's ``slowstart``. With ``f`` the
fraction of the window since the worker joined (0 to 1):

- weight: ``weight * max(MIN_WEIGHT_FACTOR, f)``, Envoy's formula with its default
  ``min_weight_percent`` of 10% and ``aggression`` 1 (linear). The floor keeps a new worker in
  every weighted rotation from its first moment; it only changes what the weighted policies
  (``weighted``, ``weighted-least-outstanding``) see.
- credits: ``max(1, floor(capacity * f))``, as HAProxy grows a server's ``maxconn`` from 1 to
  100%. This one binds every policy, the load-blind ones included: at most that many requests
  are sent to the worker at once. A capacity of 0 stays 0.

Who starts slow (``starts_slow``): only a worker that joins a service which already has a
routable worker and which this broker has known for at least its liveness timeout (heartbeat x
liveness: the time workers take to notice a restarted broker and come back). Slow start protects
an established service from a newcomer; when everyone is new (a service's first workers starting
together, or all of them reconnecting to a restarted broker) nobody is better placed to carry the
load, and ramping them would only hold requests back (HAProxy: "the slowstart never applies when
haproxy starts"; Envoy notes that slow start does nothing useful when all endpoints are new).

Everything here is pure: time is passed in. The router applies the ramp when the worker joins,
on each of its replies, and on every tick (the heartbeat interval), so the credits and weight a
policy sees lag the line by at most one tick.
"""

from __future__ import annotations

import math

__all__ = ["MIN_WEIGHT_FACTOR", "ramp", "slow_credit", "slow_weight", "starts_slow"]

# Envoy's default min_weight_percent: the smallest fraction of its weight a new worker gets.
MIN_WEIGHT_FACTOR = 0.1


def ramp(elapsed: float, window: float) -> float:
    """The fraction of the window ``elapsed`` seconds cover, clamped to [0, 1] (1 for a window
    of 0 or less: no slow start)."""
    if window <= 0.0 or elapsed >= window:
        return 1.0
    return max(elapsed, 0.0) / window


def slow_weight(weight: float, elapsed: float, window: float) -> float:
    """``weight`` ``elapsed`` seconds into a window of ``window`` seconds."""
    return weight * max(MIN_WEIGHT_FACTOR, ramp(elapsed, window))


def slow_credit(capacity: int, elapsed: float, window: float) -> int:
    """Credits (requests at once) out of ``capacity``, ``elapsed`` seconds into the window."""
    if capacity <= 0:
        return 0
    return max(1, math.floor(capacity * ramp(elapsed, window)))


def starts_slow(window: float, service_age: float, routable_others: int, settle: float) -> bool:
    """Whether a worker joining now ramps: the window is on, ``routable_others`` > 0 workers
    already serve the service, and the broker has known it for ``service_age`` >= ``settle``
    seconds (its liveness timeout)."""
    return window > 0.0 and routable_others > 0 and service_age >= settle
