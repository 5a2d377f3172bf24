"""Section 9: what CURVE costs. The same zrouter deployment twice, side by side in one run:
plain, and with ``--curve-secret-key``/``--worker-keys``/``--client-keys`` (every message
encrypted and authenticated by libzmq, the broker reading each request's User-Id to check the
client's services).

Shape as in sections 1 and 2: one broker, 2 echo workers (``--inline``, capacity 50), ~100-byte
payloads; pipelined req/s with 100 in flight, then one-at-a-time p50/p99. Runs alternate
between the two (off, on, on, off, ...) and medians are reported, with the CPU per request of
the broker and the workers (CURVE encrypts and decrypts every frame in libzmq's I/O threads).

The measuring client is ``bench.loadgen`` itself; for the CURVE runs it goes through
``python -m bench.curve client --server-key F --secret-key F -- LOADGEN ARGS``, which gives
the library's ``Client`` the keys and runs the same loops.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import (
    PY,
    REPO,
    BenchError,
    Cluster,
    Row,
    Settings,
    child_env,
    cpu_seconds,
    fmt_int,
    fmt_ratio,
    median,
    progress,
    save_plot,
    start_zrouter,
)
from bench.peers import ZROUTER_WORKER_ARGS

__all__ = ["main", "plot", "rows", "run"]

CAPACITY = 50
INFLIGHT = 100
MODES = ("off", "on")


def _keys(root: Path) -> dict[str, Path]:
    from zrouter.keys import create_key_pair

    for d in ("workers", "clients"):
        (root / d).mkdir()
    create_key_pair("broker", str(root))
    create_key_pair("worker", str(root / "workers"))
    create_key_pair("client", str(root / "clients"))
    return {"broker_secret": root / "broker.key_secret", "server": root / "broker.key",
            "worker": root / "workers" / "worker.key_secret", "client": root / "clients" / "client.key_secret",
            "workers": root / "workers", "clients": root / "clients"}


def _client(mode: str, keys: dict[str, Path], args: Sequence[str], timeout: float) -> dict[str, Any]:
    if mode == "on":
        argv = [PY, "-m", "bench.curve", "client", "--server-key", str(keys["server"]),
                "--secret-key", str(keys["client"]), "--", *args]
    else:
        argv = [PY, "-m", "bench.loadgen", *args]
    try:
        done = subprocess.run(argv, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"client {' '.join(args)} ran over {timeout:g}s") from exc
    if done.returncode != 0:
        raise BenchError(f"client {' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(cfg: Settings) -> dict[str, Any]:
    runs = cfg.pick(5, 2)
    warmup, duration = cfg.pick((0.5, 2.0), (0.3, 1.0))
    count = cfg.pick(2000, 600)
    per: dict[str, dict[str, list[dict[str, Any]]]] = {m: {"pipe": [], "sync": []} for m in MODES}
    with tempfile.TemporaryDirectory(prefix="zrouter-bench-curve-") as tmp, Cluster() as cluster:
        keys = _keys(Path(tmp))
        curve_broker = ["--curve-secret-key", str(keys["broker_secret"]), "--worker-keys", str(keys["workers"]),
                        "--client-keys", str(keys["clients"])]
        curve_worker = ["--curve-server-key", str(keys["server"]), "--curve-secret-key", str(keys["worker"])]
        systems = {
            "off": start_zrouter(cluster, 2, capacity=CAPACITY, worker_args=ZROUTER_WORKER_ARGS),
            "on": start_zrouter(cluster, 2, capacity=CAPACITY, broker_args=curve_broker,
                                worker_args=[*ZROUTER_WORKER_ARGS, *curve_worker]),
        }
        for r in range(runs):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:  # alternate who goes first: drift cancels
                system = systems[mode]
                procs = [system.broker, *system.workers]
                before = [cpu_seconds(p.pid) for p in procs]
                res = _client(mode, keys, ["pipe", "--endpoint", system.endpoint, "--inflight", str(INFLIGHT),
                                           "--warmup", str(warmup), "--duration", str(duration)],
                              timeout=warmup + duration + 120)
                after = [cpu_seconds(p.pid) for p in procs]
                n = res["total"]
                res["broker_cpu_us"] = (after[0] - before[0]) / n * 1e6
                res["workers_cpu_us"] = sum(a - b for a, b in zip(after[1:], before[1:], strict=True)) / n * 1e6
                res["client_cpu_us"] = res.pop("client_cpu_s") / n * 1e6
                per[mode]["pipe"].append(res)
                sync = _client(mode, keys, ["sync", "--endpoint", system.endpoint, "--warmup", "200",
                                            "--count", str(count)], timeout=120)
                sync.pop("curve_us", None)
                per[mode]["sync"].append(sync)
                progress(f"curve run {r + 1}/{runs} CURVE {mode:<3} {res['rate']:>9,.0f} req/s  broker "
                         f"{res['broker_cpu_us']:.1f} µs/req  one at a time p50 {sync['p50_us']:.0f} µs")
    out: dict[str, Any] = {"runs": per, "inflight": INFLIGHT, "duration": duration, "count": count}
    # Each run of "on" next to its "off" neighbour: the median of those ratios is steadier than
    # the ratio of medians when other load comes and goes on a shared machine.
    pairs = list(zip(per["on"]["pipe"], per["off"]["pipe"], per["on"]["sync"], per["off"]["sync"], strict=True))
    out["paired_rate_ratio"] = median([a["rate"] / b["rate"] for a, b, _, _ in pairs])
    out["paired_p50_delta_us"] = median([c["p50_us"] - d["p50_us"] for _, _, c, d in pairs])
    out["paired_cpu_ratio"] = median([_cpu(a) / _cpu(b) for a, b, _, _ in pairs])
    for mode in MODES:
        pipe, sync = per[mode]["pipe"], per[mode]["sync"]
        out[mode] = {
            "rate": median([r["rate"] for r in pipe]),
            **{k: median([r[k] for r in pipe]) for k in ("broker_cpu_us", "workers_cpu_us", "client_cpu_us")},
            "p50_us": median([r["p50_us"] for r in sync]),
            "p99_us": median([r["p99_us"] for r in sync]),
        }
    return out


def _cpu(res: dict[str, Any]) -> float:
    return float(res["broker_cpu_us"] + res["workers_cpu_us"] + res["client_cpu_us"])


def rows(res: dict[str, Any]) -> list[Row]:
    on, off = res["on"], res["off"]
    n = len(res["runs"]["on"]["pipe"])
    return [
        Row(f"9 CURVE on / off: pipelined req/s (median of {n})", f"{fmt_int(on['rate'])} / {fmt_int(off['rate'])}",
            ratio=f"{fmt_ratio(res['paired_rate_ratio'])} of plain (paired)"),
        Row("  CURVE on / off: CPU µs/request broker, workers, client",
            " / ".join(f"{on[k]:.1f}" for k in ("broker_cpu_us", "workers_cpu_us", "client_cpu_us")) + "  vs  "
            + " / ".join(f"{off[k]:.1f}" for k in ("broker_cpu_us", "workers_cpu_us", "client_cpu_us")),
            ratio=f"{fmt_ratio(res['paired_cpu_ratio'])} total (paired)"),
        Row("  CURVE on / off: one-at-a-time p50 µs", f"{on['p50_us']:.0f} / {off['p50_us']:.0f}",
            ratio=f"{res['paired_p50_delta_us']:+.0f} µs (paired)"),
        Row("  CURVE on / off: one-at-a-time p99 µs", f"{on['p99_us']:.0f} / {off['p99_us']:.0f}"),
    ]


def plot(res: dict[str, Any], outdir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = ["CURVE off", "CURVE on"]
    colors = ["#7f7f7f", "#1f77b4"]
    bars = ax.bar(labels, [res[m]["rate"] for m in MODES], color=colors)
    for bar, m in zip(bars, MODES, strict=True):
        ax.annotate(f"{res[m]['rate']:,.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9, xytext=(0, 3), textcoords="offset points")
    ax.set_ylabel("requests / s (median)")
    ax.set_title(f"Pipelined, {res['inflight']} in flight")
    ax.margins(y=0.15)
    width = 0.38
    xs = range(len(MODES))
    ax2.bar([x - width / 2 for x in xs], [res[m]["p50_us"] for m in MODES], width, label="p50", color="#2ca02c")
    ax2.bar([x + width / 2 for x in xs], [res[m]["p99_us"] for m in MODES], width, label="p99", color="#d62728")
    ax2.set_xticks(list(xs), labels)
    ax2.set_ylabel("µs (median of runs)")
    ax2.set_title("One request at a time")
    ax2.legend()
    fig.suptitle("What CURVE costs: the same broker + 2 echo workers, plain and with CURVE")
    return save_plot(fig, outdir, "curve")


def main(argv: Sequence[str] | None = None) -> None:
    """``client --server-key F --secret-key F -- LOADGEN ARGS``: bench.loadgen with CURVE keys."""
    import argparse

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "client" or "--" not in args:
        raise SystemExit("usage: python -m bench.curve client --server-key F --secret-key F -- LOADGEN ARGS")
    cut = args.index("--")
    p = argparse.ArgumentParser(prog="python -m bench.curve client")
    p.add_argument("--server-key", required=True)
    p.add_argument("--secret-key", required=True)
    opts = p.parse_args(args[1:cut])

    import zrouter.client
    from bench import loadgen

    plain = zrouter.client.Client

    class CurveClient(plain):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, curve_server_key=opts.server_key, curve_secret_key=opts.secret_key, **kw)

    zrouter.client.Client = CurveClient  # type: ignore[misc]  # loadgen imports it at call time
    loadgen.main(args[cut + 1 :])


if __name__ == "__main__":
    main()
