"""Section 2: latency, one request at a time.

The same three systems and shape as section 1 (broker + 2 echo workers + 1 client process,
100-byte payloads), but the client sends the next request only when the previous reply is in:
``Client.request`` for zrouter, a DEALER send/recv for ``zmq.proxy``, majortomo's
``Client.send`` + ``recv_all_as_list``. Each run times ``COUNT`` requests after a warm-up; runs
are interleaved across systems and the median run's p50 / p99 are reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.harness import Cluster, Row, Settings, fmt_ratio, median, progress, run_client, save_plot
from bench.peers import start_systems
from bench.throughput import CAPACITY, LABELS

__all__ = ["plot", "rows", "run"]


def run(cfg: Settings) -> dict[str, Any]:
    runs = cfg.pick(5, 3)
    count = cfg.pick(3000, 800)
    per: dict[str, list[dict[str, Any]]] = {}
    with Cluster() as cluster:
        systems = start_systems(cluster, workers=2, capacity=CAPACITY)
        for r in range(runs):
            for name, system in systems.items():
                res = run_client(
                    ["sync", "--system", name, "--endpoint", system.endpoint, "--warmup", "200", "--count", str(count)],
                    timeout=120,
                )
                per.setdefault(name, []).append(res)
                progress(f"latency run {r + 1}/{runs} {LABELS[name]:<10} p50 {res['p50_us']:6.0f} µs  p99 {res['p99_us']:6.0f} µs")
    out: dict[str, Any] = {"count": count, "runs": {n: [{k: v for k, v in r.items() if k != "curve_us"} for r in rs]
                                                     for n, rs in per.items()}}
    for name, results in per.items():
        p50s = [r["p50_us"] for r in results]
        mid = sorted(results, key=lambda r: r["p50_us"])[len(results) // 2]
        out[name] = {
            "p50_us": median(p50s),
            "p99_us": median([r["p99_us"] for r in results]),
            "p999_us": median([r["p999_us"] for r in results]),
            "curve_us": mid["curve_us"],
        }
    return out


def rows(res: dict[str, Any]) -> list[Row]:
    def cell(n: str, key: str) -> str:
        return f"{res[n][key]:.0f}" if n in res else "-"

    r50 = res["zrouter"]["p50_us"] / res["proxy"]["p50_us"]
    r99 = res["zrouter"]["p99_us"] / res["proxy"]["p99_us"]
    n = len(res["runs"]["zrouter"])
    return [
        Row(f"2 one-at-a-time p50 µs (median of {n})", cell("zrouter", "p50_us"), cell("proxy", "p50_us"),
            cell("majortomo", "p50_us"), f"{fmt_ratio(r50)} proxy", "<=1.3x proxy", "ok" if r50 <= 1.3 else "MISS"),
        Row("  one-at-a-time p99 µs", cell("zrouter", "p99_us"), cell("proxy", "p99_us"), cell("majortomo", "p99_us"),
            f"{fmt_ratio(r99)} proxy"),
    ]


def plot(res: dict[str, Any], outdir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    fractions = [q / 200 for q in range(1, 201)]
    for name, color in (("zrouter", "#1f77b4"), ("proxy", "#7f7f7f"), ("majortomo", "#ff7f0e")):
        if name not in res:
            continue
        r = res[name]
        ax.plot(r["curve_us"], fractions, color=color,
                label=f"{LABELS[name]}: p50 {r['p50_us']:.0f} µs, p99 {r['p99_us']:.0f} µs")
    ax.set_xscale("log")
    ax.set_xlabel("latency, µs (log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"One request at a time: latency CDF (median run of {res['count']} requests)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return save_plot(fig, outdir, "latency")
