"""A deterministic discrete-event simulation of the dispatch policies, at scales this machine
cannot run: ``python -m bench.simulate`` (or the ``simulate`` section of ``python -m bench``).

The policies are the broker's own classes (``zrouter.broker.policies.make_policy``), driven through the
same call protocol as ``zrouter.broker.router.Router``: ``pick``, then ``outstanding += 1`` and
``changed`` (or ``remove`` when the worker's credits run out); on a reply ``outstanding -= 1``,
the latency reported with ``done``, and ``changed`` or ``add``; a killed worker is ``remove``d
and ``forget``-ed. Requests that find no worker with a free credit wait in a FIFO queue at the broker.
Time is simulated (p2c-ewma's clock included), so a run is exact and repeatable for a seed.

Each worker is a single server: it holds up to ``capacity`` requests (its credits) and serves
them one at a time, FIFO. A killed worker's requests go back to the front of the broker's queue,
in order, as the broker requeues them when a worker's connection closes.

Scenarios (``SCENARIOS``):
- ``1000-hetero``: 1,000 workers, 60% at full speed (exponential service times, mean 100 ms),
  30% half as fast, 10% ten times slower; weights proportional to speed; Poisson arrivals at
  75% of the total capacity.
- ``1000-kill``: the same, and 10% of the workers (chosen at random) are killed half-way.
- ``3-slow``: section 4 in simulation: workers of 2, 2 and 20 ms (constant), 16 credits,
  weights 10/10/1, Poisson at 70%; to compare with what the real processes measured.
"""

from __future__ import annotations

import heapq
import math
import random
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zrouter.broker.policies import make_policy

__all__ = ["SCENARIOS", "Scenario", "plot", "rows", "run", "simulate"]

POLICIES = ("round-robin", "random", "least-outstanding", "weighted-least-outstanding", "p2c-ewma",
            "weighted", "consistent-hash")


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    speeds: tuple[tuple[float, float], ...]  # (fraction of workers, relative speed)
    workers: int
    base_s: float  # mean service time at speed 1
    capacity: int
    load: float  # arrivals as a fraction of total capacity
    requests: int
    exponential: bool = True
    kill_fraction: float = 0.0  # workers killed half-way through the arrivals


SCENARIOS = (
    Scenario("1000-hetero", "1,000 workers: 60% x1, 30% x0.5, 10% x0.1 speed; 8 credits; 75% load",
             ((0.6, 1.0), (0.3, 0.5), (0.1, 0.1)), 1000, 0.100, 8, 0.75, 400_000),
    Scenario("1000-kill", "same, 10% of workers killed half-way (their requests requeued)",
             ((0.6, 1.0), (0.3, 0.5), (0.1, 0.1)), 1000, 0.100, 8, 0.75, 400_000, kill_fraction=0.10),
    Scenario("3-slow", "section 4 simulated: 2, 2, 20 ms workers, 16 credits, 70% load",
             ((2 / 3, 1.0), (1 / 3, 0.1)), 3, 0.002, 16, 0.70, 60_000, exponential=False),
)


@dataclass(eq=False)  # identity hashing, like the broker's WorkerState
class SimWorker:
    """A simulated worker; also the policies' ``Endpoint``."""

    key: bytes
    weight: float
    speed: float
    capacity: int
    outstanding: int = 0
    alive: bool = True
    in_policy: bool = False
    busy: bool = False
    epoch: int = 0  # bumped at death so its scheduled completions are ignored
    held: deque[list[Any]] = field(default_factory=deque)  # requests at the worker, head in service


def _speed_of(sc: Scenario, i: int) -> float:
    """Speed of worker ``i``: the classes of ``sc.speeds`` in order, by their fractions."""
    edge = 0.0
    for fraction, speed in sc.speeds:
        edge += fraction * sc.workers
        if i < round(edge):
            return speed
    return sc.speeds[-1][1]


def _pct(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return math.nan
    return sorted_ms[max(0, min(len(sorted_ms) - 1, math.ceil(q / 100 * len(sorted_ms)) - 1))]


def simulate(sc: Scenario, policy_name: str, seed: int = 1, requests: int | None = None) -> dict[str, Any]:
    """Run one scenario under one policy: latency percentiles (ms) after a 5% warm-up."""
    n_req = requests or sc.requests
    rng = random.Random(seed)  # arrivals, service times, kills: identical for every policy
    workers = [SimWorker(b"worker-%d" % i, s, s, sc.capacity) for i in range(sc.workers) for s in [_speed_of(sc, i)]]
    rng.shuffle(workers)
    rate = sc.load * sum(w.speed for w in workers) / sc.base_s
    arrivals: list[float] = []
    t = 0.0
    for _ in range(n_req):
        t += rng.expovariate(rate)
        arrivals.append(t)
    draws = [-math.log(1.0 - rng.random()) if sc.exponential else 1.0 for _ in range(n_req)]
    doomed = rng.sample(workers, int(sc.kill_fraction * sc.workers)) if sc.kill_fraction else []
    kill_at = arrivals[n_req // 2]
    warm_until = arrivals[n_req // 20]

    clock = [0.0]
    policy = make_policy(policy_name, random.Random(seed + 1))
    if hasattr(policy, "clock"):
        policy.clock = lambda: clock[0]  # p2c-ewma's force-pick timer runs on simulated time
    for w in workers:
        policy.add(w)
        w.in_policy = True
    hashed = policy_name == "consistent-hash"

    ARRIVE, DONE, KILL = 0, 1, 2
    events: list[tuple[float, int, int, Any]] = [(a, i, ARRIVE, i) for i, a in enumerate(arrivals)]
    seq = n_req
    for w in doomed:
        events.append((kill_at, seq, KILL, w))
        seq += 1
    heapq.heapify(events)
    queue: deque[list[Any]] = deque()  # requests waiting at the broker: [arrival, index, key, sent_at]
    lat: list[float] = []
    requeued = 0
    push = heapq.heappush
    pop = heapq.heappop
    base = sc.base_s

    def start(w: SimWorker, now: float) -> None:
        nonlocal seq
        req = w.held[0]
        push(events, (now + base / w.speed * draws[req[1]], seq, DONE, (w, w.epoch)))
        seq += 1
        w.busy = True

    def dispatch(req: list[Any], w: SimWorker, now: float) -> None:
        req[3] = now
        w.outstanding += 1
        if w.outstanding >= w.capacity:
            policy.remove(w)
            w.in_policy = False
        else:
            policy.changed(w)
        w.held.append(req)
        if not w.busy:
            start(w, now)

    def pump(now: float) -> None:
        while queue and len(policy):
            ep = policy.pick(queue[0][2])
            if ep is None:
                return
            dispatch(queue.popleft(), ep, now)  # type: ignore[arg-type]

    while events:
        now, _, kind, data = pop(events)
        clock[0] = now
        if kind == ARRIVE:
            req = [now, data, b"key-%d" % (data % 5000) if hashed else None, 0.0]
            if not queue:
                ep = policy.pick(req[2])
                if ep is not None:
                    dispatch(req, ep, now)  # type: ignore[arg-type]
                    continue
            queue.append(req)
        elif kind == DONE:
            w, epoch = data
            if epoch != w.epoch:
                continue  # completion scheduled before the worker died
            req = w.held.popleft()
            w.busy = False
            if req[0] >= warm_until:
                lat.append((now - req[0]) * 1000.0)
            w.outstanding -= 1
            policy.done(w, now - req[3], now)
            if w.in_policy:
                policy.changed(w)
            elif w.alive and w.outstanding < w.capacity:
                policy.add(w)
                w.in_policy = True
            if w.held:
                start(w, now)
            if queue:
                pump(now)
        else:  # KILL: what it held goes back to the front of the queue, in order
            w = data
            w.alive = False
            w.epoch += 1
            if w.in_policy:
                policy.remove(w)
                w.in_policy = False
            policy.forget(w)
            requeued += len(w.held)
            queue.extendleft(reversed(w.held))
            w.held.clear()
            w.outstanding = 0
            w.busy = False
            pump(now)
    lat.sort()
    return {"p50": _pct(lat, 50), "p99": _pct(lat, 99), "p999": _pct(lat, 99.9), "n": len(lat),
            "requeued": requeued, "sim_seconds": arrivals[-1]}


def _one(job: tuple[Scenario, str, int | None]) -> tuple[str, str, dict[str, Any]]:
    sc, policy, requests = job
    t0 = time.perf_counter()
    res = simulate(sc, policy, requests=requests)
    res["wall_seconds"] = time.perf_counter() - t0
    return sc.name, policy, res


def run(cfg: Any) -> dict[str, Any]:
    from bench.harness import progress

    quick = bool(getattr(cfg, "quick", False))
    jobs = [(sc, p, sc.requests // 4 if quick else None) for sc in SCENARIOS for p in POLICIES]
    out: dict[str, Any] = {"scenarios": {sc.name: {"title": sc.title, "policies": {}} for sc in SCENARIOS}}
    with ProcessPoolExecutor(max_workers=2) as pool:  # both cores; each run is deterministic
        for name, policy, res in pool.map(_one, jobs):
            out["scenarios"][name]["policies"][policy] = res
            progress(f"simulate {name:<12} {policy:<27} p50 {res['p50']:8.1f}  p99 {res['p99']:8.1f}  "
                     f"p99.9 {res['p999']:8.1f} ms  ({res['wall_seconds']:.1f}s)")
    return out


def rows(res: dict[str, Any]) -> list[Any]:
    from bench.harness import Row

    out = []
    for name, sc in res["scenarios"].items():
        out.append(Row(f"7 simulated {name}: p50 / p99 / p99.9 ms"))
        rr = sc["policies"]["round-robin"]["p99"]
        for policy, r in sc["policies"].items():
            extra = f"; {r['requeued']} requeued" if r["requeued"] else ""
            out.append(Row(f"  {policy}", f"{r['p50']:.1f} / {r['p99']:.1f} / {r['p999']:.1f}", "", "",
                           f"p99 {r['p99'] / rr:.2f}x RR{extra}"))
    return out


def plot(res: dict[str, Any], outdir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    from bench.harness import save_plot

    scs = res["scenarios"]
    fig, axes = plt.subplots(1, len(scs), figsize=(6 * len(scs), 4.8))
    for ax, (_name, sc) in zip(axes, scs.items(), strict=True):
        pols = list(sc["policies"])
        xs = range(len(pols))
        for off, key, label, color in ((-0.27, "p50", "p50", "#aec7e8"), (0.0, "p99", "p99", "#1f77b4"),
                                       (0.27, "p999", "p99.9", "#08306b")):
            ax.bar([x + off for x in xs], [sc["policies"][p][key] for p in pols], 0.27, label=label, color=color)
        ax.set_xticks(list(xs), pols, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("latency, ms (log)")
        ax.set_title(sc["title"], fontsize=9)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Simulated policies (zrouter.broker.policies classes, simulated time)")
    return save_plot(fig, outdir, "simulate")


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a quarter of the requests")
    p.add_argument("--scenario", choices=[sc.name for sc in SCENARIOS], help="one scenario only")
    p.add_argument("--policy", choices=POLICIES, help="one policy only")
    args = p.parse_args(argv)
    for sc in SCENARIOS:
        if args.scenario and sc.name != args.scenario:
            continue
        print(f"{sc.name}: {sc.title}")
        for policy in POLICIES:
            if args.policy and policy != args.policy:
                continue
            _, _, r = _one((sc, policy, sc.requests // 4 if args.quick else None))
            print(f"  {policy:<27} p50 {r['p50']:8.1f}  p99 {r['p99']:8.1f}  p99.9 {r['p999']:8.1f} ms  "
                  f"requeued {r['requeued']}  ({r['wall_seconds']:.1f}s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
