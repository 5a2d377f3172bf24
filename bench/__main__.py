"""``python -m bench``: run the benchmark sections, print one table, write JSON and plots.

Sections (``--only`` takes these names, comma-separated):

  throughput   pipelined req/s, zrouter vs zmq.proxy vs majortomo
  latency      one request at a time, p50/p99
  payload      100 B / 10 KB / 1 MB
  policy       policy quality with one 10x slower worker, Poisson load
  failover     SIGKILL a worker under load: lost requests, time to requeued reply
  scale        idle broker cost with 10/100/1,000 workers, CPU per request, 100,000 queued
               requests, policy pick cost at 10/1,000/10,000 workers
  simulate     discrete-event simulation of the policies at 1,000 workers
  metrics      the cost of observing: pipelined req/s with metrics on (--http, scraped every
               second, a dashboard open) vs off, same run
  curve        CURVE's cost: pipelined req/s and one-at-a-time p50, CURVE on vs off
  memory       broker RSS over time under each flood of issue 7 (unserved service, hoarding
               worker, client that never reads, unread large replies, oversize frames)
  mq           sections 5 and 4's SIGKILL and slow-worker scenarios on NATS and RabbitMQ

Progress goes to stderr; the table to stdout; results to bench/results/latest.json; plots to
docs/bench/*.png (the README's, committed: pass --plots DIR to keep them). ``make bench``
installs the bench's dependencies (the ``bench`` extra, NATS, RabbitMQ) and runs everything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.harness import REPO, Row, Settings, progress

SECTIONS = ("throughput", "latency", "payload", "policy", "failover", "scale", "simulate", "metrics", "curve",
            "memory", "mq")
MODULES = {
    "throughput": "bench.throughput",
    "latency": "bench.latency",
    "payload": "bench.payload",
    "policy": "bench.policy_quality",
    "failover": "bench.failover",
    "scale": "bench.scale",
    "simulate": "bench.simulate",
    "metrics": "bench.metrics",
    "curve": "bench.curve",
    "memory": "bench.memory",
    "mq": "bench.mq_scenarios",
}
COLUMNS = ("measurement", "zrouter", "zrouter pure", "zmq.proxy", "majortomo", "NATS", "RabbitMQ", "ratio", "target",
           "ok")


def table(rows: list[Row]) -> str:
    cells = [list(COLUMNS)] + [
        [r.measurement, r.zrouter, r.pure, r.proxy, r.majortomo, r.nats, r.rabbitmq, r.ratio, r.target, r.verdict]
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    right = {1, 2, 3, 4, 5, 6}

    def line(c: list[str]) -> str:
        return "| " + " | ".join(x.rjust(w) if i in right else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths, strict=True))) + " |"

    sep = "|" + "|".join("-" * (w + 1) + (":" if i in right else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), sep, *(line(c) for c in cells[1:])])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer, shorter runs (a smoke test, < 3 min)")
    p.add_argument("--only", default="", metavar="NAME[,NAME]", help="run only these sections")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "latest.json", help="results JSON")
    p.add_argument("--plots", type=Path, default=REPO / "docs" / "bench", help="directory for the PNG plots")
    p.add_argument("--no-plots", action="store_true", help="skip the plots (no matplotlib needed)")
    p.add_argument("--worker-pool", action="store_true",
                   help="zrouter echo workers run handlers on their thread pool instead of --inline")
    args = p.parse_args(argv)
    if args.worker_pool:
        from bench import peers

        peers.ZROUTER_WORKER_ARGS.clear()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    cfg = Settings(quick=args.quick, plots_dir=args.plots)
    os.environ.setdefault("MPLBACKEND", "Agg")
    if not args.no_plots:
        try:
            import matplotlib
        except ImportError:
            p.error("the plots need matplotlib: pip install -e '.[bench]' (make bench does), or pass --no-plots")
        matplotlib.use("Agg")
        args.plots.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    progress(f"bench: sections {', '.join(chosen)}{' (quick)' if args.quick else ''}; {os.cpu_count()} CPUs")
    results: dict[str, Any] = {"quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {},
                               "loadavg_at_start": os.getloadavg()[0]}
    _warn_if_busy("at start")
    rows: list[Row] = []
    plots: list[Path] = []
    failed: list[str] = []
    for name in chosen:
        module: ModuleType = __import__(MODULES[name], fromlist=["run"])
        t0 = time.monotonic()
        progress(f"== {name} ==")
        try:
            res = module.run(cfg)
        except KeyboardInterrupt:
            progress("interrupted: stopping every process started")
            raise
        except Exception:  # one broken section must not lose the others
            progress(f"{name} FAILED:\n{traceback.format_exc()}")
            failed.append(name)
            rows.append(Row(f"{name}: FAILED (see stderr)"))
            continue
        res["seconds"] = round(time.monotonic() - t0, 1)
        res["loadavg_after"] = os.getloadavg()[0]
        results["sections"][name] = res
        rows.extend(module.rows(res))
        if not args.no_plots:
            plot: Callable[[dict[str, Any], Path], list[Path]] = module.plot
            try:
                plots.extend(plot(res, args.plots))
            except Exception:
                progress(f"{name}: plot failed:\n{traceback.format_exc()}")
        progress(f"{name} done in {res['seconds']:.0f}s")
    results["seconds"] = round(time.monotonic() - started, 1)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1, default=float))
    print(table(rows))
    print(f"\n{len(chosen)} section(s) in {results['seconds']:.0f}s on {os.cpu_count()} CPUs; "
          f"results: {_rel(args.results)}")
    if plots:
        print("plots: " + ", ".join(_rel(p) for p in plots))
    sys.stdout.flush()
    return 1 if failed else 0


def _warn_if_busy(when: str) -> None:
    """Other work on the machine skews every figure: say so (1-minute load average)."""
    load = os.getloadavg()[0]
    if load > 0.5:
        progress(f"warning: load average {load:.2f} {when}: other processes are using the CPUs; "
                 "ratios within this run still compare like with like, absolute numbers will be low")


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
