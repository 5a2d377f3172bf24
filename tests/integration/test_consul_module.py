"""zrouter.consul against a real ``consul agent -dev`` (tests/consul_agent.py); no mocks.

Every wait is a poll with a deadline; TTLs and blocking-query waits are short (1-2 s) so the
module runs in well under a minute.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.consul_agent import ConsulAgent, free_port
from tests.helpers import eventually, unique
from zrouter.consul import (
    BrokerDiscovery,
    BrokerRegistration,
    ConsulUnavailable,
    Instance,
    ServiceWatcher,
    WorkerRegistration,
    consul_address,
    consul_token,
    instances_from_health,
)

pytestmark = pytest.mark.consul

WAIT = "1s"  # blocking-query wait for watchers: bounds each stop()

class Recorder:
    """Collects on_change / on_status calls from watcher threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changes: list[tuple[str, list[Instance]]] = []
        self.statuses: list[bool] = []

    def on_change(self, service: str, instances: list[Instance]) -> None:
        with self.lock:
            self.changes.append((service, instances))

    def on_status(self, up: bool) -> None:
        with self.lock:
            self.statuses.append(up)

    def latest(self, service: str) -> list[Instance] | None:
        with self.lock:
            for name, instances in reversed(self.changes):
                if name == service:
                    return instances
        return None

    def find(self, service: str, instance_id: str) -> Instance | None:
        for inst in self.latest(service) or ():
            if inst.instance_id == instance_id:
                return inst
        return None

    def wait_instance(
        self, service: str, instance_id: str, pred: Callable[[Instance], bool], what: str, timeout: float = 5.0
    ) -> Instance:
        """The instance once the latest view has it and *pred* holds for it."""

        def probe() -> Instance | None:
            inst = self.find(service, instance_id)
            return inst if inst is not None and pred(inst) else None

        return eventually(probe, timeout, what)

    def views(self, service: str) -> list[list[Instance]]:
        with self.lock:
            return [instances for name, instances in self.changes if name == service]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def regs() -> Iterator[list[WorkerRegistration | BrokerRegistration]]:
    """Registrations made by a test, deregistered (quietly) at its end."""
    made: list[WorkerRegistration | BrokerRegistration] = []
    yield made
    for reg in made:
        reg.close()


@pytest.fixture
def watchers() -> Iterator[list[ServiceWatcher | BrokerDiscovery]]:
    made: list[ServiceWatcher | BrokerDiscovery] = []
    yield made
    for w in made:
        w.stop()
    for w in made:
        w.join(5)
        assert not w.is_alive(), f"{w} did not stop"


def health(agent: ConsulAgent, service: str) -> list[dict[str, Any]]:
    _, entries = agent.client().health.service(service)
    return list(entries)


def check_status(agent: ConsulAgent, service: str, check_id: str) -> str | None:
    for entry in health(agent, service):
        for check in entry["Checks"]:
            if check["CheckID"] == check_id:
                return str(check["Status"])
    return None


# -- addresses (no agent needed) ------------------------------------------------------------------


def test_consul_address_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    assert consul_address() is None
    assert consul_address("10.1.2.3:8600") == ("10.1.2.3", 8600)
    assert consul_address("http://consul.local:18500") == ("consul.local", 18500)
    assert consul_address("https://[::1]:8501") == ("::1", 8501)
    assert consul_address("consul.local") == ("consul.local", 8500)
    with pytest.raises(ValueError):
        consul_address("ftp://x:1")
    with pytest.raises(ValueError):
        consul_address("host:notaport")
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:9500")
    assert consul_address() == ("127.0.0.1", 9500)
    assert consul_address("127.0.0.2:1") == ("127.0.0.2", 1)  # the argument wins
    assert consul_token() is None
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    assert consul_token() == "from-env"
    assert consul_token("explicit") == "explicit"


def test_unreachable_consul_raises_one_error_type() -> None:
    addr = f"127.0.0.1:{free_port()}"  # nothing listens there
    reg = WorkerRegistration("svc", "w1", address="127.0.0.1", ttl="2s", consul_addr=addr)
    for call in (reg.register, reg.pass_ttl, lambda: reg.set_weight(2), reg.deregister):
        with pytest.raises(ConsulUnavailable):
            call()
    reg.close()  # logs, does not raise
    with pytest.raises(ValueError):
        reg.set_weight(0)


# -- registration ----------------------------------------------------------------------------------


def test_register_shows_weights_meta_tags(
    consul_agent_module: ConsulAgent, regs: list[WorkerRegistration | BrokerRegistration]
) -> None:
    agent = consul_agent_module
    service, inst = unique("echo"), unique("w")
    reg = WorkerRegistration(
        service, inst, address="127.0.0.1", port=7000, weight=3, tags=["blue", "v2"],
        meta={"zone": "z1"}, ttl="5s", consul_addr=agent.http_addr,
    )
    regs.append(reg)
    reg.register()

    _, catalog = agent.client().catalog.service(service)
    assert len(catalog) == 1
    entry = catalog[0]
    assert entry["ServiceID"] == reg.service_id == f"{service}-{inst}"
    assert entry["ServiceWeights"] == {"Passing": 3, "Warning": 1}
    assert entry["ServiceMeta"] == {"instance": inst, "zone": "z1"}
    assert sorted(entry["ServiceTags"]) == ["blue", "v2"]
    assert (entry["ServiceAddress"], entry["ServicePort"]) == ("127.0.0.1", 7000)

    # Registered passing at once, with our TTL check.
    assert check_status(agent, service, reg.check_id) == "passing"
    [instance] = instances_from_health(health(agent, service))
    assert instance.instance_id == inst
    assert instance.service == service
    assert (instance.status, instance.maintenance, instance.routable) == ("passing", False, True)
    assert (instance.weight_passing, instance.weight_warning, instance.effective_weight) == (3, 1, 3)
    assert instance.meta == {"instance": inst, "zone": "z1"}
    assert instance.tags == ("blue", "v2")
    assert (instance.address, instance.port) == ("127.0.0.1", 7000)
    assert instance.node == agent.node


def test_ttl_passing_then_critical_then_deregistered(
    consul_agent_module: ConsulAgent, regs: list[WorkerRegistration | BrokerRegistration]
) -> None:
    agent = consul_agent_module
    service = unique("ttl")
    reg = WorkerRegistration(service, "w1", address="127.0.0.1", ttl="1s", consul_addr=agent.http_addr)
    regs.append(reg)
    reg.register()
    assert reg.pass_ttl("alive") is False  # known check: no re-registration
    assert check_status(agent, service, reg.check_id) == "passing"
    # The agent has the note at once (the catalog gets output-only changes later).
    assert agent.client().agent.checks()[reg.check_id]["Output"] == "alive"

    # No pass for longer than the TTL: critical, and then not routable.
    eventually(lambda: check_status(agent, service, reg.check_id) == "critical", 5, "TTL expiry")
    [instance] = instances_from_health(health(agent, service))
    assert (instance.status, instance.routable, instance.effective_weight) == ("critical", False, 0)

    # Passing again brings it back.
    reg.pass_ttl()
    assert check_status(agent, service, reg.check_id) == "passing"

    reg.deregister()
    assert health(agent, service) == []
    _, catalog = agent.client().catalog.service(service)
    assert catalog == []
    assert reg.pass_ttl() is False  # after deregister(): no-op, does not come back
    assert health(agent, service) == []


def test_pass_ttl_registers_again_when_agent_forgot(
    consul_agent_module: ConsulAgent, regs: list[WorkerRegistration | BrokerRegistration]
) -> None:
    agent = consul_agent_module
    service = unique("forgot")
    reg = WorkerRegistration(
        service, "w1", address="127.0.0.1", weight=2, ttl="5s", consul_addr=agent.http_addr
    )
    regs.append(reg)
    reg.register()
    agent.client().agent.service.deregister(reg.service_id)  # as if the agent lost its state
    assert health(agent, service) == []
    assert reg.pass_ttl("back") is True
    [instance] = instances_from_health(health(agent, service))
    assert (instance.instance_id, instance.status, instance.weight_passing) == ("w1", "passing", 2)

    # A first pass_ttl() without register() registers too; set_weight() before that does not.
    lazy = WorkerRegistration(service, "w2", address="127.0.0.1", ttl="5s", consul_addr=agent.http_addr)
    regs.append(lazy)
    lazy.set_weight(6)
    assert [i.instance_id for i in instances_from_health(health(agent, service))] == ["w1"]
    assert lazy.pass_ttl() is True
    assert lazy.registered and lazy.pass_ttl() is False
    by_id = {i.instance_id: i for i in instances_from_health(health(agent, service))}
    assert (by_id["w2"].status, by_id["w2"].weight_passing) == ("passing", 6)


# -- watching ----------------------------------------------------------------------------------


def test_watcher_sees_maintenance_weight_and_warning(
    consul_agent_module: ConsulAgent,
    regs: list[WorkerRegistration | BrokerRegistration],
    watchers: list[ServiceWatcher | BrokerDiscovery],
    recorder: Recorder,
) -> None:
    agent = consul_agent_module
    service = unique("maint")
    watcher = ServiceWatcher(
        [service], recorder.on_change, consul_addr=agent.http_addr, wait=WAIT, on_status=recorder.on_status
    )
    watchers.append(watcher)
    watcher.start()
    # Once at start, even with no instance.
    eventually(lambda: recorder.latest(service) == [], 5, "the first (empty) view")
    assert recorder.statuses == [True]

    reg = WorkerRegistration(service, "w1", address="127.0.0.1", weight=4, ttl="30s", consul_addr=agent.http_addr)
    regs.append(reg)
    reg.register()
    inst = recorder.wait_instance(service, "w1", lambda i: True, "the registered instance")
    assert (inst.routable, inst.effective_weight) == (True, 4)

    # Service maintenance with the real CLI.
    out = agent.cli("maint", "-enable", f"-service={reg.service_id}", "-reason=zrouter test")
    assert out.returncode == 0, out.stderr
    inst = recorder.wait_instance(service, "w1", lambda i: i.maintenance, "maintenance")
    assert (inst.routable, inst.status, inst.effective_weight) == (False, "critical", 0)
    assert watcher.view(service) == recorder.latest(service)

    out = agent.cli("maint", "-disable", f"-service={reg.service_id}")
    assert out.returncode == 0, out.stderr
    inst = recorder.wait_instance(service, "w1", lambda i: not i.maintenance, "maintenance off")
    assert (inst.routable, inst.status, inst.effective_weight) == (True, "passing", 4)

    # A weight change reaches the watcher.
    reg.set_weight(9)
    recorder.wait_instance(service, "w1", lambda i: i.weight_passing == 9, "weight 9")
    # Warning: still routable, weighs Weights.Warning.
    reg.warn_ttl("slow")
    inst = recorder.wait_instance(service, "w1", lambda i: i.status == "warning", "warning")
    assert (inst.routable, inst.effective_weight) == (True, 1)
    reg.set_weight(5)  # keeps the check's status
    inst = recorder.wait_instance(service, "w1", lambda i: i.weight_passing == 5, "weight 5")
    assert inst.status == "warning"

    # Node maintenance too.
    out = agent.cli("maint", "-enable", "-reason=node test")
    assert out.returncode == 0, out.stderr
    try:
        recorder.wait_instance(service, "w1", lambda i: i.maintenance, "node maintenance")
    finally:
        agent.cli("maint", "-disable")
    recorder.wait_instance(service, "w1", lambda i: not i.maintenance, "node maintenance off")

    reg.deregister()
    eventually(lambda: recorder.latest(service) == [], 5, "the instance gone")
    assert recorder.statuses == [True]
    # Each delivered view differs from the one before it.
    views = recorder.views(service)
    assert all(a != b for a, b in itertools.pairwise(views))


def test_watcher_add_service_callable_and_stop(
    consul_agent_module: ConsulAgent,
    regs: list[WorkerRegistration | BrokerRegistration],
    recorder: Recorder,
) -> None:
    agent = consul_agent_module
    a, b, c = unique("a"), unique("b"), unique("c")
    wanted = {a}
    watcher = ServiceWatcher(
        lambda: set(wanted), recorder.on_change, consul_addr=agent.http_addr, wait=WAIT, refresh=0.1
    )
    watcher.start()
    try:
        eventually(lambda: recorder.latest(a) == [], 5, "view of a")
        wanted.add(b)  # the callable's set grows
        eventually(lambda: recorder.latest(b) == [], 5, "view of b")
        watcher.add_service(c)
        eventually(lambda: recorder.latest(c) == [], 5, "view of c")
        assert watcher.services == {a, b, c}
        reg = WorkerRegistration(c, "w1", address="127.0.0.1", ttl="30s", consul_addr=agent.http_addr)
        regs.append(reg)
        reg.register()
        eventually(lambda: recorder.find(c, "w1"), 5, "instance of c")
        wanted.discard(a)
        eventually(lambda: watcher.services == {b, c}, 5, "a no longer watched")
        assert watcher.view(a) is None
    finally:
        started = time.monotonic()
        watcher.stop(timeout=5)
        took = time.monotonic() - started
    assert not watcher.is_alive()
    assert took < 1 * 17 / 16 + 1.0, f"stop took {took:.2f}s"
    n = len(recorder.changes)
    reg.deregister()
    time.sleep(0.2)  # nothing may arrive after stop(): give a late callback a chance to show up
    assert len(recorder.changes) == n


def test_watcher_unreachable_at_start_then_up(
    consul_bin: str,
    tmp_path: Any,
    regs: list[WorkerRegistration | BrokerRegistration],
    watchers: list[ServiceWatcher | BrokerDiscovery],
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = ConsulAgent(consul_bin, log_dir=tmp_path)
    agent.pick_ports()  # ports chosen, agent not started yet
    service = unique("late")
    watcher = ServiceWatcher(
        [service], recorder.on_change, consul_addr=agent.http_addr, wait=WAIT, on_status=recorder.on_status
    )
    watchers.append(watcher)
    with caplog.at_level(logging.INFO, logger="zrouter.consul"):
        watcher.start()
        eventually(lambda: recorder.statuses == [False], 5, "down reported")
        assert recorder.changes == []
        try:
            agent.start()
            reg = WorkerRegistration(service, "w1", address="127.0.0.1", ttl="30s", consul_addr=agent.http_addr)
            regs.append(reg)
            reg.register()
            eventually(lambda: recorder.find(service, "w1"), 10, "instance after Consul came up")
            assert recorder.statuses == [False, True]
            reg.deregister()
            watcher.stop(timeout=5)
        finally:
            agent.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "zrouter.consul"]
    assert sum("Consul unreachable" in m for m in messages) == 1  # however many retries
    assert sum("reachable again" in m for m in messages) == 1


def test_watcher_survives_agent_restart(
    consul_agent: ConsulAgent,
    regs: list[WorkerRegistration | BrokerRegistration],
    watchers: list[ServiceWatcher | BrokerDiscovery],
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = consul_agent
    service = unique("restart")
    graceful, strict = Recorder(), Recorder()
    w1 = ServiceWatcher(
        [service], graceful.on_change, consul_addr=agent.http_addr, wait=WAIT,
        on_status=graceful.on_status, reconnect_grace=30.0,
    )
    w2 = ServiceWatcher(
        [service], strict.on_change, consul_addr=agent.http_addr, wait=WAIT,
        on_status=strict.on_status, reconnect_grace=0,
    )
    watchers += [w1, w2]
    reg = WorkerRegistration(service, "w1", address="127.0.0.1", weight=2, ttl="30s", consul_addr=agent.http_addr)
    regs.append(reg)
    reg.register()
    with caplog.at_level(logging.INFO, logger="zrouter.consul"):
        w1.start()
        w2.start()
        for rec in (graceful, strict):
            rec.wait_instance(service, "w1", lambda i: True, "instance before the restart")
        before = graceful.latest(service)

        agent.stop()
        eventually(lambda: graceful.statuses == strict.statuses == [True, False], 5, "outage noticed")
        # During the outage: the last view is kept; nothing is delivered.
        time.sleep(1.5)  # let both watchers retry a few times (backoff 0.5 s, 1 s)
        assert graceful.latest(service) == before and strict.latest(service) == before
        with pytest.raises(ConsulUnavailable):
            reg.pass_ttl()

        agent.start()  # same ports, empty catalog (-dev)
        eventually(lambda: graceful.statuses == strict.statuses == [True, False, True], 10, "Consul back")
        # Consul's truth is "no instance" now: the strict watcher says so; the graceful one keeps
        # the instance for its reconnect_grace.
        eventually(lambda: strict.latest(service) == [], 5, "strict watcher sees the empty catalog")
        assert graceful.latest(service) == before

        # The worker's next pass re-registers it; both watchers see it (weight 7 is new).
        assert reg.pass_ttl("after restart") is True
        reg.set_weight(7)
        for rec in (graceful, strict):
            rec.wait_instance(service, "w1", lambda i: i.weight_passing == 7, "the re-registered instance", 10)
    assert all(v for v in graceful.views(service)), "graceful watcher delivered an empty view"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Consul unreachable" in m for m in messages) == 2  # one per watcher
    assert sum("reachable again" in m for m in messages) == 2


def test_broker_registration_and_discovery(
    consul_agent_module: ConsulAgent,
    regs: list[WorkerRegistration | BrokerRegistration],
    watchers: list[ServiceWatcher | BrokerDiscovery],
) -> None:
    agent = consul_agent_module
    service = unique("zrouter-broker")
    seen: list[list[tuple[str, str]]] = []
    disc = BrokerDiscovery(seen.append, service=service, consul_addr=agent.http_addr, wait=WAIT)
    watchers.append(disc)
    disc.start()
    eventually(lambda: seen == [[]], 5, "the first (empty) broker list")

    b1 = BrokerRegistration(
        "tcp://*:5555", "tcp://*:5556", instance_id="b1", service=service, ttl="30s", consul_addr=agent.http_addr
    )
    b2 = BrokerRegistration(
        "tcp://127.0.0.2:6555", "tcp://127.0.0.2:6556", instance_id="b2", service=service, ttl="30s",
        consul_addr=agent.http_addr,
    )
    regs += [b1, b2]
    b1.register()
    b2.register()
    both = [("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"), ("tcp://127.0.0.2:6555", "tcp://127.0.0.2:6556")]
    eventually(lambda: disc.endpoints == both, 5, "both brokers")
    assert seen[-1] == both

    _, catalog = agent.client().catalog.service(service)
    by_id = {e["ServiceMeta"]["instance"]: e for e in catalog}
    assert by_id["b1"]["ServiceMeta"] == {"instance": "b1", "frontend": "tcp://*:5555", "backend": "tcp://*:5556"}
    assert (by_id["b2"]["ServiceAddress"], by_id["b2"]["ServicePort"]) == ("127.0.0.2", 6555)

    # A broker in maintenance is not offered; closing one removes it.
    assert agent.cli("maint", "-enable", f"-service={b2.service_id}").returncode == 0
    eventually(lambda: disc.endpoints == both[:1], 5, "b2 out (maintenance)")
    b1.close()
    eventually(lambda: disc.endpoints == [], 5, "b1 gone")
    assert agent.cli("maint", "-disable", f"-service={b2.service_id}").returncode == 0
    eventually(lambda: disc.endpoints == both[1:], 5, "b2 back")
    assert all(a != b for a, b in itertools.pairwise(seen))
    assert disc.up is True
