"""A real ``consul agent -dev`` for tests, on free loopback ports, plus pytest fixtures.

Register as a plugin (``pytest_plugins = ["tests.consul_agent"]`` in tests/conftest.py, or
``-p tests.consul_agent``) to get:

* ``consul_bin``          (session)  absolute path of the consul binary
* ``consul_agent``        (function) a fresh agent, stopped after the test
* ``consul_agent_module`` (module)   one agent shared by a module's tests

The binary is ``$CONSUL_BIN`` when that is set and executable, else whatever
``scripts/get-consul`` prints (it may fetch Debian's package into .cache/ the first time).
The fixtures never skip: without a binary they fail and say to run scripts/get-consul.

A ``-dev`` agent keeps everything in memory: :meth:`ConsulAgent.restart` brings it back on the
same ports but with an empty catalog (as a real agent that lost its state would be).
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import socket
import string
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["ConsulAgent", "ConsulAgentError", "find_consul_binary", "free_port"]

REPO = Path(__file__).resolve().parent.parent
GET_CONSUL = REPO / "scripts" / "get-consul"
HOW_TO = "run scripts/get-consul (it prints the binary's path; or set CONSUL_BIN to a consul binary)"


class ConsulAgentError(RuntimeError):
    """The test agent could not be found, started or stopped."""


@functools.lru_cache(maxsize=1)
def find_consul_binary() -> str:
    """Absolute path of a consul binary: $CONSUL_BIN, else the output of scripts/get-consul."""
    env = os.environ.get("CONSUL_BIN")
    if env and os.path.isfile(env) and os.access(env, os.X_OK):
        return os.path.abspath(env)
    try:
        proc = subprocess.run(
            [str(GET_CONSUL)], capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConsulAgentError(f"no consul binary: {GET_CONSUL} failed to run ({exc}); {HOW_TO}") from exc
    path = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not path or not os.access(path, os.X_OK):
        raise ConsulAgentError(
            f"no consul binary: {GET_CONSUL} exited {proc.returncode}; {HOW_TO}\n{proc.stderr[-2000:]}"
        )
    return path


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (serf uses both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ConsulAgentError("could not find a free loopback port")


class ConsulAgent:
    """One ``consul agent -dev`` bound to 127.0.0.1 on its own free ports, logging to a file."""

    READY_TIMEOUT = 20.0
    STOP_TIMEOUT = 5.0

    def __init__(self, binary: str | None = None, *, log_dir: str | os.PathLike[str] | None = None) -> None:
        self.binary = binary or find_consul_binary()
        self.node = "zrouter-test-" + "".join(random.choices(string.ascii_lowercase + string.digits, k=8))
        self._log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="zrouter-consul-"))
        self.log_path = self._log_dir / f"{self.node}.log"
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    # -- addresses -------------------------------------------------------------------------

    @property
    def http_port(self) -> int:
        if not self.ports:
            raise ConsulAgentError("agent was never started")
        return self.ports["http"]

    @property
    def http_addr(self) -> str:
        """``127.0.0.1:PORT`` of the HTTP API (what CONSUL_HTTP_ADDR and -http-addr take)."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://{self.http_addr}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def client(self, **kwargs: Any) -> Any:
        """A ``consul.Consul`` talking to this agent."""
        import consul

        kwargs.setdefault("connections_timeout", 10)
        c = consul.Consul(host="127.0.0.1", port=self.http_port, **kwargs)
        c.token = kwargs.get("token")  # py-consul would otherwise take CONSUL_HTTP_TOKEN from the env
        return c

    # -- lifecycle -------------------------------------------------------------------------

    def pick_ports(self) -> None:
        names = ("http", "serf_lan", "serf_wan", "server")
        ports: dict[str, int] = {}
        while len(ports) < len(names):
            p = free_port()
            if p not in ports.values():
                ports[names[len(ports)]] = p
        self.ports = ports

    def _command(self) -> list[str]:
        p = self.ports
        return [
            self.binary,
            "agent",
            "-dev",
            f"-node={self.node}",
            "-bind=127.0.0.1",
            "-client=127.0.0.1",
            f"-http-port={p['http']}",
            f"-serf-lan-port={p['serf_lan']}",
            f"-serf-wan-port={p['serf_wan']}",
            f"-server-port={p['server']}",
            "-grpc-port=-1",
            "-dns-port=-1",
            "-log-level=info",
        ]

    def start(self) -> Self:
        """Start the agent (new free ports the first time, the same ones after) and wait until
        it has a leader and its node is in the catalog."""
        if self.running:
            return self
        first = not self.ports
        attempts = 3 if first else 1
        for attempt in range(attempts):
            if first:
                self.pick_ports()
            try:
                self._spawn()
                self._wait_ready(self.READY_TIMEOUT)
                self.starts += 1
                return self
            except ConsulAgentError:
                self.stop()
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n=== start {' '.join(self._command())}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _get(self, path: str, timeout: float = 2.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise ConsulAgentError(f"consul agent exited ({code}) while starting:\n{self.log_tail()}")
            try:
                leader = self._get("/v1/status/leader")
                nodes = self._get("/v1/catalog/nodes") if leader else []
                if leader and any(n.get("Node") == self.node for n in nodes):
                    return
                last = f"leader={leader!r} nodes={nodes!r}"
            except (OSError, ValueError) as exc:  # URLError is an OSError
                last = exc
            time.sleep(0.05)
        raise ConsulAgentError(f"consul agent not ready after {timeout:.0f}s ({last}):\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT; closes the log."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=self.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=self.STOP_TIMEOUT)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL at once (an agent crash), then close the log."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=self.STOP_TIMEOUT)
        self.stop()

    def restart(self) -> Self:
        """Stop and start again on the same ports. ``-dev`` state (services, checks, KV) is lost."""
        self.stop()
        return self.start()

    def wait_port_closed(self, timeout: float = 5.0) -> None:
        """Until the HTTP port refuses connections (after stop())."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.http_port), timeout=0.2):
                    pass
            except OSError:
                return
            time.sleep(0.05)
        raise ConsulAgentError(f"{self.http_addr} still accepts connections")

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def cli(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        """Run the consul CLI against this agent, e.g. ``cli("maint", "-enable", "-service=x")``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        return subprocess.run(
            [self.binary, *args[:1], f"-http-addr={self.http_addr}", *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ConsulAgent {self.node} {self.ports.get('http')} {state}>"


# -- pytest fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def consul_bin() -> str:
    try:
        return find_consul_binary()
    except ConsulAgentError as exc:
        pytest.fail(str(exc), pytrace=False)


def _agent(consul_bin: str, log_dir: Path) -> Iterator[ConsulAgent]:
    agent = ConsulAgent(consul_bin, log_dir=log_dir)
    try:
        agent.start()
    except ConsulAgentError as exc:
        agent.stop()
        pytest.fail(f"could not start a consul test agent: {exc}", pytrace=False)
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def consul_agent(consul_bin: str, tmp_path: Path) -> Iterator[ConsulAgent]:
    """A fresh ``consul agent -dev`` for one test."""
    yield from _agent(consul_bin, tmp_path)


@pytest.fixture(scope="module")
def consul_agent_module(consul_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulAgent]:
    """One ``consul agent -dev`` shared by the tests of a module (do not restart it there)."""
    yield from _agent(consul_bin, tmp_path_factory.mktemp("consul"))
