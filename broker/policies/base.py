"""The one small interface every dispatch policy implements.

A policy sees only the workers that may take new work right now ("eligible": connected,
healthy, not draining, with a free credit). The broker tells it when that set changes and when
an eligible worker's load or weight changes, and asks it to pick. Keeping the set inside the
policy lets each one hold the structure that makes its pick cheap (a heap, buckets, a ring)
instead of scanning every worker on every request.

Call protocol, from the broker (and the unit tests):

- ``add(ep)``: ``ep`` became eligible; read its current ``outstanding``/``weight``/``ewma``.
- ``remove(ep)``: ``ep`` is no longer eligible (full, draining, unhealthy or gone).
- ``changed(ep)``: ``ep`` stays eligible but its ``outstanding``, ``weight`` or ``ewma`` changed.
- ``pick(key)``: one eligible endpoint, or ``None`` when there is none. Picking does not change
  the endpoint: the broker then increments ``ep.outstanding`` and calls ``changed`` (or
  ``remove`` when the worker became full).
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

    @property
    def ewma(self) -> float: ...  # latency EWMA in seconds (0.0 until the first reply)


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
        """``ep``'s load, weight or latency changed; it is still eligible."""

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
