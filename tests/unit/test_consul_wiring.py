"""How workers and clients are wired to Consul, checked without an agent (the end-to-end
behaviour is in tests/integration/test_consul_system.py). Addresses point at a closed port: the
watcher threads some of these start only ever fail to connect, quietly."""

from __future__ import annotations

import asyncio
import select
import time
from typing import Any

import pytest

from zrouter.client import AsyncClient, Client
from zrouter.client._consul_link import BrokerFeed
from zrouter.worker import Worker
from zrouter.worker._consul_link import MIN_TTL, BrokerFollower, ConsulRegistration, consul_ttl
from zrouter.worker.cli import build_parser
from zrouter.worker.cli import main as worker_main
from zrouter.worker.examples import echo

NOWHERE = "127.0.0.1:1"  # nothing listens on port 1


def test_worker_registration_carries_weight_meta_tags_ttl_and_token() -> None:
    w = Worker("svc", echo, consul=NOWHERE, consul_token="s3cret", tags=["blue", "eu"], weight=2,
               heartbeat_interval=0.5, liveness=4, meta={"zone": "eu"})  # fmt: skip
    hook = w._registration
    assert isinstance(hook, ConsulRegistration)
    reg = hook.registration
    assert reg.service == "svc"
    assert reg.service_id == w.instance_id  # what `consul maint -service=` takes, as in the logs
    assert reg.weight == 2 and reg.tags == ["blue", "eu"]
    assert reg.meta["instance"] == w.instance_id and reg.meta["zone"] == "eu"
    assert reg.meta["heartbeat_ms"] == "500"
    assert reg.ttl_seconds == 2.0  # heartbeat x liveness
    assert reg.deregister_after == "1m"
    assert reg._client.token == "s3cret"
    assert w.brokers == ["tcp://127.0.0.1:5556"]  # registration alone changes no endpoint


def test_ttl_is_heartbeat_times_liveness_with_a_floor() -> None:
    assert consul_ttl(1.0, 3) == 3.0
    assert consul_ttl(0.2, 3) == MIN_TTL
    assert consul_ttl(5.0, 2) == 10.0


def test_custom_instance_gets_the_usual_service_id() -> None:
    w = Worker("svc", echo, consul=NOWHERE, meta={"instance": "box-7"})
    assert isinstance(w._registration, ConsulRegistration)
    assert w._registration.service_id == "svc-box-7"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"consul": NOWHERE, "registration": object()},  # two registrations
        {"broker_service": "zrouter-broker"},  # nowhere to look it up
        {"consul": NOWHERE, "broker_service": "b", "broker": "tcp://x:1"},  # two sources of brokers
        {"consul": NOWHERE, "weight": 0},  # Consul's Weights cannot say 0
        {"consul": "host:notaport"},
    ],
)
def test_worker_rejects_conflicting_consul_options(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Worker("svc", echo, **kwargs)


def test_worker_with_broker_service_starts_with_no_broker() -> None:
    w = Worker("svc", echo, consul=NOWHERE, broker_service="zrouter-broker")
    assert w.brokers == []
    assert w._follower is not None and w._follower.service == "zrouter-broker"


def test_broker_follower_applies_backends_and_ignores_an_empty_list() -> None:
    applied: list[list[str]] = []
    follower = BrokerFollower(applied.append, service="zrouter-broker", consul=NOWHERE, token=None)
    follower._changed([("tcp://h2:5555", "tcp://h2:5556"), ("tcp://h1:5555", "tcp://h1:5556")])
    follower._changed([("tcp://h1:5555", "tcp://h1:5556"), ("tcp://h2:5555", "tcp://h2:5556")])  # same set
    follower._changed([])  # all brokers critical, or an empty catalog: keep the connections
    follower._changed([("tcp://h2:5555", "tcp://h2:5556")])
    assert applied == [["tcp://h1:5556", "tcp://h2:5556"], ["tcp://h2:5556"]]


def test_worker_cli_consul_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "10.0.0.1:8500")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "tok")
    args = build_parser().parse_args(["--service", "s", "--tag", "a", "--tag", "b", "--broker-service", "brk", "m:f"])
    assert (args.consul, args.consul_token, args.tag, args.broker_service) == ("10.0.0.1:8500", "tok", ["a", "b"], "brk")
    assert not args.no_consul
    monkeypatch.delenv("CONSUL_HTTP_ADDR")
    monkeypatch.delenv("CONSUL_HTTP_TOKEN")
    args = build_parser().parse_args(["--service", "s", "m:f"])
    assert (args.consul, args.consul_token, args.tag, args.broker_service) == (None, None, [], None)


@pytest.mark.parametrize(
    "argv",
    [
        ["--broker-service", "brk"],  # no Consul to look in
        ["--consul", NOWHERE, "--no-consul", "--broker-service", "brk"],
        ["--consul", NOWHERE, "--broker-service", "brk", "--broker", "tcp://x:1"],
    ],
)
def test_worker_cli_refuses_broker_service_without_consul_or_with_broker(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    with pytest.raises(SystemExit) as info:
        worker_main(["--service", "s", *argv, "zrouter.worker.examples:echo"])
    assert info.value.code == 2


def test_broker_feed_hands_over_front_ends_once_and_wakes_a_poller() -> None:
    feed = BrokerFeed(service="zrouter-broker", consul=NOWHERE, wake_fd=True)
    try:
        assert feed.take() is None and not feed.changed
        feed._on_change([])  # nothing routable: not handed over
        assert not feed.changed and not select.select([feed], [], [], 0)[0]
        feed._on_change([("tcp://h2:5555", "tcp://h2:5556"), ("tcp://h1:5555", "tcp://h1:5556")])
        assert feed.changed and select.select([feed], [], [], 0)[0]
        assert feed.take() == ["tcp://h1:5555", "tcp://h2:5555"]
        assert not feed.changed and not select.select([feed], [], [], 0)[0]  # drained: no spinning
        assert feed.take() is None
    finally:
        feed.close()


def test_clients_refuse_endpoints_and_consul_together() -> None:
    with pytest.raises(ValueError):
        Client("tcp://127.0.0.1:5555", consul=NOWHERE)
    with pytest.raises(ValueError):
        AsyncClient("tcp://127.0.0.1:5555", consul=NOWHERE)
    with pytest.raises(ValueError):
        Client(consul="host:notaport")


def test_sync_client_applies_a_discovered_list_from_its_own_thread() -> None:
    with Client(consul=NOWHERE, broker_service="brk") as client:
        assert client.brokers == []
        feed = client._feed
        assert feed is not None
        feed._on_change([("tcp://127.0.0.1:9", "tcp://127.0.0.1:10")])  # as the watcher thread would
        assert client.brokers == ["tcp://127.0.0.1:9"]
    assert client._feed is None


async def test_async_client_applies_a_discovered_list_on_its_loop() -> None:
    async with AsyncClient(consul=NOWHERE, broker_service="brk") as client:
        feed = client._feed
        assert feed is not None
        await asyncio.to_thread(feed._on_change, [("tcp://127.0.0.1:9", "tcp://127.0.0.1:10")])
        deadline = time.monotonic() + 5
        while client.brokers != ["tcp://127.0.0.1:9"]:
            assert time.monotonic() < deadline, client.brokers
            await asyncio.sleep(0.01)
