"""Section "metrics": what observing costs, metrics on vs off in the same run.

Two zrouter systems side by side, each a broker and 2 echo workers (``--inline``, 50 credits),
measured with the throughput section's pipelined client (100 in flight, 100-byte payloads), runs
interleaved in pairs whose order alternates (off on, on off, off on, ...: an ABBA design, so
neither side always runs second); the figure is the median of the pairs' ratios on/off, which
cancels load that drifts during the run:

- **off**: the broker and workers as in the throughput section (no ``--http``). The router's
  plain counters are always kept: they are part of the routing core, like its other stats.
- **on**: ``zrouter-broker --http`` and ``zrouter-worker --http``, a scraper fetching the
  broker's and both workers' ``/metrics`` every second (Prometheus scrapes every 15 s by
  default: this is 15x that), and a dashboard's event stream (``/events``) read throughout.

The target: metrics on cost at most 5% of pipelined throughput (on/off >= 0.95).

Runs swing by +-25% on a shared 2-core machine, more than the effect measured. CPU time per
request (broker + workers, from /proc) moves much less with other load, and on 2 saturated cores
it is what bounds throughput, so it is reported beside the throughput ratio. The section also
times, in this process, exactly what the router's hot path does for the metrics per
request (count the status, observe the duration, count a zero queue wait), and reports it as a
share of the broker's measured CPU per request: a figure that load on the machine barely moves.
"""

from __future__ import annotations

import re
import threading
import timeit
import urllib.request
from bisect import bisect_left
from pathlib import Path
from typing import Any

from bench.harness import Cluster, Proc, Row, Settings, fmt_int, median, progress, save_plot, start_zrouter
from bench.peers import ZROUTER_WORKER_ARGS
from bench.throughput import CAPACITY, INFLIGHT, measure_pipe
from zrouter.broker.counters import BOUNDS, ServiceStats

__all__ = ["plot", "rows", "run"]

SCRAPE_PERIOD = 1.0


def _url(proc: Proc, pattern: str) -> str:
    proc.wait_for(pattern)
    rx = re.compile(pattern)
    for line in list(proc.err):
        m = rx.search(line)
        if m:
            return m.group(1)
    raise RuntimeError(f"{proc.name}: {pattern!r} not in its log")


class Observer:
    """A Prometheus-like scraper and an open dashboard, on threads, until ``stop()``."""

    def __init__(self, broker_url: str, worker_urls: list[str]) -> None:
        self.targets = [broker_url, *worker_urls]
        self.broker_url = broker_url
        self.stopping = threading.Event()
        self.scrapes = 0
        self.events = 0
        self.errors = 0
        self.threads = [threading.Thread(target=self._scrape, daemon=True),
                        threading.Thread(target=self._stream, daemon=True)]  # fmt: skip
        for t in self.threads:
            t.start()

    def _scrape(self) -> None:
        while not self.stopping.wait(SCRAPE_PERIOD):
            for url in self.targets:
                try:
                    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
                        resp.read()
                    self.scrapes += 1
                except OSError:
                    self.errors += 1

    def _stream(self) -> None:
        try:
            with urllib.request.urlopen(self.broker_url + "/events", timeout=30) as resp:
                while not self.stopping.is_set():
                    line = resp.readline()
                    if not line:
                        return
                    if line.startswith(b"data: "):
                        self.events += 1
        except OSError:
            self.errors += 1

    def stop(self) -> None:
        self.stopping.set()
        self.threads[0].join(10)  # the stream thread ends at its next event (within a second)


def hot_path_us() -> float:
    """µs per request of the router's metric statements (router.py: request, worker_reply)."""
    st = ServiceStats("echo")
    bounds = BOUNDS
    now, accepted_at, status = 1.0003, 1.0, 0

    def per_request() -> None:
        st.wait.buckets[0] += 1
        if status == 0:
            st.counts[0] += 1
        else:
            st.count(status)
        d = now - accepted_at
        hist = st.duration
        hist.buckets[bisect_left(bounds, d)] += 1
        hist.sum += d

    n = 200_000
    best = min(timeit.repeat(per_request, number=n, repeat=5))
    empty = min(timeit.repeat(lambda: None, number=n, repeat=5))  # the call timeit itself adds
    return max(0.0, best - empty) / n * 1e6


def worker_wrap_us() -> float:
    """µs per call that ``--http`` adds to a worker's handler (zrouter.worker._http)."""
    from zrouter.worker._http import HandlerMetrics

    def echo(payload: Any) -> Any:
        return payload

    timed = HandlerMetrics("echo", 1).wrap(echo, is_async=False)
    n = 200_000
    bare = min(timeit.repeat(lambda: echo(1), number=n, repeat=5))
    wrapped = min(timeit.repeat(lambda: timed(1), number=n, repeat=5))
    return max(0.0, wrapped - bare) / n * 1e6


def run(cfg: Settings) -> dict[str, Any]:
    runs = cfg.pick(9, 3)
    warmup, duration = cfg.pick((0.3, 2.0), (0.3, 1.5))
    per: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with Cluster() as cluster:
        off = start_zrouter(cluster, 2, capacity=CAPACITY, worker_args=ZROUTER_WORKER_ARGS)
        on = start_zrouter(cluster, 2, capacity=CAPACITY, broker_args=["--http", "127.0.0.1:0"],
                           worker_args=[*ZROUTER_WORKER_ARGS, "--http", "127.0.0.1:0"])  # fmt: skip
        broker_url = _url(on.broker, r"HTTP on (http://[^/\s]+)/")
        worker_urls = [_url(w, r"worker metrics on (http://[^/\s]+)/metrics") for w in on.workers]
        observer = Observer(broker_url, worker_urls)
        try:
            for r in range(runs):
                pair = (("off", off), ("on", on))
                for name, system in pair if r % 2 == 0 else pair[::-1]:
                    res = measure_pipe(name, system, 100, INFLIGHT, warmup, duration, client="zrouter")
                    per[name].append(res)
                    progress(f"metrics run {r + 1}/{runs} {name:<3} {res['rate']:>9,.0f} req/s  "
                             f"broker {res['broker_cpu_us']:.1f} µs/req")
        finally:
            observer.stop()
    out: dict[str, Any] = {"runs": per, "scrapes": observer.scrapes, "events": observer.events,
                           "observer_errors": observer.errors, "duration": duration}  # fmt: skip
    for name, results in per.items():
        out[name] = {
            "rate": median([r["rate"] for r in results]),
            **{k: median([r[k] for r in results]) for k in ("broker_cpu_us", "workers_cpu_us")},
        }
    out["ratio"] = median([a["rate"] / b["rate"] for a, b in zip(per["on"], per["off"], strict=True)])
    cpu = {name: out[name]["broker_cpu_us"] + out[name]["workers_cpu_us"] for name in per}
    out["cpu_ratio"] = cpu["on"] / cpu["off"]
    out["hot_path_us"] = hot_path_us()
    out["hot_path_share"] = out["hot_path_us"] / out["off"]["broker_cpu_us"]
    out["worker_wrap_us"] = worker_wrap_us()
    out["worker_wrap_share"] = out["worker_wrap_us"] / out["off"]["workers_cpu_us"]
    progress(f"metrics: on/off {out['ratio']:.3f} ({observer.scrapes} scrapes, {observer.events} pushed status "
             f"documents, {observer.errors} observer errors)")
    return out


def rows(res: dict[str, Any]) -> list[Row]:
    ratio = res["ratio"]
    n = len(res["runs"]["on"])
    return [
        Row(f"metrics on / off: pipelined req/s (medians of {n}; ratio: median of pairs)",
            f"{fmt_int(res['on']['rate'])} / {fmt_int(res['off']['rate'])}", ratio=f"{ratio:.3f}x",
            target=">=0.95x (<=5% cost)",
            verdict="ok" if ratio >= 0.95 else "MISS"),
        Row("  broker + workers CPU µs/request on / off (what bounds throughput on 2 busy cores)",
            f"{res['on']['broker_cpu_us'] + res['on']['workers_cpu_us']:.1f} / "
            f"{res['off']['broker_cpu_us'] + res['off']['workers_cpu_us']:.1f}",
            ratio=f"{res['cpu_ratio']:.3f}x", target="<=1.05x", verdict="ok" if res["cpu_ratio"] <= 1.05 else "MISS"),
        Row("  broker CPU µs/request on / off", f"{res['on']['broker_cpu_us']:.1f} / {res['off']['broker_cpu_us']:.1f}"),
        Row("  workers CPU µs/request on / off",
            f"{res['on']['workers_cpu_us']:.1f} / {res['off']['workers_cpu_us']:.1f}"),
        Row("  router's metric statements, µs/request (share of broker CPU)", f"{res['hot_path_us']:.2f}",
            ratio=f"{res['hot_path_share']:.1%}", target="<=5%", verdict="ok" if res["hot_path_share"] <= 0.05 else "MISS"),
        Row("  worker handler timing (--http), µs/call (share of workers' CPU)", f"{res['worker_wrap_us']:.2f}",
            ratio=f"{res['worker_wrap_share']:.1%}", target="<=5%", verdict="ok" if res["worker_wrap_share"] <= 0.05 else "MISS"),
    ]  # fmt: skip


def plot(res: dict[str, Any], outdir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = ["off", "on"]
    for i, name in enumerate(names):
        rates = [r["rate"] for r in res["runs"][name]]
        ax.scatter([i] * len(rates), rates, color="#9ca3af", zorder=3, s=14)
        ax.bar(i, res[name]["rate"], color=["#7f7f7f", "#1f77b4"][i], width=0.6)
        ax.annotate(f"{res[name]['rate']:,.0f}", (i, res[name]["rate"]), ha="center", va="bottom",
                    xytext=(0, 3), textcoords="offset points", fontsize=9)
    ax.set_xticks([0, 1], ["metrics off", "metrics on\n(scraped every 1 s, dashboard open)"])
    ax.set_ylabel("requests / s (median; dots: runs)")
    ax.set_title(f"Cost of metrics: on/off = {res['ratio']:.3f} (target >= 0.95)")
    ax.margins(y=0.15)
    return save_plot(fig, outdir, "metrics")

