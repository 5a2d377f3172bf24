"""Real broker and worker processes for integration tests: started on free loopback ports,
watched through their logs (no sleeps as synchronisation), always stopped afterwards."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence

from zrouter.transport import free_tcp_endpoint

__all__ = ["BrokerProc", "Proc", "ProcessGroup", "WorkerProc"]


class Proc:
    """A child process whose stderr lines are collected so tests can wait on them."""

    def __init__(self, args: Sequence[str], name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = list(args)
        # No CONSUL_* from the developer's shell: brokers and workers would track and register in
        # whatever agent it names. Tests that want Consul pass --consul (or env) explicitly.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_HTTP_")}
        self.env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.popen: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=self.env,
        )
        threading.Thread(target=self._read, args=(self.popen,), daemon=True).start()

    def _read(self, popen: subprocess.Popen[str]) -> None:
        assert popen.stderr is not None
        for line in popen.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines if rx.search(line))

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 20.0) -> None:
        """Block until ``pattern`` appeared ``count`` times in the log, or fail with the log."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(1 for line in self.lines if rx.search(line)) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.name}: {pattern!r} not seen {count}x in {timeout}s; log:\n" + "\n".join(self.lines[-40:])
                    )
                self._cond.wait(min(left, 0.2))

    def signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(10)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


class BrokerProc(Proc):
    def __init__(self, *extra: str, frontend: str | None = None, backend: str | None = None,
                 heartbeat: float = 0.2, env: dict[str, str] | None = None) -> None:
        self.frontend = frontend or free_tcp_endpoint()
        self.backend = backend or free_tcp_endpoint()
        self.extra = list(extra)
        self.heartbeat = heartbeat
        super().__init__(self._argv(), "broker", env)
        self.wait_for("broker listening")

    def _argv(self) -> list[str]:
        return ["-m", "zrouter.broker", "--frontend", self.frontend, "--backend", self.backend,
                "--heartbeat", str(self.heartbeat), "--stats-interval", "3600", *self.extra]

    def restart(self) -> None:
        self.lines.clear()
        self.start()
        self.wait_for("broker listening")

    def wait_workers(self, n: int, timeout: float = 20.0) -> None:
        self.wait_for(r"worker \S+ joined", n, timeout)


class WorkerProc(Proc):
    """A ``python -m zrouter.worker``; ``broker`` None leaves the brokers to ``extra`` (``--broker-service``)."""

    def __init__(self, broker: str | None, *, service: str = "svc", handler: str = "zrouter.worker.examples:whoami",
                 capacity: int = 2, weight: int = 1, delay: float = 0.0, heartbeat: float = 0.2,
                 extra: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        args = ["-m", "zrouter.worker", "--service", service, *(["--broker", broker] if broker else []),
                "--capacity", str(capacity), "--weight", str(weight), "--heartbeat", str(heartbeat),
                "--delay", str(delay), *extra, handler]
        super().__init__(args, f"worker[{service}]", env)


class ProcessGroup:
    """Every process a test started, stopped at teardown even when the test failed."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def broker(self, *extra: str, **kw: object) -> BrokerProc:
        b = BrokerProc(*extra, **kw)  # type: ignore[arg-type]
        self.procs.append(b)
        return b

    def worker(self, broker: BrokerProc | str | None, **kw: object) -> WorkerProc:
        endpoint = broker.backend if isinstance(broker, BrokerProc) else broker
        w = WorkerProc(endpoint, **kw)  # type: ignore[arg-type]
        self.procs.append(w)
        return w

    def __iter__(self) -> Iterator[Proc]:
        return iter(self.procs)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.signal(signal.SIGTERM)
        for p in self.procs:
            p.stop()

