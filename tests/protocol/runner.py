"""Runs the protocol's conformance vectors (``vectors/*.json``) against a real broker.

The vectors are data, written for any language: docs/conformance.md describes the format so a
client or worker written elsewhere can replay the same conversations. This module is the Python
reading of that page: it starts nothing itself (the caller passes the broker's endpoints), opens
one DEALER per named peer, and walks the steps.

Frame notation (in ``send`` and ``expect``): ``{"sig": true}`` is the 4-byte signature;
``{"header": [...]}`` a msgpack array; ``{"msgpack": v}`` any msgpack value; ``{"text": "hi"}``
UTF-8 bytes; ``{"hex": "c1"}`` raw bytes. Inside a header, ``{"bin": "6563"}`` is a msgpack
``bin`` value (JSON has no bytes). Inside a header (or msgpack value), a string
``"$name"`` is a placeholder: on its first use in an ``expect`` it captures the value received;
anywhere after that it stands for the captured value. ``"$_"`` matches anything, ``"$int"`` any
integer, ``"$str"`` any string, ``"$str|nil"`` a string or nil. ``"$$x"`` is the literal ``"$x"``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from zrouter import protocol as p

__all__ = ["VECTORS", "Vector", "load", "run"]

VECTORS = Path(__file__).parent / "vectors"
DEFAULT_WITHIN_MS = 3000


@dataclass
class Vector:
    name: str
    doc: str
    broker_args: list[str]
    peers: dict[str, str]  # name -> "client" | "worker"
    steps: list[dict[str, Any]]
    path: Path = field(default_factory=Path)


def load(path: Path) -> Vector:
    data = json.loads(path.read_text())
    return Vector(data["name"], data["doc"], data.get("broker", {}).get("args", []), data["peers"], data["steps"],
                  path)


class Mismatch(AssertionError):
    pass


class _Run:
    def __init__(self, vector: Vector, ctx: zmq.Context[Any], frontend: str, backend: str,
                 stop_broker: Callable[[], None] | None) -> None:
        self.vector = vector
        self.stop_broker = stop_broker
        self.bound: dict[str, Any] = {}
        self.socks: dict[str, zmq.Socket[Any]] = {}
        self.ctx = ctx
        self.endpoints = {"client": frontend, "worker": backend}
        for name in vector.peers:
            self._open(name)

    def _open(self, name: str) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.endpoints[self.vector.peers[name]])
        self.socks[name] = sock

    def close(self) -> None:
        for s in self.socks.values():
            s.close()

    # -- values ---------------------------------------------------------------------------

    def _fill(self, value: Any) -> Any:
        """A value to send: placeholders replaced by what they captured."""
        if isinstance(value, str) and value.startswith("$"):
            if value.startswith("$$"):
                return value[1:]
            if value not in self.bound:
                raise Mismatch(f"{value} is used before anything was captured into it")
            return self.bound[value]
        if isinstance(value, list):
            return [self._fill(v) for v in value]
        if isinstance(value, dict) and list(value) == ["bin"]:
            return bytes.fromhex(value["bin"])
        if isinstance(value, dict):
            return {k: self._fill(v) for k, v in value.items()}
        return value

    def _match(self, want: Any, got: Any, where: str) -> None:
        if isinstance(want, str) and want.startswith("$") and not want.startswith("$$"):
            if want == "$_":
                return
            if want == "$int":
                if type(got) is not int:
                    raise Mismatch(f"{where}: expected an integer, got {got!r:.80}")
                return
            if want in ("$str", "$str|nil"):
                if not (type(got) is str or (got is None and want == "$str|nil")):
                    raise Mismatch(f"{where}: expected a string, got {got!r:.80}")
                return
            if want in self.bound:
                if self.bound[want] != got:
                    raise Mismatch(f"{where}: expected {want}={self.bound[want]!r:.80}, got {got!r:.80}")
            else:
                self.bound[want] = got
            return
        if isinstance(want, str) and want.startswith("$$"):
            want = want[1:]
        if isinstance(want, list):
            if type(got) is not list or len(got) < len(want):
                raise Mismatch(f"{where}: expected an array like {want!r:.80}, got {got!r:.80}")
            for i, w in enumerate(want):
                self._match(w, got[i], f"{where}[{i}]")
            return
        if isinstance(want, dict) and list(want) == ["bin"]:
            want = bytes.fromhex(want["bin"])
        elif isinstance(want, dict) and not isinstance(got, dict):
            raise Mismatch(f"{where}: expected a map, got {got!r:.80}")
        if isinstance(want, dict):
            for k, w in want.items():
                if k not in got:
                    raise Mismatch(f"{where}: key {k!r} missing")
                self._match(w, got[k], f"{where}.{k}")
            return
        if want != got or type(want) is not type(got):
            raise Mismatch(f"{where}: expected {want!r:.80}, got {got!r:.80}")

    # -- frames ---------------------------------------------------------------------------

    def _encode(self, spec: dict[str, Any]) -> bytes:
        if spec.get("sig"):
            return p.SIGNATURE
        if "header" in spec:
            return msgpack.packb(self._fill(spec["header"]), use_bin_type=True)
        if "msgpack" in spec:
            return msgpack.packb(self._fill(spec["msgpack"]), use_bin_type=True)
        if "text" in spec:
            return str(spec["text"]).encode()
        if "hex" in spec:
            return bytes.fromhex(spec["hex"])
        raise Mismatch(f"unknown frame spec {spec!r}")

    def _check(self, spec: dict[str, Any], got: bytes, where: str) -> None:
        if "header" in spec or "msgpack" in spec:
            try:
                value = msgpack.unpackb(got, raw=False)
            except Exception as exc:
                raise Mismatch(f"{where}: not msgpack ({exc})") from None
            self._match(spec.get("header", spec.get("msgpack")), value, where)
        elif self._encode(spec) != got:
            raise Mismatch(f"{where}: expected {self._encode(spec)!r:.80}, got {got!r:.80}")

    def _recv(self, name: str, deadline: float, skip_heartbeats: bool) -> list[bytes] | None:
        sock = self.socks[name]
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(max(1, int(left * 1000))):
                return None
            frames = sock.recv_multipart()
            if skip_heartbeats and frames[1:] == [p.encode_heartbeat()] and frames[0] == p.SIGNATURE:
                continue
            return frames

    def _check_message(self, want: list[dict[str, Any]], frames: list[bytes], where: str) -> None:
        if len(frames) != len(want):
            raise Mismatch(f"{where}: expected {len(want)} frames, got {len(frames)}: {frames!r:.200}")
        for j, (spec, got) in enumerate(zip(want, frames, strict=True)):
            self._check(spec, got, f"{where} frame {j}")

    # -- steps ----------------------------------------------------------------------------

    def step(self, i: int, st: dict[str, Any]) -> None:
        where = f"{self.vector.path.name} step {i}"
        if "send" in st:
            self.socks[st["send"]].send_multipart([self._encode(f) for f in st["frames"]])
        elif "expect" in st:
            name = st["expect"]
            skip = st.get("skip_heartbeats", self.vector.peers[name] == "worker")
            frames = self._recv(name, time.monotonic() + st.get("within_ms", DEFAULT_WITHIN_MS) / 1000, skip)
            if frames is None:
                raise Mismatch(f"{where}: {name} received nothing within {st.get('within_ms', DEFAULT_WITHIN_MS)} ms")
            self._check_message(st["frames"], frames, where)
        elif "expect_any_order" in st:
            name = st["expect_any_order"]
            skip = st.get("skip_heartbeats", self.vector.peers[name] == "worker")
            deadline = time.monotonic() + st.get("within_ms", DEFAULT_WITHIN_MS) / 1000
            left = list(st["messages"])
            while left:
                frames = self._recv(name, deadline, skip)
                if frames is None:
                    raise Mismatch(f"{where}: {name} still waits for {len(left)} message(s)")
                for k, want in enumerate(left):
                    saved = dict(self.bound)
                    try:
                        self._check_message(want, frames, where)
                    except Mismatch:
                        self.bound = saved
                        continue
                    del left[k]
                    break
                else:
                    raise Mismatch(f"{where}: {name} got an unexpected message {frames!r:.200}")
        elif "stop_broker" in st:
            if self.stop_broker is None:
                raise Mismatch(f"{where}: this runner cannot stop the broker")
            self.stop_broker()
        elif "expect_nothing" in st:
            name = st["expect_nothing"]
            frames = self._recv(name, time.monotonic() + st["for_ms"] / 1000, self.vector.peers[name] == "worker")
            if frames is not None:
                raise Mismatch(f"{where}: {name} expected nothing for {st['for_ms']} ms, got {frames!r:.200}")
        elif "reconnect" in st:
            self.socks.pop(st["reconnect"]).close()
            self._open(st["reconnect"])
        else:
            raise Mismatch(f"{where}: unknown step {st!r}")


def run(vector: Vector, ctx: zmq.Context[Any], frontend: str, backend: str,
        stop_broker: Callable[[], None] | None = None) -> None:
    """Play ``vector`` against the broker at ``frontend``/``backend``; raises AssertionError
    (naming the step and frame) at the first difference. ``stop_broker`` asks the broker to
    shut down gracefully (SIGTERM), for vectors that need it."""
    r = _Run(vector, ctx, frontend, backend, stop_broker)
    try:
        for i, st in enumerate(vector.steps):
            r.step(i, st)
    finally:
        r.close()
