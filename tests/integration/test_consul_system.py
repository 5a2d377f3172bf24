"""Consul end to end: a real ``consul agent -dev``, real broker and worker processes, real sockets.

Brokers run with ``--consul`` (tracking workers and registering themselves), workers with
``--consul`` (registering, passing their TTL every heartbeat). Heartbeats are 0.2 s, so a
worker's TTL is the 2 s floor. Every wait polls Consul or a process log against a deadline;
nothing sleeps to synchronise. Each test uses its own service names, so tests sharing the
module's agent cannot see each other's leftovers (a killed worker's entry stays for a minute).
"""

from __future__ import annotations

import collections
import json
import re
import threading
import urllib.request
from typing import Any

import pytest

from zrouter.client import AsyncClient, Client
from tests.consul_agent import ConsulAgent
from tests.helpers import eventually, unique
from tests.procs import BrokerProc, ProcessGroup, WorkerProc

pytestmark = [pytest.mark.consul, pytest.mark.timeout(90)]


def consul_broker(procs: ProcessGroup, agent: ConsulAgent, *extra: str, broker_service: str) -> BrokerProc:
    return procs.broker("--consul", agent.http_addr, "--broker-service", broker_service, *extra)


def consul_worker(procs: ProcessGroup, agent: ConsulAgent, broker: BrokerProc | None, service: str,
                  *extra: str, broker_service: str | None = None, **kw: Any) -> WorkerProc:
    args = ["--consul", agent.http_addr, *extra]
    if broker_service is not None:
        args += ["--broker-service", broker_service]
    return procs.worker(broker, service=service, extra=args, **kw)


def instance_of(worker: WorkerProc) -> str:
    """The worker's instance id (also its Consul service id), from its log."""
    pattern = r"registered in Consul at \S+ as (\S+)"
    worker.wait_for(pattern)
    for line in worker.lines:
        m = re.search(pattern, line)
        if m:
            return m.group(1)
    raise AssertionError("unreachable")


def health(agent: ConsulAgent, service: str) -> dict[str, dict[str, Any]]:
    """Consul's health entries of *service* by service id."""
    _, entries = agent.client().health.service(service)
    return {e["Service"]["ID"]: e for e in entries}


def ttl_status(agent: ConsulAgent, service: str, service_id: str) -> str | None:
    entry = health(agent, service).get(service_id)
    for check in (entry or {}).get("Checks", ()):
        if check["CheckID"] == f"zrouter-ttl:{service_id}":
            return str(check["Status"])
    return None


def set_consul_weight(agent: ConsulAgent, service_id: str, weight: int) -> None:
    """What an operator does (see the README): read the instance's definition back from the agent
    and register it again, same id, with new Weights. Its checks are kept."""
    with urllib.request.urlopen(f"{agent.url}/v1/agent/service/{service_id}", timeout=5) as resp:
        svc = json.loads(resp.read())
    body = {k: svc[k] for k in ("ID", "Tags", "Meta", "Address", "Port")}
    body.update(Name=svc["Service"], Weights={"Passing": weight, "Warning": 1})
    req = urllib.request.Request(f"{agent.url}/v1/agent/service/register", data=json.dumps(body).encode(),
                                 method="PUT")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def served_by(answers: list[dict[str, Any]]) -> collections.Counter[str]:
    return collections.Counter(str(a["worker"]) for a in answers)


def in_windows(client: Client, service: str, n: int, window: int, start: int = 0) -> list[dict[str, Any]]:
    """*n* requests, at most *window* in flight: below every worker's capacity, so the policy
    (not the credits) decides where each one goes."""
    answers: list[dict[str, Any]] = []
    for base in range(start, start + n, window):
        pending = [client.submit(service, i) for i in range(base, min(base + window, start + n))]
        answers += [p.result() for p in pending]
    assert [a["payload"] for a in answers] == list(range(start, start + n))
    return answers


# -- registration -------------------------------------------------------------------------------


def test_worker_registers_with_weight_meta_tags_and_deregisters_on_clean_exit(
    procs: ProcessGroup, consul_agent_module: ConsulAgent
) -> None:
    agent, svc = consul_agent_module, unique("reg")
    broker = consul_broker(procs, agent, broker_service=unique("brk"))
    worker = consul_worker(procs, agent, broker, svc, "--tag", "blue", "--meta", "zone=eu", weight=3)
    wid = instance_of(worker)
    broker.wait_for(rf"worker {wid}: Consul says passing: routable, weight 3")

    _, catalog = agent.client().catalog.service(svc)
    assert len(catalog) == 1
    entry = catalog[0]
    assert entry["ServiceID"] == wid
    assert entry["ServiceWeights"] == {"Passing": 3, "Warning": 1}
    assert entry["ServiceMeta"]["instance"] == wid  # what the broker matches READY's meta against
    assert entry["ServiceMeta"]["zone"] == "eu" and entry["ServiceMeta"]["pid"] == str(worker.pid)
    assert entry["ServiceTags"] == ["blue"]
    assert ttl_status(agent, svc, wid) == "passing"
    _, checks = agent.client().health.checks(svc)
    ttl = next(c for c in checks if c["CheckID"] == f"zrouter-ttl:{wid}")
    assert ttl["Type"] == "ttl"

    with Client(broker.frontend, timeout=5) as client:
        assert client.request(svc, "hi") == {"worker": wid, "payload": "hi"}

    worker.stop()  # SIGTERM: drain, deregister, exit 0
    assert worker.wait() == 0
    assert worker.count(rf"deregistered {wid} from Consul") == 1
    assert agent.client().catalog.service(svc)[1] == []
    broker.wait_for(rf"worker {wid} left service .*said goodbye")


def test_sigkilled_worker_goes_critical_and_its_requests_are_requeued(
    procs: ProcessGroup, consul_agent_module: ConsulAgent
) -> None:
    agent, svc = consul_agent_module, unique("kill")
    broker = consul_broker(procs, agent, broker_service=unique("brk"))
    victim = consul_worker(procs, agent, broker, svc, capacity=4, delay=0.3)
    vid = instance_of(victim)
    broker.wait_for(rf"worker {vid}: Consul says passing")
    others = [consul_worker(procs, agent, broker, svc, capacity=4, delay=0.05) for _ in range(2)]
    for w in others:
        broker.wait_for(rf"worker {instance_of(w)}: Consul says passing")

    with Client(broker.frontend, timeout=20) as client:
        pending = [client.submit(svc, i) for i in range(60)]
        # All three are idle, so each takes 4 at once; a first reply (fast workers: 50 ms) means
        # the dispatch happened while the victim (300 ms a request) still holds its 4.
        eventually(lambda: any(p.done() for p in pending), 10, "a first reply")
        victim.kill()
        answers = [p.result() for p in pending]
    assert [a["payload"] for a in answers] == list(range(60))  # each once, correct
    assert vid not in served_by(answers)
    assert broker.count(rf"worker {vid} left service .*connection closed\); [1-9]\d* requests requeued") == 1

    eventually(lambda: ttl_status(agent, svc, vid) == "critical", 10, "the killed worker's TTL check to go critical")
    assert vid in health(agent, svc)  # still listed (critical) until DeregisterCriticalServiceAfter reaps it
    assert all(ttl_status(agent, svc, instance_of(w)) == "passing" for w in others)


# -- Consul drives routing ----------------------------------------------------------------------


def test_maintenance_drains_a_worker_and_disable_restores_it(
    procs: ProcessGroup, consul_agent_module: ConsulAgent
) -> None:
    agent, svc = consul_agent_module, unique("maint")
    broker = consul_broker(procs, agent, "--policy", "round-robin", broker_service=unique("brk"))
    a = consul_worker(procs, agent, broker, svc, capacity=4)
    b = consul_worker(procs, agent, broker, svc, capacity=4)
    aid, bid = instance_of(a), instance_of(b)
    for wid in (aid, bid):
        broker.wait_for(rf"worker {wid}: Consul says passing")

    with Client(broker.frontend, timeout=10) as client:
        before = served_by(in_windows(client, svc, 60, 4))
        assert before[aid] >= 20 and before[bid] >= 20, before

        out = agent.cli("maint", "-enable", f"-service={aid}", "-reason=test")
        assert out.returncode == 0, out.stderr
        broker.wait_for(rf"worker {aid}: Consul says critical \(maintenance\): no new work")
        during = served_by(in_windows(client, svc, 60, 4, start=60))
        assert during == {bid: 60}, during

        out = agent.cli("maint", "-disable", f"-service={aid}")
        assert out.returncode == 0, out.stderr
        broker.wait_for(rf"worker {aid}: Consul says passing: routable")
        after = served_by(in_windows(client, svc, 60, 4, start=120))
        assert after[aid] >= 20 and after[bid] >= 20, after
    assert a.popen is not None and a.popen.poll() is None  # drained by Consul, never disconnected


def test_weight_changed_in_consul_shifts_the_weighted_split(
    procs: ProcessGroup, consul_agent_module: ConsulAgent
) -> None:
    agent, svc = consul_agent_module, unique("weight")
    broker = consul_broker(procs, agent, "--policy", "weighted", broker_service=unique("brk"))
    light = consul_worker(procs, agent, broker, svc, capacity=50)
    heavy = consul_worker(procs, agent, broker, svc, capacity=50)
    lid, hid = instance_of(light), instance_of(heavy)
    for wid in (lid, hid):
        broker.wait_for(rf"worker {wid}: Consul says passing: routable, weight 1")

    with Client(broker.frontend, timeout=10) as client:
        even = served_by(in_windows(client, svc, 200, 16))
        assert abs(even[hid] / even[lid] - 1.0) <= 0.1, even

        set_consul_weight(agent, hid, 3)
        broker.wait_for(rf"worker {hid}: Consul says passing: routable, weight 3")
        split = served_by(in_windows(client, svc, 800, 16, start=200))
    ratio = split[hid] / split[lid]
    print(f"weights 1:3 in Consul -> served {split[lid]}:{split[hid]} (ratio {ratio:.3f})")
    assert abs(ratio - 3.0) <= 0.3, split
    # The worker's own TTL passes kept the re-registered instance healthy.
    assert ttl_status(agent, svc, hid) == "passing"


# -- Consul going away --------------------------------------------------------------------------


class Traffic(threading.Thread):
    """A client in its own thread sending requests, at most *window* in flight, until stopped;
    records every answer and every error."""

    def __init__(self, frontend: str, service: str, window: int = 8) -> None:
        super().__init__(name="traffic", daemon=True)
        self.frontend, self.service, self.window = frontend, service, window
        self.answers: list[Any] = []
        self.errors: list[BaseException] = []
        self.sent = 0
        self._halt = threading.Event()

    def run(self) -> None:
        with Client(self.frontend, timeout=10) as client:
            while not self._halt.is_set():
                pending = [(self.sent + i, client.submit(self.service, self.sent + i)) for i in range(self.window)]
                self.sent += self.window
                for i, p in pending:
                    try:
                        answer = p.result()
                    except Exception as exc:
                        self.errors.append(exc)
                        continue
                    if answer["payload"] != i:
                        self.errors.append(AssertionError(f"request {i} answered with {answer!r}"))
                    self.answers.append(answer)

    def progress(self, more: int, what: str) -> None:
        """Wait until *more* further answers came in (fail on the first error)."""
        target = len(self.answers) + more
        eventually(lambda: self.errors or len(self.answers) >= target, 20, what)
        assert not self.errors, self.errors[:3]

    def finish(self) -> None:
        self._halt.set()
        self.join(30)
        assert not self.is_alive()


def test_consul_stopped_and_restarted_under_traffic_loses_no_request(
    procs: ProcessGroup, consul_agent: ConsulAgent
) -> None:
    agent, svc = consul_agent, unique("outage")
    broker = consul_broker(procs, agent, broker_service=unique("brk"))
    workers = [consul_worker(procs, agent, broker, svc, capacity=4, delay=0.01) for _ in range(2)]
    wids = [instance_of(w) for w in workers]
    for wid in wids:
        broker.wait_for(rf"worker {wid}: Consul says passing")

    traffic = Traffic(broker.frontend, svc)
    traffic.start()
    try:
        traffic.progress(50, "traffic before the outage")
        agent.stop()
        broker.wait_for("Consul unreachable: routing on heartbeats")
        for w in workers:
            w.wait_for(r"Consul registration of .*\(retrying every heartbeat\)")
        traffic.progress(100, "traffic while Consul is down")
        agent.start()  # same ports, empty catalog (-dev): everyone must register again
        for wid in wids:
            eventually(lambda wid=wid: ttl_status(agent, svc, wid) == "passing", 15, f"{wid} registered again")
        broker.wait_for("Consul reachable again")
        traffic.progress(100, "traffic after the restart")
    finally:
        traffic.finish()
    assert not traffic.errors, traffic.errors[:3]
    assert len(traffic.answers) == traffic.sent  # every request answered, none lost
    assert set(served_by(traffic.answers)) == set(wids)
    for w in workers:
        assert w.count("Consul registration of .* restored") >= 1
    assert broker.count(r"Consul says .*no new work") == 0  # nobody was drained by the outage


# -- several brokers ----------------------------------------------------------------------------


def test_two_brokers_one_killed_every_idempotent_request_answered_once(
    procs: ProcessGroup, consul_agent_module: ConsulAgent, caplog: pytest.LogCaptureFixture
) -> None:
    agent, svc, bsvc = consul_agent_module, unique("two"), unique("brk")
    stats = ("--stats-interval", "0.2")  # each broker logs what it accepted: the client's spread
    first = consul_broker(procs, agent, *stats, broker_service=bsvc)
    workers = [consul_worker(procs, agent, None, svc, broker_service=bsvc, capacity=4, delay=0.02)
               for _ in range(2)]
    first.wait_workers(2)
    second = consul_broker(procs, agent, *stats, broker_service=bsvc)
    second.wait_workers(2)  # the workers followed Consul to the new broker...
    for w in workers:  # ...and split their capacity: the two brokers can never overfill them
        w.wait_for(rf"broker {re.escape(first.backend)}: capacity 4 -> 2")
        w.wait_for(rf"broker {re.escape(second.backend)}: capacity 0 -> 2")

    with Client(consul=agent.http_addr, broker_service=bsvc, timeout=20) as client:
        assert client.wait_connected(2, timeout=15)
        assert sorted(client.brokers) == sorted([first.frontend, second.frontend])
        assert [a["payload"] for a in client.map(svc, range(100))] == list(range(100))
        for b in (first, second):  # both brokers took a share
            b.wait_for(r"stats: \{'accepted': [1-9]")

        pending = [client.submit(svc, i) for i in range(100, 400)]
        eventually(lambda: sum(p.done() for p in pending) >= 20, 10, "requests under way")
        first.kill()
        answers = [p.result() for p in pending]  # re-sent to the survivor when needed; none lost
        assert [a["payload"] for a in answers] == list(range(100, 400))
        assert any(re.search(rf"pending on {re.escape(first.frontend)} re-sent", r.getMessage())
                   for r in caplog.records)  # the kill did catch requests in flight there

        for w in workers:  # the survivor gets each worker's whole capacity back
            w.wait_for(rf"broker {re.escape(second.backend)}: capacity 2 -> 4")
        assert [a["payload"] for a in client.map(svc, range(400, 450))] == list(range(400, 450))


async def test_async_client_and_workers_wait_for_a_broker_to_appear_in_consul(
    procs: ProcessGroup, consul_agent_module: ConsulAgent
) -> None:
    agent, svc, bsvc = consul_agent_module, unique("late"), unique("brk")
    worker = consul_worker(procs, agent, None, svc, broker_service=bsvc)
    worker.wait_for("discovering brokers through Consul")
    async with AsyncClient(consul=agent.http_addr, broker_service=bsvc, timeout=20) as client:
        early = client.submit(svc, "sent before any broker existed")  # waits for one
        broker = consul_broker(procs, agent, broker_service=bsvc)
        assert (await early)["payload"] == "sent before any broker existed"
        assert client.brokers == [broker.frontend]
        assert (await client.request(svc, "and after")) == {"worker": instance_of(worker), "payload": "and after"}
