"""The compiled routing (zrouter/_native/route.pyx) against the reference (Router.request,
Router.worker_reply and the broker's reply lookup): two routers, one driven through each, get
the same random traffic (workers joining, leaving, draining; requests to known and unknown
services, past client bounds, with and without keys; replies good, late, unknown and odd;
time passing) and must send the same frames to the same peers, in the same order, and keep
the same counters. The compiled records (Request, ClientLoad, WorkerState, Service) must have
the reference's fields and start with the same values."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zrouter import _speedups
from zrouter import protocol as p
from zrouter.broker import router as router_module
from zrouter.broker import router_types
from zrouter.broker import state
from zrouter.broker.counters import ServiceStats
from zrouter.broker.policies import POLICIES
from zrouter.broker.router import Router, routes

native = _speedups.load_native("route")

SERVICES = ("a", "b", "nobody")
WORKERS = (b"w0", b"w1", b"w2", b"w3")
CLIENTS = (b"c0", b"c1")


class Recorder:
    """A Sink keeping (kind, peer, decoded header, payload); ``dead`` workers are unreachable."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, Any, Any]] = []
        self.dead: set[bytes] = set()

    def to_worker(self, ident: bytes, header: bytes, payload: Any) -> bool:
        if ident in self.dead:
            return False
        self.sent.append(("worker", ident, msgpack.unpackb(header), payload))
        return True

    def to_client(self, client: bytes, header: bytes, payload: Any) -> None:
        self.sent.append(("client", client, msgpack.unpackb(header), payload))


class Side:
    """One router and the calls the broker's drain loops would make on it."""

    def __init__(self, policy: str, seed: int, compiled: bool) -> None:
        self.sink = Recorder()
        self.router = Router(self.sink, default_policy=policy, rng=random.Random(seed), max_client_requests=16,
                             max_client_bytes=1200, max_queue=5, grace=0.5, slow_start=0.0)
        self.unknown: list[tuple[bytes, int]] = []
        if compiled:
            route = native.Route(self.router, router_module.BOUNDS, router_module.LATENCY_ALPHA, self._on_reply)
            self.request, self.reply = route.request, route.reply
        else:
            self.request, self.reply = self.router.request, self._on_reply

    def _on_reply(self, ident: bytes, rid: int, status: Any, flags: int, message: str | None,
                  error_type: str | None, payload: Any, now: float) -> None:
        """The broker's (broker/inbound.py _on_reply), less its logging."""
        w = self.router.workers.get(ident)
        if w is None:
            self.unknown.append((ident, rid))
            return
        w.last_seen = now
        self.router.worker_reply(w, rid, status, flags, message, error_type, payload, now)

    def snapshot(self) -> tuple[Any, ...]:
        r = self.router
        services = {name: (svc.stats.counts, svc.stats.duration.buckets, round(svc.stats.duration.sum, 9),
                           svc.stats.wait.buckets, len(svc.queue), svc.n_routable)
                    for name, svc in sorted(r.services.items())}
        workers = {ident: (w.outstanding, w.held_bytes, w.served, w.in_policy, w.counted, sorted(w.inflight),
                           sorted(w.expired), round(w.latency_ewma, 12))
                   for ident, w in sorted(r.workers.items())}
        clients = {c: (load.requests, load.bytes) for c, load in sorted(r.clients.items())}
        return (r.stats.as_dict(), services, workers, clients, r.n_inflight, r._next_rid, self.unknown)


REQUEST = st.tuples(st.just("request"), st.integers(0, 1), st.integers(0, 2), st.integers(1, 3000),
                    st.sampled_from([None, b"k1", b"k2"]), st.integers(0, 120))
REPLY = st.tuples(st.just("reply"), st.integers(0, 40), st.sampled_from([0, 0, 0, 1, 5, 255, "odd"]),
                  st.sampled_from([None, "oops"]))
OPS = st.lists(
    st.one_of(  # requests and replies drawn three times as often as each other kind
        st.tuples(st.just("ready"), st.integers(0, 3), st.integers(0, 1), st.integers(0, 4), st.integers(1, 3)),
        REQUEST, REQUEST, REQUEST, REPLY, REPLY, REPLY,
        st.tuples(st.just("stray"), st.integers(0, 3), st.integers(0, 50)),
        st.tuples(st.just("advance"), st.floats(0.0, 1.5)),
        st.tuples(st.just("remove"), st.integers(0, 3)),
        st.tuples(st.just("drain"), st.integers(0, 3)),
        st.tuples(st.just("unreachable"), st.integers(0, 3)),
    ),
    max_size=80,
)


def _step(side: Side, op: tuple[Any, ...], now: float, crid: int) -> None:
    r = side.router
    kind = op[0]
    if kind == "ready":
        _, wi, si, capacity, weight = op
        try:
            r.worker_ready(WORKERS[wi], p.Ready(SERVICES[si], capacity, weight, {"instance": f"i{wi}"}), now)
        except Exception as exc:  # Refused: both sides must refuse alike
            side.sink.sent.append(("refused", WORKERS[wi], str(exc), None))
    elif kind == "request":
        _, ci, si, timeout_ms, key, size = op
        side.request(CLIENTS[ci], crid, SERVICES[si], timeout_ms, 0, p.FLAG_IDEMPOTENT, key, b"x" * size, now)
    elif kind == "reply":
        _, k, status, message = op
        held = [(w.ident, rid) for w in r.workers.values() for rid in w.inflight]
        if held:
            ident, rid = held[k % len(held)]
            side.reply(ident, rid, status, 0, message, None, b"reply", now)
    elif kind == "stray":  # a late, unknown or never-sent rid, or a connection that is no worker
        _, wi, rid = op
        side.reply(WORKERS[wi], rid, 0, 0, None, None, b"late", now)
    elif kind == "advance":
        r.tick(now)
    else:
        w = r.workers.get(WORKERS[op[1]])
        if w is None:
            return
        if kind == "remove":
            r.remove_worker(w, "test", now)
        elif kind == "drain":
            r.worker_drain(w, now)
        else:
            side.sink.dead.add(w.ident)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@settings(max_examples=100, deadline=None)
@given(ops=OPS, seed=st.integers(0, 2**32))
def test_compiled_routing_does_what_the_reference_does(policy: str, ops: list[tuple[Any, ...]], seed: int) -> None:
    ref, twin = Side(policy, seed, compiled=False), Side(policy, seed, compiled=True)
    now = 1000.0
    for crid, op in enumerate(ops, start=1):
        if op[0] == "advance":
            now += op[1]
        for side in (ref, twin):
            _step(side, op, now, crid)
        assert twin.sink.sent == ref.sink.sent, op
        assert twin.snapshot() == ref.snapshot(), op


def _fields(obj: Any) -> dict[str, Any]:
    names = [n for n in dir(obj) if not n.startswith("__") and not callable(getattr(obj, n))]
    return {n: getattr(obj, n) for n in names if n != "instance"}


def test_compiled_records_have_the_reference_fields_and_start_alike() -> None:
    native.set_stats_factory(ServiceStats)  # state.py does this when the compiled path runs
    svc_ref = state.PyService("s", None, None, 1.0)  # type: ignore[arg-type]
    svc_twin = native.Service("s", None, None, 1.0)
    assert set(_fields(svc_twin)) == set(state.PyService.__slots__)
    assert {k: v for k, v in _fields(svc_twin).items() if k != "stats"} == \
        {k: getattr(svc_ref, k) for k in state.PyService.__slots__ if k != "stats"}
    assert type(svc_twin.stats) is type(svc_ref.stats) and svc_twin.stats.name == "s"

    meta = {"instance": "i"}
    w_ref = state.PyWorkerState(b"id", svc_ref, 3, 2, meta, 5.0)  # type: ignore[arg-type]
    w_twin = native.WorkerState(b"id", svc_twin, 3, 2, meta, 5.0)
    assert set(_fields(w_twin)) == set(state.PyWorkerState.__slots__)
    for name in state.PyWorkerState.__slots__:
        if name != "service":
            assert getattr(w_twin, name) == getattr(w_ref, name), name
    assert w_twin.instance == w_ref.instance == "i"
    assert (w_twin.routable(), w_twin.has_credit(), w_twin.eligible(), w_twin.effective_weight()) == \
        (w_ref.routable(), w_ref.has_credit(), w_ref.eligible(), w_ref.effective_weight())

    load_twin = native.ClientLoad()
    assert set(_fields(load_twin)) == set(state.PyClientLoad.__slots__)
    args = (b"c", 7, svc_twin, 12.5, 1, 1, b"k", b"payload", 2.0, 7, load_twin)
    r_ref, r_twin = state.PyRequest(*args), native.Request(*args)  # type: ignore[arg-type]
    assert set(_fields(r_twin)) == set(state.PyRequest.__slots__)
    for name in state.PyRequest.__slots__:
        assert getattr(r_twin, name) == getattr(r_ref, name), name


def test_this_run_routes_through_the_path_it_asked_for() -> None:
    compiled = _speedups.native()
    assert (state.Request is native.Request) is compiled
    assert (state.WorkerState is native.WorkerState) is compiled
    found = routes(Router(Recorder()), lambda *a: None)
    assert (found is not None and type(getattr(found[0], "__self__", None)) is native.Route) is compiled
    assert native.SLOTS_PER_S == router_types.SLOTS_PER_S
    assert native.STATES == (state.QUEUED, state.INFLIGHT, state.DONE)


def _random_op(rng: random.Random) -> tuple[Any, ...]:
    # Joins and losses rare enough that services usually have several workers with credit, so
    # the policies choose between workers (and p2c-ewma between latencies).
    kind = rng.choices(["ready", "request", "reply", "stray", "advance", "remove", "drain", "unreachable"],
                       [2, 12, 10, 1, 1, 0.4, 0.3, 0.3])[0]
    if kind == "ready":
        return (kind, rng.randrange(4), rng.randrange(2), rng.choice([0, 1, 2, 4, 8, 8]), rng.randint(1, 3))
    if kind == "request":
        return (kind, rng.randrange(2), rng.randrange(3), rng.randint(1, 3000), rng.choice([None, b"k1", b"k2"]),
                rng.randrange(121))
    if kind == "reply":
        return (kind, rng.randrange(41), rng.choice([0, 0, 0, 1, 5, 255, "odd"]), rng.choice([None, "oops"]))
    if kind == "stray":
        return (kind, rng.randrange(4), rng.randrange(51))
    if kind == "advance":
        return (kind, rng.choice([0.0, 0.001, 0.01, 0.2, 0.7, 1.5]))
    return (kind, rng.randrange(4))


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_long_random_walks_agree(policy: str) -> None:
    # Hypothesis keeps its examples short; these walks go through thousands of dispatches,
    # replies, requeues, deadlines and joins on both sides.
    for seed in range(3):
        rng = random.Random(seed)
        ref, twin = Side(policy, seed, compiled=False), Side(policy, seed, compiled=True)
        now = 1000.0
        for crid in range(1, 2001):
            op = _random_op(rng)
            now += op[1] if op[0] == "advance" else rng.choice([0.0, 0.0001, 0.0004, 0.002])  # latencies differ
            for side in (ref, twin):
                _step(side, op, now, crid)
            assert twin.sink.sent == ref.sink.sent, (seed, crid, op)
            assert twin.snapshot() == ref.snapshot(), (seed, crid, op)
        assert sum(1 for kind, *_ in ref.sink.sent if kind == "client") > 300  # the walk did route
