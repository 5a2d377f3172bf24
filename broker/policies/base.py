"""The one small interface every dispatch policy implements.

A policy sees only the workers that may take new work right now ("eligible": connected,
healthy, not draining, with a free credit). The broker tells it when that set changes and when
an eligible worker's load or weight changes, and asks it to pick. Keeping the set inside the
policy lets each one hold the structure that makes its pick cheap (a heap, buckets, a ring)
instead of scanning every worker on every request.

Call protocol, from the broker (and the unit tests):

- ``add(ep)``: ``ep`` became eligible; read its current ``outstanding``/``weight``.
- ``remove(ep)``: ``ep`` is no longer eligible (full, draining, unhealthy or gone). It may come
  back with ``add``: a policy may keep what it knows of it (a rotation place, a latency) until
  ``forget``.
- ``changed(ep)``: ``ep`` stays eligible but its ``outstanding`` or ``weight`` changed.
- ``pick(key)``: one eligible endpoint, or ``None`` when there is none. Picking does not change
  the endpoint: the broker then increments ``ep.outstanding`` and calls ``changed`` (or
  ``remove`` when the worker became full).
- ``done(ep, latency_s, now)``: a request ``ep`` held was answered, ``latency_s`` seconds after
  it was sent, at monotonic time ``now`` (s). Called before the ``outstanding`` decrement is
  reported (``changed``, or ``add`` when the reply freed a full worker's credit), whether ``ep``
  is eligible or not. The completion hook of go-zero's p2c balancer (``done``): the broker
  reports latency, each policy keeps what it needs of it (p2c-ewma its EWMAs), and endpoints
  carry no per-policy fields.
- ``forget(ep)``: ``ep`` is gone for good (disconnected, lost, replaced); called after
  ``remove`` if it was eligible. Drop anything kept about it, so a policy's memory is bounded
  by the workers the broker knows.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import ClassVar, Protocol

__all__ = ["POLICIES", "Endpoint", "Policy", "make_policy"]


class Endpoint(Protocol):
    """What a policy may read of a worker. ``key`` is stable for the worker's lifetime."""

    @property
    def key(self) -> bytes: ...

    @property
    def outstanding(self) -> int: ...

    @property
    def weight(self) -> float: ...  # effective weight, > 0 while eligible


POLICIES: dict[str, type[Policy]] = {}


class Policy(ABC):
    """Base of every dispatch policy; subclasses register themselves by ``name``."""

    name: ClassVar[str]

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name:
            POLICIES[name] = cls

    @abstractmethod
    def add(self, ep: Endpoint) -> None: ...

    @abstractmethod
    def remove(self, ep: Endpoint) -> None: ...

    def changed(self, ep: Endpoint) -> None:  # noqa: B027 - a no-op is right for load-blind policies
        """``ep``'s load or weight changed; it is still eligible."""

    def done(self, ep: Endpoint, latency_s: float, now: float) -> None:  # noqa: B027 - most ignore latency
        """A request ``ep`` held was answered after ``latency_s`` seconds, at time ``now`` (s)."""

    def forget(self, ep: Endpoint) -> None:  # noqa: B027 - only policies that remember workers care
        """``ep`` is gone for good: drop what is kept about it (a no-op for one never seen)."""

    @abstractmethod
    def pick(self, key: bytes | None = None) -> Endpoint | None: ...

    @abstractmethod
    def __len__(self) -> int: ...


def make_policy(name: str, rng: random.Random | None = None) -> Policy:
    """A new policy instance by name; the error lists the names that exist."""
    import zrouter.broker.policies  # noqa: F401 - importing the package registers every policy

    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(sorted(POLICIES))}") from None
    return cls(rng)
