"""Section 6: scale. What the broker costs with many workers and a deep queue.

- Idle: a broker with 10, 100 and 1,000 connected workers (``bench.fakeworkers``: one process,
  one DEALER per fake worker, READY + heartbeats every 1 s, the broker's default) and no
  requests: broker CPU as a percentage of one core over ``IDLE_S`` seconds, and its RSS.
- Under load, with the same workers answering at once: broker CPU µs per request of a
  pipelined zrouter client (100 in flight), as section 1 but over N workers.
- Queue: 100,000 requests waiting for a service nobody serves (``--grace 600 --max-queue
  200000 --max-client-requests 200000``, 600 s timeouts): broker RSS before and after, bytes and CPU µs per queued request.
- Pick cost: every policy at 10 / 1,000 / 10,000 workers, in process, from
  ``bench/policy_pick.py`` (µs per pick + changed cycle, and per remove + add).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.harness import (
    BenchError,
    Cluster,
    Row,
    Settings,
    ZrouterSystem,
    cpu_seconds,
    free_tcp_endpoint,
    progress,
    rss_bytes,
    save_plot,
    thread_cpu,
)
from bench.throughput import INFLIGHT, measure_pipe

__all__ = ["COUNTS", "plot", "rows", "run"]

COUNTS = (10, 100, 1000)
QUEUED = 100_000
CAPACITY = 4  # credits per fake worker: even 10 workers hold the 100 requests in flight


def _broker(cluster: Cluster, *extra: str) -> ZrouterSystem:
    front, back = free_tcp_endpoint(), free_tcp_endpoint()
    broker = cluster.spawn("zrouter broker", ["-m", "zrouter.broker", "--frontend", front, "--backend", back,
                                              "--stats-interval", "3600", *extra])
    broker.wait_for("broker listening")
    return ZrouterSystem(front, back, broker)


def _fakes(cluster: Cluster, system: ZrouterSystem, service: str, count: int) -> None:
    fake = cluster.spawn(f"{count} fake workers", ["-m", "bench.fakeworkers", "--broker", system.backend,
                                                   "--service", service, "--count", str(count),
                                                   "--capacity", str(CAPACITY)])
    system.workers.append(fake)
    system.broker.wait_for(r"worker \S+ joined", count, timeout=120)


def idle_and_load(n: int, idle_s: float, load_s: float) -> dict[str, Any]:
    with Cluster() as cluster:
        system = _broker(cluster)
        _fakes(cluster, system, "echo", n)
        pid = system.broker.pid
        fake_pid = system.workers[0].pid
        c0, f0, th0, t0 = cpu_seconds(pid), cpu_seconds(fake_pid), thread_cpu(pid), time.monotonic()
        # The measurement window itself: the broker is left alone with its N idle workers.
        time.sleep(idle_s)
        c1, f1, th1, t1 = cpu_seconds(pid), cpu_seconds(fake_pid), thread_cpu(pid), time.monotonic()
        rss = rss_bytes(pid)
        load = measure_pipe("zrouter", system, 100, INFLIGHT, 0.3, load_s)
        left = [line for line in system.broker.err if " left service " in line]
        if left:
            raise BenchError(f"workers dropped during the scale run: {left[:3]}")
    return {
        "idle_cpu_pct": (c1 - c0) / (t1 - t0) * 100.0,
        # Python's thread ("python") vs libzmq's I/O thread ("ZMQbg/IO/0"), % of a core each.
        "idle_threads_pct": {k: (th1[k] - th0.get(k, 0.0)) / (t1 - t0) * 100.0 for k in th1},
        "fake_cpu_pct": (f1 - f0) / (t1 - t0) * 100.0,
        "rss_mb": rss / 2**20,
        "rate": load["rate"],
        "broker_cpu_us": load["broker_cpu_us"],
    }


def queued(count: int) -> dict[str, Any]:
    with Cluster() as cluster:
        system = _broker(cluster, "--grace", "600", "--max-queue", str(2 * count),
                         "--max-client-requests", str(2 * count))  # one client queues them all
        _fakes(cluster, system, "probe", 1)
        pid = system.broker.pid
        rss0, cpu0 = rss_bytes(pid), cpu_seconds(pid)
        client = cluster.spawn("filling client", ["-m", "bench.loadgen", "fill", "--endpoint", system.endpoint,
                                                  "--service", "nobody", "--count", str(count), "--timeout", "600",
                                                  "--size", "100"], stdin=True)
        client.wait_for('"queued"', timeout=300, stdout=True)
        rss1, cpu1 = rss_bytes(pid), cpu_seconds(pid)
        import json

        info = json.loads(client.out[-1])
        client.send_line("done")
        if info["failed_early"]:
            raise BenchError(f"{info['failed_early']} of {count} requests were refused while queueing")
    return {
        "queued": count,
        "rss_before_mb": rss0 / 2**20,
        "rss_after_mb": rss1 / 2**20,
        "bytes_per_request": (rss1 - rss0) / count,
        "cpu_us_per_request": (cpu1 - cpu0) / count * 1e6,
        "fill_seconds": info["seconds"],
    }


def pick_costs() -> dict[str, Any]:
    from bench import policy_pick
    from zrouter.broker.policies import POLICIES

    out: dict[str, Any] = {"sizes": list(policy_pick.SIZES), "pick_us": {}, "churn_us": {}}
    for name in sorted(POLICIES):
        out["pick_us"][name] = [policy_pick.pick_cycle_us(name, n, policy_pick.three_classes) for n in policy_pick.SIZES]
        out["churn_us"][name] = [policy_pick.churn_us(name, n, policy_pick.three_classes) for n in policy_pick.SIZES]
        progress(f"pick cost {name:<27} " + " ".join(f"{v:7.2f}" for v in out["pick_us"][name]) + " µs")
    return out


def run(cfg: Settings) -> dict[str, Any]:
    idle_s, load_s = cfg.pick((10.0, 2.0), (3.0, 0.8))
    out: dict[str, Any] = {"idle_seconds": idle_s, "workers": {}}
    for n in COUNTS:
        r = out["workers"][str(n)] = idle_and_load(n, idle_s, load_s)
        progress(f"scale {n:>5} workers: idle broker {r['idle_cpu_pct']:.2f}% of a core, RSS {r['rss_mb']:.1f} MB; "
                 f"under load {r['rate']:,.0f} req/s, {r['broker_cpu_us']:.1f} µs/req")
    q = out["queue"] = queued(QUEUED)
    progress(f"scale {QUEUED:,} queued: RSS {q['rss_before_mb']:.1f} -> {q['rss_after_mb']:.1f} MB "
             f"({q['bytes_per_request']:.0f} B/request), {q['cpu_us_per_request']:.1f} µs/request")
    out["pick"] = pick_costs()
    return out


def rows(res: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    w = res["workers"]
    for n in COUNTS:
        r = w[str(n)]
        target = verdict = ""
        if n == 1000:
            target, verdict = "idle < 5% of a core", "ok" if r["idle_cpu_pct"] < 5 else "MISS"
        th = r["idle_threads_pct"]
        split = f"Python thread {th.get('python', 0.0):.2f}%, libzmq I/O {th.get('ZMQbg/IO/0', 0.0):.2f}%"
        out.append(Row(f"6 scale {n:,} idle workers: broker CPU % of a core / RSS MB",
                       f"{r['idle_cpu_pct']:.2f}% / {r['rss_mb']:.0f}", "", "", split, target, verdict))
        out.append(Row(f"  {n:,} workers, 100 in flight: broker CPU µs/req (req/s)",
                       f"{r['broker_cpu_us']:.1f} ({r['rate']:,.0f})"))
    q = res["queue"]
    out.append(Row(f"  {q['queued']:,} queued requests: broker RSS MB before -> after",
                   f"{q['rss_before_mb']:.0f} -> {q['rss_after_mb']:.0f}", "", "",
                   f"{q['bytes_per_request']:.0f} B and {q['cpu_us_per_request']:.1f} µs per request"))
    pick = res["pick"]
    sizes = "/".join(f"{n:,}" for n in pick["sizes"])
    for name, vals in pick["pick_us"].items():
        out.append(Row(f"  pick cost µs at {sizes} workers: {name}", " / ".join(f"{v:.2f}" for v in vals)))
    return out


def plot(res: dict[str, Any], outdir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 4.2))
    w = res["workers"]
    ns = list(COUNTS)
    a1.plot(ns, [w[str(n)]["idle_cpu_pct"] for n in ns], "o-", label="broker, idle")
    a1.axhline(5.0, color="r", linestyle="--", linewidth=1, label="target: 5% of a core at 1,000")
    a1.set_xscale("log")
    a1.set_xlabel("connected workers")
    a1.set_ylabel("CPU, % of one core")
    a1.set_title(f"Idle broker (heartbeats), {res['idle_seconds']:g} s windows")
    a1.legend()
    a2.plot(ns, [w[str(n)]["broker_cpu_us"] for n in ns], "o-", color="#d62728")
    a2.set_xscale("log")
    a2.set_ylim(bottom=0)
    a2.set_xlabel("connected workers")
    a2.set_ylabel("broker CPU µs per request")
    a2.set_title("Broker CPU per request, 100 in flight")
    pick = res["pick"]
    for name, vals in pick["pick_us"].items():
        a3.plot(pick["sizes"], vals, "o-", label=name)
    a3.set_xscale("log")
    a3.set_yscale("log")
    a3.set_xlabel("eligible workers")
    a3.set_ylabel("µs per pick + changed cycle")
    a3.set_title("Policy pick cost (in process)")
    a3.legend(fontsize=7)
    for ax in (a1, a2, a3):
        ax.grid(True, which="both", alpha=0.3)
    return save_plot(fig, outdir, "scale")
