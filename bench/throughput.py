"""Section 1: pipelined throughput.

One client process keeps 100 requests in flight (~100-byte payloads, loopback TCP) against a
broker and 2 echo workers, for each system: zrouter (``Client.submit``; workers
``python -m zrouter.worker --capacity 50 zrouter.worker.examples:echo``: 50 credits each, so the 100 in-flight
requests all sit at workers and none wait in the broker's queue), ``zmq.proxy`` with REP workers
and a raw DEALER client, majortomo with its own Broker/Worker/Client (one request per worker at a
time: MDP has no credits). Runs are interleaved (A B C A B C ...) and the median is reported,
with the CPU each process spent per request (broker, workers, client) to show where time goes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.harness import (
    Cluster,
    Row,
    Settings,
    cpu_seconds,
    cpu_split,
    fmt_int,
    fmt_ratio,
    median,
    progress,
    run_client,
    save_plot,
)
from bench.peers import System, start_systems

__all__ = ["CAPACITY", "measure_pipe", "plot", "rows", "run"]

CAPACITY = 50  # zrouter credits per echo worker: 2 x 50 >= the 100 requests in flight
INFLIGHT = 100
LABELS = {"zrouter": "zrouter", "proxy": "zmq.proxy", "majortomo": "majortomo"}


def measure_pipe(
    name: str, system: System, size: int, inflight: int, warmup: float, duration: float, client: str | None = None
) -> dict[str, Any]:
    """One pipelined client run, with the CPU per request of every process of ``system``.

    ``client`` is the loadgen driver (``--system``), ``name`` by default."""
    procs = [system.broker, *system.workers]
    broker0 = cpu_split(system.broker.pid)
    before = [cpu_seconds(p.pid) for p in procs]
    res = run_client(
        ["pipe", "--system", client or name, "--endpoint", system.endpoint, "--size", str(size),
         "--inflight", str(inflight), "--warmup", str(warmup), "--duration", str(duration)],
        timeout=warmup + duration + 120,
    )  # fmt: skip
    after = [cpu_seconds(p.pid) for p in procs]
    broker1 = cpu_split(system.broker.pid)
    n = res["total"]
    res["broker_user_us"] = (broker1[0] - broker0[0]) / n * 1e6
    res["broker_sys_us"] = (broker1[1] - broker0[1]) / n * 1e6
    res["broker_cpu_us"] = (after[0] - before[0]) / n * 1e6
    res["workers_cpu_us"] = sum(a - b for a, b in zip(after[1:], before[1:], strict=True)) / n * 1e6
    res["client_cpu_us"] = res.pop("client_cpu_s") / n * 1e6
    return res


def run(cfg: Settings) -> dict[str, Any]:
    runs = cfg.pick(5, 3)
    warmup, duration = cfg.pick((0.5, 3.0), (0.3, 1.0))
    per: dict[str, list[dict[str, Any]]] = {}
    with Cluster() as cluster:
        systems = start_systems(cluster, workers=2, capacity=CAPACITY)
        for r in range(runs):
            for name, system in systems.items():
                res = measure_pipe(name, system, 100, INFLIGHT, warmup, duration)
                per.setdefault(name, []).append(res)
                progress(f"throughput run {r + 1}/{runs} {LABELS[name]:<10} {res['rate']:>9,.0f} req/s  "
                         f"broker {res['broker_cpu_us']:.1f} µs/req")
    out: dict[str, Any] = {"runs": per, "capacity": CAPACITY, "inflight": INFLIGHT, "duration": duration}
    for name, results in per.items():
        out[name] = {
            "rate": median([r["rate"] for r in results]),
            "min": min(r["rate"] for r in results),
            "max": max(r["rate"] for r in results),
            **{k: median([r[k] for r in results]) for k in ("broker_cpu_us", "workers_cpu_us", "client_cpu_us")},
        }
    return out


def rows(res: dict[str, Any]) -> list[Row]:
    z = res["zrouter"]["rate"]
    p = res["proxy"]["rate"]
    m = res.get("majortomo", {}).get("rate", float("nan"))
    vs_p, vs_m = z / p, z / m
    n = len(res["runs"]["zrouter"])
    out = [Row(
        f"1 pipelined req/s, 100 in flight (median of {n})",
        fmt_int(z), fmt_int(p), fmt_int(m),
        f"{fmt_ratio(vs_p)} proxy, {fmt_ratio(vs_m)} mt",
        ">=0.50x proxy (0.70x); >=5x mt",
        ("ok" if vs_p >= 0.5 else "MISS") + " / " + ("n/a" if m != m else "ok" if vs_m >= 5 else "MISS"),
    )]  # fmt: skip
    for key, label in (("broker_cpu_us", "broker"), ("workers_cpu_us", "workers (sum)"), ("client_cpu_us", "client")):
        cells = [f"{res[s][key]:.1f}" if s in res else "-" for s in ("zrouter", "proxy", "majortomo")]
        out.append(Row(f"  CPU µs per request: {label}", cells[0], cells[1], cells[2]))
    return out


def plot(res: dict[str, Any], outdir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    names = [n for n in ("zrouter", "proxy", "majortomo") if n in res]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    rates = [res[n]["rate"] for n in names]
    err = [[res[n]["rate"] - res[n]["min"] for n in names], [res[n]["max"] - res[n]["rate"] for n in names]]
    bars = ax.bar([LABELS[n] for n in names], rates, yerr=err, capsize=6, color=["#1f77b4", "#7f7f7f", "#ff7f0e"][: len(names)])
    for bar, n in zip(bars, names, strict=True):
        ratio = res[n]["rate"] / res["proxy"]["rate"]
        ax.annotate(f"{res[n]['rate']:,.0f}\n({ratio:.2f}x proxy)", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    ax.set_ylabel("requests / s (median; bars: min-max)")
    ax.set_title(f"Pipelined throughput: 1 client, {res['inflight']} in flight, 2 echo workers, 100 B")
    ax.margins(y=0.2)
    bottom = [0.0] * len(names)
    for key, label, color in (("broker_cpu_us", "broker", "#d62728"), ("workers_cpu_us", "workers", "#2ca02c"),
                              ("client_cpu_us", "client", "#9467bd")):
        vals = [res[n][key] for n in names]
        ax2.bar([LABELS[n] for n in names], vals, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax2.set_ylabel("CPU µs per request (median)")
    ax2.set_title("Where the CPU goes (2 cores in all)")
    ax2.legend()
    return save_plot(fig, outdir, "throughput")
