"""Section 8: sections 5 and 4's scenarios on NATS request-reply and RabbitMQ RPC.

- **SIGKILL**: bench/failover.py's setup (3 workers, ``failover.SERVICE_MS`` per request in
  parallel, a prefetch of ``failover.CAPACITY`` for RabbitMQ, Poisson ``failover.RATE`` req/s, a
  10 s client timeout, worker 0 SIGKILLed ``failover.KILL_AT`` s in): requests lost (any error),
  requests redelivered (RabbitMQ requeues what an unacknowledged consumer held), p99 during.
- **10x slower worker**: bench/policy_quality.py's setup (3 single-server workers at 2, 2 and
  20 ms, prefetch ``policy_quality.CAPACITY`` for RabbitMQ, Poisson load at 70% of capacity,
  a 30 s client timeout): p50 / p99 and timeouts. A NATS queue group picks a member at random,
  whatever it holds; RabbitMQ deals messages round robin up to each consumer's prefetch.

zrouter's figures for the same scenarios are sections 5 (failover) and 4 (policy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import failover, policy_quality
from bench.harness import Cluster, Row, Settings, median, progress, run_client
from bench.mq import nats_available, rabbitmq_available, start_nats, start_rabbitmq

__all__ = ["plot", "rows", "run"]

LABELS = {"nats": "NATS", "rabbitmq": "RabbitMQ"}


def _start(cluster: Cluster, system: str, mode: str, envs: list[dict[str, str]], prefetch: int) -> Any:
    if system == "nats":
        return start_nats(cluster, 3, mode=mode, worker_env=envs)
    return start_rabbitmq(cluster, 3, prefetch, mode=mode, worker_env=envs)


def _kill(cfg: Settings, system: str, r: int) -> dict[str, Any]:
    env = {"BENCH_SERVICE_MS": str(failover.SERVICE_MS)}
    duration = cfg.pick(6.0, 4.5)
    with Cluster() as cluster:
        s = _start(cluster, system, "attempt", [env, env, env], failover.CAPACITY)
        victim = s.workers[0]
        raw = run_client(
            ["open", "--system", system, "--endpoint", s.endpoint, "--rate", str(failover.RATE),
             "--duration", str(duration), "--warmup", "10", "--seed", str(r + 1), "--timeout", "10",
             "--kill-pid", str(victim.pid), "--kill-at", str(failover.KILL_AT)],
            timeout=duration + 60,
        )  # fmt: skip
        if victim.alive():
            raise RuntimeError("the victim worker survived SIGKILL")
    a = failover.analyse(raw)
    progress(f"mq failover {LABELS[system]:<8} round {r + 1}: lost {a['lost']} of {a['sent']}, "
             f"redelivered {a['requeued']}, p99 during {a['p99_during_ms']:.1f} ms")
    return a


def _slow(cfg: Settings, system: str, r: int) -> dict[str, Any]:
    fast, slow = policy_quality.FAST_MS, policy_quality.SLOW_MS
    envs = [{"BENCH_SERVICE_MS": str(fast), "BENCH_ROLE": "fast"}, {"BENCH_SERVICE_MS": str(fast), "BENCH_ROLE": "fast"},
            {"BENCH_SERVICE_MS": str(slow), "BENCH_ROLE": "slow"}]
    duration = cfg.pick(8.0, 3.0)
    with Cluster() as cluster:
        s = _start(cluster, system, "serial", envs, policy_quality.CAPACITY)
        raw = run_client(
            ["open", "--system", system, "--endpoint", s.endpoint, "--rate", f"{policy_quality.RATE:.1f}",
             "--duration", str(duration), "--warmup", "30", "--seed", str(r + 1), "--timeout", "30"],
            timeout=duration + 120,
        )  # fmt: skip
    a = policy_quality.analyse(raw)
    a["error_share"] = a["errors"] / max(1, a["sent"])
    progress(f"mq slow worker {LABELS[system]:<8} round {r + 1}: p50 {a['p50_ms']:.1f} ms, p99 {a['p99_ms']:.1f} ms, "
             f"errors {a['errors']} of {a['sent']}, slow worker share {a['slow_share']:.1%}")
    return a


def run(cfg: Settings) -> dict[str, Any]:
    rounds = cfg.pick(2, 1)
    systems = [s for s, ok in (("nats", nats_available()), ("rabbitmq", rabbitmq_available())) if ok]
    if not systems:
        raise RuntimeError("neither NATS nor RabbitMQ is installed (make bench installs both)")
    out: dict[str, Any] = {"rounds": rounds}
    for system in systems:
        kills = [_kill(cfg, system, r) for r in range(rounds)]
        slows = [_slow(cfg, system, r) for r in range(rounds)]
        out[system] = {
            "lost": sum(a["lost"] for a in kills), "sent": sum(a["sent"] for a in kills),
            "redelivered": sum(a["requeued"] for a in kills),
            "p99_during_ms": median([a["p99_during_ms"] for a in kills]),
            "p99_before_ms": median([a["p99_before_ms"] for a in kills]),
            "slow_p50_ms": median([a["p50_ms"] for a in slows]), "slow_p99_ms": median([a["p99_ms"] for a in slows]),
            "slow_errors": sum(a["errors"] for a in slows), "slow_sent": sum(a["sent"] for a in slows),
            "slow_share": median([a["slow_share"] for a in slows]),
        }  # fmt: skip
    return out


def rows(res: dict[str, Any]) -> list[Row]:
    def cell(system: str, text: str) -> dict[str, str]:
        return {"nats" if system == "nats" else "rabbitmq": text}

    n = res["rounds"]
    kill = Row(f"8 SIGKILL 1 of 3 workers ({n} round(s)): lost / sent, p99 during ms", ratio="zrouter: section 5")
    slow = Row("  1 of 3 workers 10x slower, 70% load: p50 / p99 ms, errors", ratio="zrouter: section 4")
    for system in ("nats", "rabbitmq"):
        r = res.get(system)
        if r is None:
            continue
        redelivered = f", {r['redelivered']} redelivered" if r["redelivered"] else ""
        setattr(kill, system, f"{r['lost']} / {r['sent']}{redelivered}, {r['p99_during_ms']:.0f}")
        errors = f"{r['slow_errors']} ({r['slow_errors'] / max(1, r['slow_sent']):.0%})"
        setattr(slow, system, f"{r['slow_p50_ms']:.1f} / {r['slow_p99_ms']:.0f}, {errors}")
    return [kill, slow]


def plot(res: dict[str, Any], outdir: Path) -> list[Path]:
    return []  # the figures are in the table; sections 4 and 5 plot zrouter's runs
