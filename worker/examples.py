"""Handlers for demos, tests and benchmarks (``zrouter-worker ... zrouter.worker.examples:echo``)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from ._context import current_request

__all__ = ["async_echo", "async_slow_echo", "echo", "fail", "slow_echo", "whoami"]


def _delay_of(payload: Any) -> float:
    if isinstance(payload, dict):
        try:
            return max(0.0, float(payload.get("delay", 0.0)))
        except (TypeError, ValueError):
            return 0.0
    return 0.0


def echo(payload: Any) -> Any:
    """Returns the payload unchanged (raw bytes stay raw)."""
    return payload


def slow_echo(payload: Any) -> Any:
    """Sleeps ``payload["delay"]`` seconds when the payload is a map (a slow worker), then echoes."""
    delay = _delay_of(payload)
    if delay:
        time.sleep(delay)
    return payload


def fail(payload: Any) -> Any:
    """Always raises ``ValueError("boom")``: the caller gets a RemoteError of type ValueError."""
    raise ValueError("boom")


def whoami(payload: Any) -> dict[str, Any]:
    """``{"worker": <this worker's instance id (pid outside a worker)>, "payload": payload}``."""
    info = current_request()
    return {"worker": info.instance_id if info is not None else str(os.getpid()), "payload": payload}


async def async_echo(payload: Any) -> Any:
    """Coroutine echo."""
    return payload


async def async_slow_echo(payload: Any) -> Any:
    """Coroutine :func:`slow_echo`: awaits ``payload["delay"]`` seconds, then echoes."""
    delay = _delay_of(payload)
    if delay:
        await asyncio.sleep(delay)
    return payload
