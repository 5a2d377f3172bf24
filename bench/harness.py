"""Process plumbing for the benchmarks: spawn, wait for readiness, measure, always clean up.

- :class:`Proc` is one child process (``python -m ...`` from the repository root) whose stdout
  and stderr lines are collected by reader threads, so a section can wait for a log line
  ("broker listening", "worker ... joined") instead of sleeping.
- :class:`Cluster` owns the processes of one measurement and stops them all on exit, even on
  errors or Ctrl-C; every live process is also killed at interpreter exit.
- :func:`cpu_seconds` and :func:`rss_bytes` read ``/proc`` (no psutil needed).
- :func:`run_client` runs a measuring client process (``python -m bench.loadgen ...``) and
  returns the JSON it prints on stdout.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zrouter.transport import free_tcp_endpoint

__all__ = [
    "REPO",
    "BenchError",
    "Cluster",
    "Proc",
    "Row",
    "Settings",
    "ZrouterSystem",
    "cpu_seconds",
    "cpu_split",
    "fmt_int",
    "fmt_ratio",
    "free_tcp_endpoint",
    "median",
    "percentile",
    "progress",
    "rss_bytes",
    "run_client",
    "save_plot",
    "start_zrouter",
    "thread_cpu",
]

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
_T0 = time.monotonic()
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_LIVE: set[Proc] = set()


class BenchError(RuntimeError):
    """A benchmark step failed (a process died, a readiness wait timed out, bad output)."""


@dataclass(frozen=True)
class Settings:
    """What the user asked for: ``quick`` shortens every section (a smoke test)."""

    quick: bool = False
    plots_dir: Path = REPO / "docs" / "bench"

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full


@dataclass
class Row:
    """One line of the final table."""

    measurement: str
    zrouter: str = ""
    proxy: str = ""
    majortomo: str = ""
    ratio: str = ""
    target: str = ""
    verdict: str = ""


def progress(msg: str) -> None:
    """A progress line on stderr, stamped with the time since the suite started."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# -- /proc readings ---------------------------------------------------------------------------


def cpu_split(pid: int, tid: int | None = None) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (all its threads), or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path, encoding="ascii") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK  # utime, stime: fields 14, 15


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/PID/stat."""
    return sum(cpu_split(pid))


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (threads of one name summed), e.g. python, ZMQbg/IO/0."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", encoding="ascii") as f:
                name = f.read().strip()
            cpu = sum(cpu_split(pid, int(tid)))
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        out[name] = out.get(name, 0.0) + cpu
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/PID/status."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


# -- processes --------------------------------------------------------------------------------


class Proc:
    """A child ``python`` process; its output lines are collected for :meth:`wait_for`."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        stdin: bool = False,
    ) -> None:
        self.name = name
        self.args = [PY, *args]
        self.out: list[str] = []
        self.err: list[str] = []
        self._cond = threading.Condition()
        self._eof = 0  # output streams fully read (2: the process is gone and all is read)
        self.popen = subprocess.Popen(
            self.args,
            cwd=REPO,
            env=child_env(env),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _LIVE.add(self)
        for stream, lines in ((self.popen.stdout, self.out), (self.popen.stderr, self.err)):
            threading.Thread(target=self._read, args=(stream, lines), daemon=True).start()

    def _read(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            with self._cond:
                lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof += 1
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 30) -> str:
        with self._cond:
            return "\n".join(self.err[-n:])

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 30.0, stdout: bool = False) -> None:
        """Block until ``pattern`` has appeared ``count`` times in stderr (or stdout)."""
        rx = re.compile(pattern)
        lines = self.out if stdout else self.err
        seen = 0
        checked = 0
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                seen += sum(1 for line in lines[checked:] if rx.search(line))
                checked = len(lines)
                if seen >= count:
                    return
                if self._eof == 2:
                    raise BenchError(f"{self.name} exited ({self.popen.wait(5)}) before {pattern!r}:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"{self.name}: {pattern!r} seen {seen}/{count} times in {timeout:g}s:\n{self.tail()}")
                self._cond.wait(min(left, 0.5))

    def send_line(self, text: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    def kill(self) -> None:
        """SIGKILL, then reap."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)
        _LIVE.discard(self)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait a little, then SIGKILL."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        _LIVE.discard(self)
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        try:
            proc.kill()
        except Exception:  # best effort at exit
            pass


class Cluster:
    """The processes of one measurement; ``with Cluster() as c:`` stops them all at the end."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def spawn(self, name: str, args: Sequence[str], env: dict[str, str] | None = None, stdin: bool = False) -> Proc:
        proc = Proc(name, args, env, stdin)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        # Workers first (so a zrouter broker does not wait for them on its way out), broker last.
        for proc in reversed(self.procs):
            proc.stop(timeout=3.0)
        self.procs.clear()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- zrouter ----------------------------------------------------------------------------------


@dataclass
class ZrouterSystem:
    """A running zrouter broker and its workers."""

    frontend: str
    backend: str
    broker: Proc
    workers: list[Proc] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return self.frontend


def start_zrouter(
    cluster: Cluster,
    workers: int = 2,
    *,
    service: str = "echo",
    handler: str = "zrouter.worker.examples:echo",
    capacity: int = 50,
    weights: Sequence[int] | None = None,
    worker_env: Sequence[dict[str, str]] | None = None,
    broker_args: Sequence[str] = (),
    worker_args: Sequence[str] = (),
    timeout: float = 30.0,
) -> ZrouterSystem:
    """A broker (``python -m zrouter.broker``) and ``workers`` workers (``python -m zrouter.worker``), ready.

    Ready means the broker logged "broker listening" and one "worker ... joined" per worker.
    """
    front, back = free_tcp_endpoint(), free_tcp_endpoint()
    broker = cluster.spawn(
        "zrouter broker",
        ["-m", "zrouter.broker", "--frontend", front, "--backend", back, "--stats-interval", "3600", *broker_args],
    )
    broker.wait_for("broker listening", timeout=timeout)
    system = ZrouterSystem(front, back, broker)
    for i in range(workers):
        weight = weights[i] if weights else 1
        env = worker_env[i] if worker_env else None
        system.workers.append(cluster.spawn(
            f"zrouter worker {i}",
            ["-m", "zrouter.worker", "--service", service, "--broker", back, "--capacity", str(capacity),
             "--weight", str(weight), *worker_args, handler],
            env,
        ))  # fmt: skip
    broker.wait_for(r"worker \S+ joined", workers, timeout=timeout)
    return system


# -- the measuring client ---------------------------------------------------------------------


def run_client(args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run ``python -m bench.loadgen ARGS`` to completion and return its JSON result."""
    try:
        done = subprocess.run(
            [PY, "-m", "bench.loadgen", *args], cwd=REPO, env=child_env(), capture_output=True,
            text=True, timeout=timeout, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"client {' '.join(args)} ran over {timeout:g}s") from exc
    if done.returncode != 0:
        raise BenchError(f"client {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    try:
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:
        raise BenchError(f"client {' '.join(args)} printed no JSON:\n{done.stdout[-500:]}\n{done.stderr[-2000:]}") from exc
    return result


# -- statistics and formatting ----------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return float(sorted_values[k])


def median(values: Sequence[float]) -> float:
    vals = sorted(v for v in values if not math.isnan(v))
    if not vals:
        return math.nan
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2.0


def fmt_int(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:,.0f}"


def fmt_ratio(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}x"


def save_plot(fig: Any, outdir: Path, name: str) -> list[Path]:
    """Lay out a section's matplotlib figure, write it to ``outdir/NAME.png`` and close it;
    returns ``[path]``, what a section's ``plot()`` returns."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = outdir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
