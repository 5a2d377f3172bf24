"""The ``zrouter-worker`` command: serve ``module:function`` for a service.

    zrouter-worker --service echo --broker tcp://127.0.0.1:5556 --capacity 4 --weight 1 \\
        --heartbeat 1.0 --liveness 3 zrouter.worker.examples:echo

``--broker`` may be repeated (or comma-separated) for several brokers. ``--delay SECONDS`` (or
ZROUTER_WORKER_DELAY) makes every call sleep first: a slow worker for tests and demos.
``--inline`` runs a sync handler in the I/O thread itself: fast handlers only, since no
heartbeat goes out while it runs (see :class:`worker.Worker`).

SIGINT/SIGTERM drain the worker and exit 0 (a second signal stops without waiting).

With ``--consul HOST:PORT`` (default ``$CONSUL_HTTP_ADDR``; ``--no-consul`` ignores it) the
worker registers itself in Consul, and ``--broker-service NAME`` (instead of ``--broker``) finds
the brokers there::

    zrouter-worker --service echo --consul 127.0.0.1:8500 --broker-service zrouter-broker \\
        --tag blue zrouter.worker.examples:echo
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from zrouter.errors import AuthenticationFailed
from zrouter.logfmt import FORMATS, configure_logging

from ._context import current_request
from ._worker import DEFAULT_BROKER, Worker, _is_async

__all__ = ["build_parser", "load_handler", "main", "with_delay"]

DELAY_ENV = "ZROUTER_WORKER_DELAY"


def load_handler(spec: str) -> Callable[[Any], Any]:
    """``"package.module:function"`` (or ``module:obj.attr``) to the callable it names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"handler must look like module:function, got {spec!r}")
    # Like `python -m` (and gunicorn, uvicorn): a handler module beside you is found, which a
    # console script's sys.path would not do on its own.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec} is not callable")
    handler: Callable[[Any], Any] = obj
    return handler


def with_delay(handler: Callable[[Any], Any], delay: float) -> Callable[[Any], Any]:
    """``handler`` made to wait ``delay`` seconds before each call (sleep, or asyncio.sleep)."""
    if delay <= 0:
        return handler
    if _is_async(handler):

        @functools.wraps(handler)
        async def slow_async(payload: Any) -> Any:
            await asyncio.sleep(delay)
            return await handler(payload)

        return slow_async

    @functools.wraps(handler)
    def slow(payload: Any) -> Any:
        time.sleep(delay)
        return handler(payload)

    return slow


def _meta_item(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--meta wants KEY=VALUE, got {text!r}")
    return key, value


def _default_delay() -> float:
    try:
        return float(os.environ.get(DELAY_ENV, "0") or 0)
    except ValueError:
        return 0.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zrouter-worker", description="Serve module:function for a zrouter service.")
    p.add_argument("handler", help="the handler, as module:function")
    p.add_argument("--service", required=True, help="service name")
    p.add_argument(
        "--broker", action="append", default=None, metavar="ENDPOINT",
        help=f"broker endpoint; repeat or comma-separate for several (default {DEFAULT_BROKER})",
    )  # fmt: skip
    p.add_argument("--capacity", type=int, default=1, help="requests in flight at once (default 1)")
    p.add_argument("--weight", type=int, default=1, help="dispatch weight (default 1)")
    p.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval, s (default 1.0)")
    p.add_argument("--liveness", type=int, default=3, help="missed heartbeats before reconnecting")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="bound on a graceful stop, s")
    p.add_argument("--meta", type=_meta_item, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--delay", type=float, default=_default_delay(), metavar="SECONDS",
        help=f"sleep before every call (a slow worker; default ${DELAY_ENV} or 0)",
    )  # fmt: skip
    p.add_argument(
        "--inline", action="store_true",
        help="run the (sync) handler in the I/O thread itself: least CPU and latency per request, one "
             "request at a time; no heartbeats while a handler runs, so only for handlers well within "
             "--heartbeat x --liveness (a longer one makes the broker declare the worker dead and requeue)",
    )  # fmt: skip
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    p.add_argument(
        "--log-format", default="text", choices=FORMATS,
        help="json: one JSON object a line (keys ts, level, logger, event, service, instance; rid in handlers)",
    )  # fmt: skip
    p.add_argument(
        "--http", metavar="HOST:PORT",
        help="serve this worker's Prometheus metrics on GET /metrics there (port 0: a free port, logged)",
    )  # fmt: skip
    g = p.add_argument_group("Consul (optional)")
    g.add_argument(
        "--consul", default=os.environ.get("CONSUL_HTTP_ADDR") or None, metavar="HOST:PORT",
        help="Consul agent to register this worker in (default $CONSUL_HTTP_ADDR)",
    )  # fmt: skip
    g.add_argument("--no-consul", action="store_true", help="ignore $CONSUL_HTTP_ADDR")
    g.add_argument(
        "--consul-token", default=os.environ.get("CONSUL_HTTP_TOKEN") or None, metavar="TOKEN",
        help="Consul ACL token (default $CONSUL_HTTP_TOKEN)",
    )  # fmt: skip
    g.add_argument("--tag", action="append", default=[], metavar="TAG", help="Consul tag (repeatable)")
    g.add_argument(
        "--broker-service", metavar="NAME",
        help="find the brokers in Consul under this service name (e.g. zrouter-broker) instead of --broker",
    )  # fmt: skip
    c = p.add_argument_group("CURVE (see README, Security)")
    c.add_argument("--curve-server-key", metavar="FILE", help="the brokers' public .key file")
    c.add_argument("--curve-secret-key", metavar="FILE", help="this worker's .key_secret file (from zrouter-keys)")
    return p


def _log_context() -> dict[str, Any] | None:
    """For JSON logs: the request id of the handler call that logs (None outside handlers)."""
    info = current_request()
    return None if info is None else {"rid": info.rid}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    json_logs = configure_logging(
        str(args.log_level).upper(), args.log_format, static={"service": args.service}, context=_log_context,
        stream=sys.stderr,
    )  # fmt: skip
    try:
        handler = with_delay(load_handler(args.handler), args.delay)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        parser.error(f"cannot load handler {args.handler!r}: {exc}")
    consul = None if args.no_consul else args.consul
    if args.broker_service and args.broker:
        parser.error("give --broker or --broker-service, not both")
    if args.broker_service and not consul:
        parser.error("--broker-service needs --consul (or $CONSUL_HTTP_ADDR)")
    broker: list[str] | None = None
    if not args.broker_service:
        items = [ep.strip() for item in (args.broker or [DEFAULT_BROKER]) for ep in item.split(",")]
        broker = [ep for ep in items if ep]
    try:
        worker = Worker(
            args.service,
            handler,
            broker=broker,
            capacity=args.capacity,
            weight=args.weight,
            heartbeat_interval=args.heartbeat,
            liveness=args.liveness,
            meta=dict(args.meta),
            drain_timeout=args.drain_timeout,
            consul=consul,
            consul_token=args.consul_token,
            tags=args.tag,
            broker_service=args.broker_service,
            inline=args.inline,
            http=args.http,
            curve_server_key=args.curve_server_key,
            curve_secret_key=args.curve_secret_key,
        )
    except (TypeError, ValueError, OSError, RuntimeError) as exc:
        parser.error(str(exc))
    if json_logs is not None:
        json_logs.static["instance"] = worker.instance_id
    try:
        worker.run()
    except AuthenticationFailed as exc:
        logging.getLogger("zrouter.worker").error("stopping: %s", exc)
        return 3
    return 0
