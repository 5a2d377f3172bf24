"""Section 3: payload sizes, 100 B / 10 KB / 1 MB.

Pipelined runs as in section 1 (100 in flight, 2 echo workers) at each size, interleaved across
systems. Besides req/s and MB/s (payload bytes echoed per second, one direction), the broker's
CPU per request (user + system) shows whether large messages are copied.

Kernel TCP copies (system time) and libzmq's work are the same for every ZeroMQ broker, and a
Python broker pays some size-dependent cost for handling big frames even without copying them,
so the copy test is calibrated in the same run against two reference brokers: ``zmq.proxy``
written in Python (``bench.peers python_forwarder``, same REP workers and raw DEALER client),
once passing frames on by reference (``copy=False``) and once copying every frame (one copy
each way). zrouter's broker avoids needless copies if its user CPU grows from 100 B to 1 MB by
less than the zero-copy forwarder's growth plus half of what the copying one adds (i.e. less
than one extra copy per request; a copy on the request path and one on the reply path would be
two).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.harness import Cluster, Row, Settings, fmt_ratio, median, progress, save_plot
from bench.peers import start_python_forwarder, start_systems
from bench.throughput import CAPACITY, INFLIGHT, LABELS, measure_pipe

__all__ = ["SIZES", "plot", "rows", "run"]

SIZES = (100, 10 * 1024, 1024 * 1024)
NAMES = {100: "100 B", 10 * 1024: "10 KB", 1024 * 1024: "1 MB"}
# The Python forwarders speak what zmq.proxy speaks: the same loadgen driver.
REFERENCES = {"pyfwd": "proxy", "pyfwd-copy": "proxy"}
LABELS = {**LABELS, "pyfwd": "py forwarder", "pyfwd-copy": "py fwd+copy"}


def run(cfg: Settings) -> dict[str, Any]:
    runs = cfg.pick(3, 1)
    warmup, duration = cfg.pick((0.3, 2.0), (0.2, 0.8))
    out: dict[str, Any] = {"sizes": list(SIZES), "inflight": INFLIGHT}
    with Cluster() as cluster:
        systems = start_systems(cluster, workers=2, capacity=CAPACITY)
        systems["pyfwd"] = start_python_forwarder(cluster, copy=False)
        systems["pyfwd-copy"] = start_python_forwarder(cluster, copy=True)
        for size in SIZES:
            per: dict[str, list[dict[str, Any]]] = {}
            for r in range(runs):
                for name, system in systems.items():
                    res = measure_pipe(name, system, size, INFLIGHT, warmup, duration, REFERENCES.get(name))
                    per.setdefault(name, []).append(res)
                    progress(f"payload {NAMES[size]:>6} run {r + 1}/{runs} {LABELS[name]:<12} {res['rate']:>9,.0f} req/s  "
                             f"broker {res['broker_cpu_us']:.1f} µs/req")
            out[str(size)] = {
                name: {
                    "rate": median([r["rate"] for r in rs]),
                    "mb_s": median([r["rate"] for r in rs]) * size / 1e6,
                    "broker_cpu_us": median([r["broker_cpu_us"] for r in rs]),
                    "broker_user_us": median([r["broker_user_us"] for r in rs]),
                    "broker_sys_us": median([r["broker_sys_us"] for r in rs]),
                    "workers_cpu_us": median([r["workers_cpu_us"] for r in rs]),
                    "client_cpu_us": median([r["client_cpu_us"] for r in rs]),
                }
                for name, rs in per.items()
            }
    return out


def rows(res: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    names = ("zrouter", "proxy", "majortomo")
    for size in SIZES:
        r = res[str(size)]
        ratio = r["zrouter"]["rate"] / r["proxy"]["rate"]
        rate = [f"{r[n]['rate']:,.0f} ({r[n]['mb_s']:,.0f})" if n in r else "-" for n in names]
        out.append(Row(f"3 payload {NAMES[size]}: req/s (MB/s)", rate[0], rate[1], rate[2], f"{fmt_ratio(ratio)} proxy"))
        cpu = [f"{r[n]['broker_user_us']:,.0f} + {r[n]['broker_sys_us']:,.0f}" if n in r else "-" for n in names]
        out.append(Row(f"  {NAMES[size]}: broker CPU µs/req, user + sys", cpu[0], cpu[1], cpu[2]))
    small, big = res[str(SIZES[0])], res[str(SIZES[-1])]

    def growth(name: str) -> float:
        return float(big[name]["broker_user_us"] - small[name]["broker_user_us"])

    g_z, g_p, g_ref, g_copy = growth("zrouter"), growth("proxy"), growth("pyfwd"), growth("pyfwd-copy")
    one_copy = (g_copy - g_ref) / 2  # per request: the copying forwarder copies on both paths
    extra = g_z - g_ref
    out.append(Row(
        "  broker user-CPU growth 100 B -> 1 MB, µs/req", f"{g_z:,.0f}", f"{g_p:,.0f}", "",
        f"py forwarder {g_ref:,.0f}, +copies {g_copy:,.0f}: zrouter {extra:+,.0f} = {extra / one_copy:.2f} copies",
        "< 1 copy per request", "ok" if extra < one_copy else "MISS",
    ))  # fmt: skip
    return out


def plot(res: dict[str, Any], outdir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [n for n in ("zrouter", "proxy", "majortomo", "pyfwd", "pyfwd-copy") if n in res[str(SIZES[0])]]
    colors = {"zrouter": "#1f77b4", "proxy": "#7f7f7f", "majortomo": "#ff7f0e", "pyfwd": "#bcbd22", "pyfwd-copy": "#8c564b"}
    width = 0.8 / len(names)
    for ax, key, label in ((axes[0], "mb_s", "payload MB/s (one direction, median)"),
                           (axes[1], "broker_user_us", "broker user CPU µs per request (median)")):
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(SIZES))]
            ax.bar(xs, [res[str(s)][name][key] for s in SIZES], width, label=LABELS[name], color=colors[name])
        ax.set_xticks(range(len(SIZES)), [NAMES[s] for s in SIZES])
        ax.set_yscale("log" if key == "mb_s" else "linear")
        ax.set_ylabel(label)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend()
    axes[0].set_title(f"Payload size: throughput ({res['inflight']} in flight)")
    axes[1].set_title("Broker user CPU per request (copies show here)")
    return save_plot(fig, outdir, "payload")
