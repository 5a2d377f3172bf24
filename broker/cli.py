"""``zrouter-broker`` / ``python -m zrouter.broker``: the broker daemon's command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import zmq

from zrouter.broker.auth import exposed_endpoints
from zrouter.broker.server import Broker, BrokerConfig
from zrouter.broker.policies import POLICIES
from zrouter.logfmt import FORMATS, configure_logging

__all__ = ["main", "parse_args"]


def _service_policy(text: str) -> tuple[str, str]:
    service, sep, policy = text.partition("=")
    if not sep or not service or not policy:
        raise argparse.ArgumentTypeError(f"expected SERVICE=POLICY, got {text!r}")
    if policy not in POLICIES:
        raise argparse.ArgumentTypeError(f"unknown policy {policy!r}; choose from {', '.join(sorted(POLICIES))}")
    return service, policy


def _service_seconds(text: str) -> tuple[str, float]:
    service, sep, seconds = text.partition("=")
    try:
        value = float(seconds)
    except ValueError:
        value = -1.0
    if not sep or not service or not value >= 0.0:
        raise argparse.ArgumentTypeError(f"expected SERVICE=SECONDS (>= 0), got {text!r}")
    return service, value


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = units.get(t[-1:], 1)
    return int(float(t[:-1] if t[-1:] in units else t) * mult)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = BrokerConfig()
    p = argparse.ArgumentParser(
        prog="zrouter-broker",
        description="zrouter broker: routes client requests to workers by a per-service policy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--frontend", default=d.frontend, help="endpoint clients connect to (ROUTER)")
    p.add_argument("--backend", default=d.backend, help="endpoint workers connect to (ROUTER)")
    p.add_argument("--heartbeat", type=float, default=d.heartbeat_interval, metavar="SECONDS",
                   help="heartbeat interval, both ways between broker and workers")
    p.add_argument("--liveness", type=int, default=d.liveness, metavar="N",
                   help="a worker silent for N heartbeat intervals is removed")
    p.add_argument("--policy", default=d.default_policy, choices=sorted(POLICIES),
                   help="dispatch policy for services without their own")
    p.add_argument("--service-policy", type=_service_policy, action="append", default=[],
                   metavar="SERVICE=POLICY", help="policy for one service (repeatable)")
    p.add_argument("--slow-start", type=float, default=d.slow_start, metavar="SECONDS",
                   help="ramp a worker joining an established service up over this long: its weight "
                        "from 10%% and its credits from 1, linearly (0: off)")
    p.add_argument("--service-slow-start", type=_service_seconds, action="append", default=[],
                   metavar="SERVICE=SECONDS", help="--slow-start for one service (repeatable)")
    p.add_argument("--max-queue", type=int, default=d.max_queue, metavar="N",
                   help="requests waiting per service before the broker answers 'overloaded'")
    p.add_argument("--max-attempts", type=int, default=d.max_attempts, metavar="N",
                   help="times an idempotent request may be sent to a worker (requeue budget)")
    p.add_argument("--grace", type=float, default=d.grace, metavar="SECONDS",
                   help="how long a request for a service nobody serves waits for a worker")
    p.add_argument("--max-message-size", type=_size, default=d.max_message_size, metavar="BYTES",
                   help="largest payload frame, requests and replies (suffixes k, m, g); a larger frame makes "
                        "ZeroMQ drop the connection that sent it before it is read (ZMQ_MAXMSGSIZE)")
    m = p.add_argument_group(
        "memory bounds (with the defaults no one client or worker makes the broker hold more than a few tens of MB;"
        " clients keep within the client bounds themselves: set theirs to match)")
    m.add_argument("--max-client-requests", type=int, default=d.max_client_requests, metavar="N",
                   help="requests one client connection may have here, queued or at workers; more are answered "
                        "'overloaded' at once")
    m.add_argument("--max-client-bytes", type=_size, default=d.max_client_bytes, metavar="BYTES",
                   help="payload bytes of those requests; past it, 'overloaded' at once")
    m.add_argument("--max-client-unread", type=int, default=d.max_client_unread, metavar="N",
                   help="replies queued for one client that is not reading them (the front end's ZMQ_SNDHWM); "
                        "past it a reply is undeliverable: dropped, counted and logged")
    m.add_argument("--max-client-unread-bytes", type=_size, default=d.max_client_unread_bytes, metavar="BYTES",
                   help="bytes of replies queued for one client (within 1/16); a reply past it is replaced by a "
                        "'too large' answer")
    m.add_argument("--max-services", type=int, default=d.max_services, metavar="N",
                   help="services kept at once (clients create one by naming it; one nobody serves is forgotten "
                        "after --grace); a request naming a new one past this gets 'unavailable' at once")
    m.add_argument("--max-capacity", type=int, default=d.max_capacity, metavar="N",
                   help="credits granted to one worker connection; a larger declared capacity is clamped to it")
    m.add_argument("--max-worker-bytes", type=_size, default=d.max_worker_bytes, metavar="BYTES",
                   help="payload bytes of the requests one worker holds (those answered 'timeout' but not yet "
                        "replied to included); past it the worker gets nothing new until it replies")
    p.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace, metavar="SECONDS",
                   help="on SIGINT/SIGTERM, how long to wait for workers to answer what they hold")
    p.add_argument("--stats-interval", type=float, default=d.stats_interval, metavar="SECONDS",
                   help="how often to log counters (when they changed)")
    g = p.add_argument_group("Consul (optional: without it the broker's own heartbeat registry decides)")
    g.add_argument("--consul", default=os.environ.get("CONSUL_HTTP_ADDR"), metavar="HOST:PORT",
                   help="Consul agent to track workers through and register in (default: $CONSUL_HTTP_ADDR)")
    g.add_argument("--no-consul", action="store_true", help="ignore $CONSUL_HTTP_ADDR")
    g.add_argument("--consul-token", default=os.environ.get("CONSUL_HTTP_TOKEN"), metavar="TOKEN",
                   help="ACL token (default: $CONSUL_HTTP_TOKEN)")
    g.add_argument("--broker-service", default=d.broker_service, metavar="NAME",
                   help="service name this broker registers under, for workers and clients to discover")
    g.add_argument("--advertise-frontend", metavar="ENDPOINT",
                   help="front-end endpoint published in Consul (default: the bound one)")
    g.add_argument("--advertise-backend", metavar="ENDPOINT",
                   help="back-end endpoint published in Consul (default: the bound one)")
    c = p.add_argument_group("CURVE: encryption and authentication (see README, Security)")
    c.add_argument("--curve-secret-key", metavar="FILE",
                   help="this broker's .key_secret (from zrouter-keys): CURVE on both sockets")
    c.add_argument("--worker-keys", metavar="DIR",
                   help="public .key files of the workers allowed to register (required with CURVE)")
    c.add_argument("--client-keys", metavar="DIR",
                   help="public .key files of the clients allowed to connect (default: any client that "
                        "knows the broker's public key; encrypted, not authenticated)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", default="text", choices=FORMATS,
                   help="json: one JSON object a line (keys ts, level, logger, event; service, instance, rid)")
    h = p.add_argument_group("Observing and operating (off unless --http is given)")
    h.add_argument("--http", metavar="HOST:PORT",
                   help="serve the dashboard (/), /status, /metrics (Prometheus) and admin actions here; "
                        "port 0 picks a free port (logged)")
    h.add_argument("--admin-token", default=os.environ.get("ZROUTER_ADMIN_TOKEN") or None, metavar="TOKEN",
                   help="enable the admin actions (drain, weight, policy) for requests carrying "
                        "'Authorization: Bearer TOKEN' (default: $ZROUTER_ADMIN_TOKEN; none: admin off)")
    args = p.parse_args(argv)
    if args.curve_secret_key and not args.worker_keys:
        p.error("--curve-secret-key needs --worker-keys DIR (the workers' public keys)")
    if not args.curve_secret_key and (args.worker_keys or args.client_keys):
        p.error("--worker-keys and --client-keys need --curve-secret-key")
    return args


def config_from_args(args: argparse.Namespace) -> BrokerConfig:
    return BrokerConfig(
        frontend=args.frontend,
        backend=args.backend,
        heartbeat_interval=args.heartbeat,
        liveness=args.liveness,
        default_policy=args.policy,
        service_policies=dict(args.service_policy),
        slow_start=args.slow_start,
        service_slow_start=dict(args.service_slow_start),
        max_queue=args.max_queue,
        max_attempts=args.max_attempts,
        grace=args.grace,
        max_message_size=args.max_message_size,
        max_services=args.max_services,
        max_client_requests=args.max_client_requests,
        max_client_bytes=args.max_client_bytes,
        max_client_unread=args.max_client_unread,
        max_client_unread_bytes=args.max_client_unread_bytes,
        max_capacity=args.max_capacity,
        max_worker_bytes=args.max_worker_bytes,
        shutdown_grace=args.shutdown_grace,
        stats_interval=args.stats_interval,
        consul=None if args.no_consul else args.consul,
        consul_token=args.consul_token,
        broker_service=args.broker_service,
        advertise_frontend=args.advertise_frontend,
        advertise_backend=args.advertise_backend,
        http=args.http,
        admin_token=args.admin_token,
        curve_secret_key=args.curve_secret_key,
        worker_keys=args.worker_keys,
        client_keys=args.client_keys,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    log = logging.getLogger("zrouter.broker")
    try:
        broker = Broker(config_from_args(args))
    except (OSError, ValueError, RuntimeError, zmq.ZMQError) as exc:  # unreadable keys, no CURVE, bad --http
        log.error("cannot start: %s", exc)
        return 2
    try:
        broker.bind()
    except Exception as exc:
        log.error("cannot bind: %s", exc)
        broker.close()
        return 2
    exposed = exposed_endpoints([broker.frontend_endpoint, broker.backend_endpoint])
    if exposed and broker.auth is None:
        log.warning("listening beyond loopback (%s) without CURVE: anyone who can reach it may register as a "
                    "worker or call any service, in clear text; see README, Security", ", ".join(exposed))

    def _stop(signum: int, _frame: Any) -> None:
        logging.getLogger("zrouter.broker").info("received %s", signal.Signals(signum).name)
        broker.stop()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    if broker.auth is not None:
        def _reload(signum: int, _frame: Any) -> None:
            log.info("received SIGHUP: reloading keys")
            broker.call_soon(broker.reload_keys)

        signal.signal(signal.SIGHUP, _reload)
    try:
        broker.run()
    finally:
        broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
