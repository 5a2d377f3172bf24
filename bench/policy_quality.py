"""Section 4: policy quality with one slow worker.

Three zrouter workers (``bench.handlers:serial``: one request at a time per worker, the rest of
its ``CAPACITY`` credits waiting inside it): two serve in ``FAST_MS``, one in 10x that. Weights
say so (10, 10, 1): only the weighted policies read them. An AsyncClient sends open-loop Poisson
load at ``LOAD`` of the total capacity (2 x 1/FAST + 1/SLOW requests per second) for each policy
in turn, on a fresh broker (``--policy NAME``) and fresh workers each time. A load-blind policy
keeps the slow worker's credits full, so about 1 request in 15 waits behind up to
``CAPACITY`` slow ones; a load-aware one sends it work only when the fast workers are busier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.harness import Cluster, Row, Settings, median, percentile, progress, run_client, save_plot, start_zrouter

__all__ = ["POLICIES", "analyse", "plot", "rows", "run"]

POLICIES = ("round-robin", "random", "least-outstanding", "weighted-least-outstanding", "p2c-ewma")
FAST_MS = 2.0
SLOW_MS = 10 * FAST_MS
CAPACITY = 16
WEIGHTS = (10, 10, 1)
LOAD = 0.70
CAPACITY_RPS = 2 * 1000.0 / FAST_MS + 1000.0 / SLOW_MS
RATE = LOAD * CAPACITY_RPS


def analyse(res: dict[str, Any]) -> dict[str, Any]:
    """p50/p99 (ms), errors and the slow worker's share from one open-loop run."""
    recs = res["records"]
    names = res["workers"]
    ok = sorted(r[1] * 1000.0 for r in recs if r[2] == "ok")
    slow = {i for i, n in enumerate(names) if n.startswith("slow")}
    return {
        "sent": res["sent"],
        "errors": sum(1 for r in recs if r[2] != "ok"),
        "p50_ms": percentile(ok, 50),
        "p99_ms": percentile(ok, 99),
        "p999_ms": percentile(ok, 99.9),
        "slow_share": sum(1 for r in recs if r[4] in slow) / max(1, len(recs)),
    }


def run(cfg: Settings) -> dict[str, Any]:
    rounds = cfg.pick(2, 1)
    duration = cfg.pick(8.0, 3.0)
    per: dict[str, list[dict[str, Any]]] = {}
    envs = [{"BENCH_SERVICE_MS": str(FAST_MS), "BENCH_ROLE": "fast"},
            {"BENCH_SERVICE_MS": str(FAST_MS), "BENCH_ROLE": "fast"},
            {"BENCH_SERVICE_MS": str(SLOW_MS), "BENCH_ROLE": "slow"}]
    for r in range(rounds):
        for policy in POLICIES:
            with Cluster() as cluster:
                system = start_zrouter(
                    cluster, 3, service="work", handler="bench.handlers:serial", capacity=CAPACITY,
                    weights=WEIGHTS, worker_env=envs, broker_args=["--policy", policy],
                )  # fmt: skip
                raw = run_client(
                    ["open", "--endpoint", system.endpoint, "--service", "work", "--rate", f"{RATE:.1f}",
                     "--duration", str(duration), "--warmup", "30", "--seed", str(r + 1), "--timeout", "30"],
                    timeout=duration + 120,
                )  # fmt: skip
            a = analyse(raw)
            per.setdefault(policy, []).append(a)
            progress(f"policy round {r + 1}/{rounds} {policy:<27} p50 {a['p50_ms']:6.2f} ms  p99 {a['p99_ms']:7.2f} ms  "
                     f"slow worker share {a['slow_share']:.1%}  errors {a['errors']}")
    out: dict[str, Any] = {
        "runs": per, "rate": RATE, "load": LOAD, "fast_ms": FAST_MS, "slow_ms": SLOW_MS,
        "capacity": CAPACITY, "weights": list(WEIGHTS), "duration": duration,
    }  # fmt: skip
    for policy, results in per.items():
        out[policy] = {k: median([x[k] for x in results]) for k in ("p50_ms", "p99_ms", "p999_ms", "slow_share")}
        out[policy]["errors"] = sum(x["errors"] for x in results)
        out[policy]["sent"] = sum(x["sent"] for x in results)
    return out


def rows(res: dict[str, Any]) -> list[Row]:
    rr = res["round-robin"]["p99_ms"]
    out = [Row(f"4 policy quality, 1 of 3 workers 10x slower, {res['load']:.0%} load: p50 / p99 ms")]
    for policy in POLICIES:
        r = res[policy]
        ratio = r["p99_ms"] / rr
        target = verdict = ""
        if policy == "least-outstanding":
            target, verdict = "p99 <=0.5x round-robin", "ok" if ratio <= 0.5 else "MISS"
        errors = f", {r['errors']} errors" if r["errors"] else ""
        out.append(Row(f"  {policy}", f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}", "", "",
                       f"p99 {ratio:.2f}x RR; slow {r['slow_share']:.1%}{errors}", target, verdict))
    return out


def plot(res: dict[str, Any], outdir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = range(len(POLICIES))
    for off, key, label, color in ((-0.27, "p50_ms", "p50", "#aec7e8"), (0.0, "p99_ms", "p99", "#1f77b4"),
                                   (0.27, "p999_ms", "p99.9", "#08306b")):
        vals = [res[p][key] for p in POLICIES]
        bars = ax.bar([x + off for x in xs], vals, 0.27, label=label, color=color)
        for bar, v in zip(bars, vals, strict=True):
            ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [f"{p}\n(slow: {res[p]['slow_share']:.1%})" for p in POLICIES], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (log)")
    ax.set_title(f"Policy quality: 3 workers ({res['fast_ms']:g}, {res['fast_ms']:g}, {res['slow_ms']:g} ms, "
                 f"capacity {res['capacity']}), Poisson load {res['load']:.0%} = {res['rate']:.0f} req/s")
    ax.legend()
    ax.grid(True, axis="y", which="both", alpha=0.3)
    return save_plot(fig, outdir, "policy_quality")
