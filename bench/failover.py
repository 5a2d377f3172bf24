"""Section 5: failover. SIGKILL one of 3 workers under steady load, with default settings.

Broker and workers run with their defaults (heartbeat 1 s, liveness 3). Each worker
(``bench.handlers:attempt``, ``CAPACITY`` credits) takes ``SERVICE_MS`` per request, in
parallel, and answers with the request's attempt number. An AsyncClient sends open-loop Poisson
load at ``RATE`` req/s (about a third of capacity, so every worker holds several requests at any
time) and SIGKILLs worker 0 ``KILL_AT`` seconds in, timing the kill on its own clock.

Reported per round, then as medians: requests lost (any error reply: must be 0), the time from
``os.kill`` to the first reply of a request with attempt >= 1 (one the killed worker held, which
the broker requeued), and the p99 of the requests in flight during the event (those whose
lifetime overlaps the second after the kill) next to the p99 before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.harness import Cluster, Row, Settings, median, percentile, progress, run_client, save_plot, start_zrouter

__all__ = ["analyse", "plot", "rows", "run"]

SERVICE_MS = 50.0
CAPACITY = 16
RATE = 300.0
KILL_AT = 2.5
WINDOW = 1.0  # seconds after the kill that count as "during the event"


def analyse(raw: dict[str, Any]) -> dict[str, Any]:
    recs = raw["records"]
    kill = raw["kill_at"]
    requeued = [r for r in recs if r[3] >= 1]
    first = min((r[0] + r[1] for r in requeued), default=float("nan")) - kill
    during = sorted(r[1] * 1000 for r in recs if r[0] < kill + WINDOW and r[0] + r[1] > kill)
    before = sorted(r[1] * 1000 for r in recs if r[0] + r[1] < kill)
    return {
        "sent": raw["sent"],
        "lost": sum(1 for r in recs if r[2] != "ok"),
        "errors": sorted({r[2] for r in recs if r[2] != "ok"}),
        "requeued": len(requeued),
        "kill_to_requeued_ms": first * 1000,
        "p99_during_ms": percentile(during, 99),
        "max_during_ms": during[-1] if during else float("nan"),
        "p99_before_ms": percentile(before, 99),
        "p50_before_ms": percentile(before, 50),
    }


def run(cfg: Settings) -> dict[str, Any]:
    rounds = cfg.pick(3, 1)
    duration = cfg.pick(6.0, 4.5)
    env = {"BENCH_SERVICE_MS": str(SERVICE_MS)}
    per: list[dict[str, Any]] = []
    first_raw: dict[str, Any] = {}
    for r in range(rounds):
        with Cluster() as cluster:
            system = start_zrouter(cluster, 3, service="work", handler="bench.handlers:attempt", capacity=CAPACITY,
                                   worker_env=[env, env, env])
            victim = system.workers[0]
            raw = run_client(
                ["open", "--endpoint", system.endpoint, "--service", "work", "--rate", str(RATE),
                 "--duration", str(duration), "--warmup", "10", "--seed", str(r + 1), "--timeout", "10",
                 "--kill-pid", str(victim.pid), "--kill-at", str(KILL_AT)],
                timeout=duration + 60,
            )  # fmt: skip
            if victim.alive():
                raise RuntimeError("the victim worker survived SIGKILL")
            broker_saw = any("left service" in line for line in system.broker.err)
        a = analyse(raw)
        a["broker_logged_leave"] = broker_saw
        per.append(a)
        if not first_raw:
            first_raw = raw
        progress(f"failover round {r + 1}/{rounds}: lost {a['lost']}, requeued {a['requeued']}, "
                 f"kill -> requeued reply {a['kill_to_requeued_ms']:.1f} ms, p99 during {a['p99_during_ms']:.1f} ms "
                 f"(before {a['p99_before_ms']:.1f} ms)")
    return {
        "rounds": per,
        "settings": {"service_ms": SERVICE_MS, "capacity": CAPACITY, "rate": RATE, "kill_at": KILL_AT,
                     "heartbeat": 1.0, "liveness": 3},
        "lost": sum(a["lost"] for a in per),
        "requeued": sum(a["requeued"] for a in per),
        "kill_to_requeued_ms": median([a["kill_to_requeued_ms"] for a in per]),
        "p99_during_ms": median([a["p99_during_ms"] for a in per]),
        "p99_before_ms": median([a["p99_before_ms"] for a in per]),
        "trace": {"records": first_raw["records"], "kill_at": first_raw["kill_at"]},
    }


def rows(res: dict[str, Any]) -> list[Row]:
    n = len(res["rounds"])
    k = res["kill_to_requeued_ms"]
    return [
        Row(f"5 failover: SIGKILL 1 of 3 workers ({n} rounds): requests lost", str(res["lost"]), "", "",
            f"{res['requeued']} requeued", "0", "ok" if res["lost"] == 0 else "MISS"),
        Row("  kill -> first requeued reply, ms (median)", f"{k:.1f}", "", "",
            f"{k - res['settings']['service_ms']:.1f} ms + {res['settings']['service_ms']:g} ms service", "<=1000 ms",
            "ok" if k <= 1000 else "MISS"),
        Row("  p99 during the event, ms (median)", f"{res['p99_during_ms']:.1f}", "", "",
            f"before: {res['p99_before_ms']:.1f} ms"),
    ]


def plot(res: dict[str, Any], outdir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    trace = res["trace"]
    recs = trace["records"]
    kill = trace["kill_at"]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    first = [r for r in recs if r[3] < 1]
    again = [r for r in recs if r[3] >= 1]
    ax.scatter([r[0] for r in first], [r[1] * 1000 for r in first], s=4, color="#1f77b4", label="first attempt")
    ax.scatter([r[0] for r in again], [r[1] * 1000 for r in again], s=18, color="#d62728", marker="x",
               label="requeued (attempt >= 1)")
    ax.axvline(kill, color="k", linestyle="--", linewidth=1)
    ax.annotate("SIGKILL worker 0", (kill, ax.get_ylim()[1]), xytext=(4, -12), textcoords="offset points", fontsize=8)
    ax.set_xlabel("request sent at, s")
    ax.set_ylabel("latency, ms")
    s = res["settings"]
    ax.set_title(f"Failover: 3 workers x {s['capacity']} credits, {s['service_ms']:g} ms per request, "
                 f"Poisson {s['rate']:g} req/s; lost {res['rounds'][0]['lost']}, "
                 f"kill -> requeued reply {res['rounds'][0]['kill_to_requeued_ms']:.1f} ms")
    ax.legend(loc="upper left")
    ax.grid(True, alpha=0.3)
    return save_plot(fig, outdir, "failover")
