"""A real Worker (in a thread, and the CLI as a subprocess) against a scripted broker.

The scripted broker is a ROUTER on a free loopback port speaking zrouter.protocol, run by a
thread of its own: it records every message, heartbeats every worker that sent READY (unless
told to go silent), acknowledges DRAIN (unless told not to) and sends what the test queues.
Every wait is a bounded wait on what it recorded; no sleeps are used for synchronisation.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from zrouter.worker import Worker, current_request
from zrouter.worker.examples import echo, fail, slow_echo, whoami
from zrouter.protocol import (
    DISCONNECT,
    DRAIN,
    FLAG_MSGPACK,
    HEARTBEAT,
    READY,
    REPLY,
    SIGNATURE,
    STATUS_BAD_REQUEST,
    STATUS_OK,
    STATUS_REMOTE_ERROR,
    STATUS_TIMEOUT,
    UPDATE,
    decode_header,
    decode_payload,
    encode_disconnect,
    encode_drain,
    encode_heartbeat,
    encode_payload,
    encode_request,
    check_ready,
    check_reply,
)
from zrouter.transport import free_tcp_endpoint, recv_frames, send_frames

ROOT = Path(__file__).resolve().parents[2]
HB = 0.1  # heartbeat interval used by the workers and the scripted broker
WAIT = 5.0  # upper bound of any single wait


@dataclass
class Msg:
    identity: bytes
    cmd: int
    header: list[Any]
    payload: bytes | None
    at: float

    def reply(self) -> tuple[int, int, str | None, str | None, Any]:
        """(rid, status, message, error_type, decoded payload) of a REPLY."""
        r = check_reply(self.header)
        return r.rid, r.status, r.message, r.error_type, decode_payload(r.flags, self.payload or b"")


class ScriptedBroker:
    def __init__(self, ctx: zmq.Context[Any], heartbeat: float = HB, endpoint: str | None = None) -> None:
        self.endpoint = endpoint or free_tcp_endpoint()
        self.heartbeat = heartbeat
        self.heartbeats_on = True
        self.ack_drain = True
        self.log: list[Msg] = []
        self._cond = threading.Condition()
        self._outbox: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
        self._peers: set[bytes] = set()
        self._sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        deadline = time.monotonic() + WAIT
        while True:  # a just-closed broker's listener is released asynchronously: retry a while
            try:
                self._sock.bind(self.endpoint)
                break
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    self._sock.close(0)
                    raise
                time.sleep(0.02)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scripted-broker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        next_hb = time.monotonic()
        try:
            while not self._stop.is_set():
                if poller.poll(5):
                    while True:
                        try:
                            frames = recv_frames(sock, zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._record([f.bytes for f in frames])
                while True:
                    try:
                        send_frames(sock, self._outbox.get_nowait())
                    except queue.Empty:
                        break
                now = time.monotonic()
                if now >= next_hb:
                    next_hb = now + self.heartbeat
                    if self.heartbeats_on:
                        for peer in list(self._peers):
                            send_frames(sock, [peer, SIGNATURE, encode_heartbeat()])
        finally:
            sock.close(0)

    def _record(self, frames: list[bytes]) -> None:
        identity, sig, header_frame = frames[0], frames[1], frames[2]
        assert sig == SIGNATURE
        header = decode_header(header_frame)
        msg = Msg(identity, header[0], header, frames[3] if len(frames) > 3 else None, time.monotonic())
        if msg.cmd == READY:
            self._peers.add(identity)
        elif msg.cmd == DISCONNECT:
            self._peers.discard(identity)
        elif msg.cmd == DRAIN and self.ack_drain:
            send_frames(self._sock, [identity, SIGNATURE, encode_drain()])
        with self._cond:
            self.log.append(msg)
            self._cond.notify_all()

    # -- used by the tests -------------------------------------------------------------------

    def send(self, identity: bytes, header: bytes, payload: Any = None) -> None:
        frames = [identity, SIGNATURE, header] + ([] if payload is None else [payload])
        self._outbox.put(frames)

    def request(self, identity: bytes, rid: int, payload: Any, timeout_ms: int = 10_000, attempt: int = 0) -> None:
        flags, frame = encode_payload(payload)
        self.send(identity, encode_request(rid, "svc", timeout_ms, attempt, flags | 1), frame)

    def wait_for(self, pred: Callable[[Msg], bool], timeout: float = WAIT, start: int = 0) -> Msg:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.log[start:]:
                    if pred(msg):
                        return msg
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out; got {[(m.cmd, m.header) for m in self.log[-10:]]}")
                self._cond.wait(remaining)

    def wait_cmd(self, cmd: int, timeout: float = WAIT, start: int = 0, identity: bytes | None = None) -> Msg:
        return self.wait_for(lambda m: m.cmd == cmd and (identity is None or m.identity == identity), timeout, start)

    def wait_reply(self, rid: int, timeout: float = WAIT) -> Msg:
        return self.wait_for(lambda m: m.cmd == REPLY and m.header[1] == rid, timeout)

    def messages(self, cmd: int | None = None) -> list[Msg]:
        with self._cond:
            return [m for m in self.log if cmd is None or m.cmd == cmd]

    def mark(self) -> int:
        with self._cond:
            return len(self.log)

    def announced(self) -> int | None:
        """The capacity this broker was last told (READY, then UPDATEs) by its latest peer."""
        with self._cond:
            value = None
            for m in self.log:
                if m.cmd == READY:
                    value = check_ready(m.header).capacity
                elif m.cmd == UPDATE:
                    value = m.header[1]
                elif m.cmd == DISCONNECT:
                    value = None
            return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)


def wait_until(cond: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def make_broker(ctx: zmq.Context[Any]) -> Iterator[Callable[..., ScriptedBroker]]:
    brokers: list[ScriptedBroker] = []

    def make(endpoint: str | None = None) -> ScriptedBroker:
        brokers.append(ScriptedBroker(ctx, endpoint=endpoint))
        return brokers[-1]

    yield make
    for b in brokers:
        b.close()


@pytest.fixture
def broker(make_broker: Callable[[], ScriptedBroker]) -> ScriptedBroker:
    return make_broker()


@pytest.fixture
def make_worker(make_broker: Callable[[], ScriptedBroker]) -> Iterator[Callable[..., Worker]]:
    """Started workers; stopped (drained) before the brokers close."""
    workers: list[Worker] = []

    def make(handler: Callable[[Any], Any], broker: Any, **kw: Any) -> Worker:
        kw.setdefault("heartbeat_interval", HB)
        kw.setdefault("liveness", 5)
        kw.setdefault("drain_timeout", 3.0)
        w = Worker("svc", handler, broker=broker, **kw)
        w.start()
        workers.append(w)
        return w

    yield make
    for w in workers:
        assert w.stop(timeout=10.0)


def test_ready_announces_service_capacity_weight_meta(broker: ScriptedBroker, make_worker: Any) -> None:
    w = make_worker(echo, broker.endpoint, capacity=3, weight=2, meta={"zone": "eu-1"})
    ready = check_ready(broker.wait_cmd(READY).header)
    assert (ready.service, ready.capacity, ready.weight) == ("svc", 3, 2)
    assert ready.meta["instance"] == w.instance_id
    assert ready.meta["pid"] == str(os.getpid())
    assert ready.meta["host"]
    assert ready.meta["zone"] == "eu-1"


def test_echo_raw_and_msgpack(broker: ScriptedBroker, make_worker: Any) -> None:
    make_worker(echo, broker.endpoint, capacity=2)
    peer = broker.wait_cmd(READY).identity
    broker.request(peer, 1, b"\x00raw bytes\xff")
    broker.request(peer, 2, {"a": [1, 2, 3], "b": "text"})
    _, status, _, _, payload = broker.wait_reply(1).reply()
    assert (status, payload) == (STATUS_OK, b"\x00raw bytes\xff")
    r2 = broker.wait_reply(2)
    assert r2.header[3] & FLAG_MSGPACK
    assert r2.reply()[4] == {"a": [1, 2, 3], "b": "text"}


def test_handler_exception_is_a_remote_error_and_the_worker_goes_on(broker: ScriptedBroker, make_worker: Any) -> None:
    def handler(payload: Any) -> Any:
        return fail(payload) if payload == b"fail" else echo(payload)

    make_worker(handler, broker.endpoint)
    peer = broker.wait_cmd(READY).identity
    broker.request(peer, 1, b"fail")
    _, status, message, error_type, _ = broker.wait_reply(1).reply()
    assert (status, message, error_type) == (STATUS_REMOTE_ERROR, "boom", "ValueError")
    broker.request(peer, 2, b"ok")
    assert broker.wait_reply(2).reply()[1:5:3] == (STATUS_OK, b"ok")


def test_bad_msgpack_payload_is_a_bad_request(broker: ScriptedBroker, make_worker: Any) -> None:
    make_worker(echo, broker.endpoint)
    peer = broker.wait_cmd(READY).identity
    broker.send(peer, encode_request(7, "svc", 5000, 0, FLAG_MSGPACK), b"\xc1")  # 0xc1: never used
    assert broker.wait_reply(7).reply()[1] == STATUS_BAD_REQUEST


def test_heartbeats_keep_flowing_while_a_handler_runs_long(broker: ScriptedBroker, make_worker: Any) -> None:
    make_worker(slow_echo, broker.endpoint)
    peer = broker.wait_cmd(READY).identity
    start = broker.mark()
    broker.request(peer, 1, {"delay": 3.0})
    reply = broker.wait_reply(1, timeout=10.0)
    beats = [m for m in broker.log[start:] if m.cmd == HEARTBEAT and m.at < reply.at]
    assert len(beats) >= 15  # ~30 expected at 0.1 s over 3 s
    gaps = [b.at - a.at for a, b in itertools.pairwise(beats)]
    assert max(gaps) < 0.5
    assert len(broker.messages(READY)) == 1  # no reconnect meanwhile


def test_reconnects_when_the_broker_goes_silent_and_drops_stale_replies(
    broker: ScriptedBroker, make_worker: Any
) -> None:
    w = make_worker(slow_echo, broker.endpoint, liveness=3)
    first = broker.wait_cmd(READY)
    broker.request(first.identity, 1, {"delay": 0.6})
    broker.heartbeats_on = False
    second = broker.wait_for(lambda m: m.cmd == READY and m.identity != first.identity)
    assert second.at - first.at >= 3 * HB
    assert check_ready(second.header).meta["instance"] == w.instance_id
    broker.heartbeats_on = True
    broker.request(second.identity, 2, b"after")
    assert broker.wait_reply(2).reply()[4] == b"after"
    # Request 1 belonged to the first connection: its reply must have been dropped.
    assert not [m for m in broker.messages(REPLY) if m.header[1] == 1]


def test_reconnects_on_disconnect(broker: ScriptedBroker, make_worker: Any) -> None:
    make_worker(echo, broker.endpoint)
    first = broker.wait_cmd(READY)
    broker.send(first.identity, encode_disconnect("who are you?"))
    second = broker.wait_for(lambda m: m.cmd == READY and m.identity != first.identity)
    broker.request(second.identity, 1, b"x")
    assert broker.wait_reply(1).reply()[4] == b"x"


def test_broker_restart_on_the_same_endpoint(make_broker: Any, make_worker: Any) -> None:
    old = make_broker()
    w = make_worker(echo, old.endpoint, liveness=3)
    old.wait_cmd(READY)
    old.close()  # the broker process dies; a new one binds the same endpoint
    new = make_broker(old.endpoint)
    ready = new.wait_cmd(READY)
    assert check_ready(ready.header).meta["instance"] == w.instance_id
    new.request(ready.identity, 1, b"again")
    assert new.wait_reply(1).reply()[4] == b"again"


def test_no_broker_at_first_then_discovery_adds_one(broker: ScriptedBroker, make_worker: Any) -> None:
    w = make_worker(echo, [])
    assert w.brokers == []
    w.set_brokers([broker.endpoint])
    peer = broker.wait_cmd(READY).identity
    broker.request(peer, 1, b"found")
    assert broker.wait_reply(1).reply()[4] == b"found"


def test_stop_without_a_reachable_broker_is_quick(make_worker: Any) -> None:
    w = make_worker(echo, free_tcp_endpoint(), drain_timeout=30.0)
    t0 = time.monotonic()
    assert w.stop(timeout=WAIT)
    assert time.monotonic() - t0 < 2.0  # nothing received, nothing to drain: no 30 s wait


def test_stop_drains_everything_then_disconnects(broker: ScriptedBroker, make_worker: Any) -> None:
    broker.ack_drain = False
    w = make_worker(slow_echo, broker.endpoint, capacity=2)
    peer = broker.wait_cmd(READY).identity
    broker.request(peer, 0, {"n": 0})
    broker.wait_reply(0)  # the worker has heard from the broker: there is something to drain
    broker.request(peer, 1, {"delay": 0.5, "n": 1})
    broker.request(peer, 2, {"delay": 0.5, "n": 2})
    done: list[bool] = []
    stopper = threading.Thread(target=lambda: done.append(w.stop(timeout=10.0)))
    stopper.start()
    drain = broker.wait_cmd(DRAIN)
    # Before the ack the broker may still send: over capacity, so the worker queues it.
    broker.request(peer, 3, {"delay": 0.1, "n": 3})
    broker.wait_reply(1)
    broker.send(peer, encode_drain())
    bye = broker.wait_cmd(DISCONNECT, timeout=10.0)
    replies = {m.header[1]: m for m in broker.messages(REPLY)}
    assert set(replies) == {0, 1, 2, 3}
    assert all(m.reply()[1] == STATUS_OK for m in replies.values())
    assert all(drain.at < bye.at and m.at < bye.at for m in replies.values())
    stopper.join(WAIT)
    assert done == [True]
    assert not w.running


def test_over_capacity_requests_are_queued_locally(broker: ScriptedBroker, make_worker: Any) -> None:
    lock = threading.Lock()
    state = {"now": 0, "max": 0}

    def handler(payload: Any) -> Any:
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return payload

    make_worker(handler, broker.endpoint, capacity=1)
    peer = broker.wait_cmd(READY).identity
    for rid in range(1, 5):
        broker.request(peer, rid, rid)
    for rid in range(1, 5):
        assert broker.wait_reply(rid).reply()[4] == rid
    assert state["max"] == 1


def test_request_expiring_in_the_local_queue_times_out(broker: ScriptedBroker, make_worker: Any) -> None:
    make_worker(slow_echo, broker.endpoint, capacity=1)
    peer = broker.wait_cmd(READY).identity
    broker.request(peer, 1, {"delay": 0.4})
    broker.request(peer, 2, {"delay": 0.0}, timeout_ms=50)
    assert broker.wait_reply(1).reply()[1] == STATUS_OK
    assert broker.wait_reply(2).reply()[1] == STATUS_TIMEOUT


def test_async_handler_runs_several_at_once(broker: ScriptedBroker, make_worker: Any) -> None:
    state = {"now": 0, "max": 0}

    async def handler(payload: Any) -> Any:
        state["now"] += 1  # one event loop thread: no lock needed
        state["max"] = max(state["max"], state["now"])
        await asyncio.sleep(0.3)
        state["now"] -= 1
        info = current_request()
        assert info is not None
        return {"rid": info.rid, "payload": payload}

    w = make_worker(handler, broker.endpoint, capacity=4)
    assert w.is_async
    peer = broker.wait_cmd(READY).identity
    t0 = time.monotonic()
    for rid in range(1, 5):
        broker.request(peer, rid, rid * 10)
    for rid in range(1, 5):
        assert broker.wait_reply(rid).reply()[4] == {"rid": rid, "payload": rid * 10}
    assert time.monotonic() - t0 < 1.0  # four 0.3 s calls overlapped
    assert state["max"] == 4


def test_whoami_and_current_request(broker: ScriptedBroker, make_worker: Any) -> None:
    seen: list[Any] = []

    def handler(payload: Any) -> Any:
        seen.append(current_request())
        return whoami(payload)

    w = make_worker(handler, broker.endpoint)
    peer = broker.wait_cmd(READY).identity
    broker.request(peer, 42, "hi", attempt=2)
    assert broker.wait_reply(42).reply()[4] == {"worker": w.instance_id, "payload": "hi"}
    info = seen[0]
    assert (info.rid, info.service, info.attempt, info.instance_id) == (42, "svc", 2, w.instance_id)
    assert info.deadline > time.monotonic()
    assert current_request() is None


def test_two_brokers_share_the_capacity(make_broker: Any, make_worker: Any) -> None:
    b1, b2 = make_broker(), make_broker()
    w = make_worker(echo, [b1.endpoint, b2.endpoint], capacity=5)
    wait_until(lambda: b1.announced() == 3 and b2.announced() == 2)
    for b in (b1, b2):  # both serve
        peer = b.messages(READY)[-1].identity
        b.request(peer, 1, b"x")
        assert b.wait_reply(1).reply()[4] == b"x"

    # b2 goes silent: its share moves to b1; it comes back: shares split again.
    b2.heartbeats_on = False
    wait_until(lambda: b1.announced() == 5)
    b2.heartbeats_on = True
    wait_until(lambda: b1.announced() == 3 and b2.announced() == 2)

    # Discovery drops b2: it is drained (DRAIN, ack, DISCONNECT) and b1 gets everything.
    mark = b2.mark()
    w.set_brokers([b1.endpoint])
    b2.wait_cmd(DRAIN, start=mark)
    b2.wait_cmd(DISCONNECT, start=mark)
    wait_until(lambda: b1.announced() == 5)
    assert w.brokers == [b1.endpoint]


def test_capacity_below_the_number_of_brokers(make_broker: Any, make_worker: Any) -> None:
    b1, b2 = make_broker(), make_broker()
    make_worker(echo, [b1.endpoint, b2.endpoint], capacity=1)
    wait_until(lambda: b1.announced() is not None and b2.announced() is not None)
    wait_until(lambda: (b1.announced(), b2.announced()) == (1, 0))


class FakeRegistration:
    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.calls: list[tuple[str, str]] = []

    def _record(self, name: str) -> None:
        self.calls.append((name, threading.current_thread().name))
        if self.broken:
            raise RuntimeError(f"{name} failed")

    def register(self) -> None:
        self._record("register")

    def pass_ttl(self, note: str = "") -> None:
        self._record("pass_ttl")

    def deregister(self) -> None:
        self._record("deregister")


@pytest.mark.parametrize("broken", [False, True])
def test_registration_hook(broker: ScriptedBroker, make_worker: Any, broken: bool) -> None:
    reg = FakeRegistration(broken)
    w = make_worker(echo, broker.endpoint, registration=reg)
    peer = broker.wait_cmd(READY).identity
    wait_until(lambda: sum(1 for c in reg.calls if c[0] == "pass_ttl") >= 3)
    broker.request(peer, 1, b"x")
    assert broker.wait_reply(1).reply()[4] == b"x"
    assert w.stop(timeout=WAIT)
    names = [c[0] for c in reg.calls]
    assert names[0] == "register" and names[-1] == "deregister"
    assert names.count("register") == names.count("deregister") == 1
    assert not any("handler" in thread for _, thread in reg.calls)


def _wait_process(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_drains_on_signal(broker: ScriptedBroker, sig: signal.Signals) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable, "-m", "zrouter.worker", "--service", "svc", "--broker", broker.endpoint,
        "--capacity", "2", "--weight", "1", "--heartbeat", str(HB), "--liveness", "5",
        "--delay", "0.5", "zrouter.worker.examples:echo",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = check_ready(broker.wait_cmd(READY, timeout=20.0).header)
        assert (ready.service, ready.capacity, ready.meta["pid"]) == ("svc", 2, str(proc.pid))
        peer = broker.messages(READY)[0].identity
        broker.request(peer, 1, b"one")
        broker.request(peer, 2, {"two": 2})
        broker.wait_for(lambda m: m.cmd == HEARTBEAT)  # the worker is past start-up
        proc.send_signal(sig)
        drain = broker.wait_cmd(DRAIN)
        bye = broker.wait_cmd(DISCONNECT, timeout=10.0)
        replies = {m.header[1]: m.reply() for m in broker.messages(REPLY)}
        assert replies[1][4] == b"one" and replies[2][4] == {"two": 2}
        assert all(m.at < bye.at for m in broker.messages(REPLY))
        assert drain.at < bye.at
        assert _wait_process(proc, 10.0) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _, err = proc.communicate()
    assert b"draining" in err


def test_cli_second_signal_stops_without_waiting(broker: ScriptedBroker) -> None:
    broker.ack_drain = False
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable, "-m", "zrouter.worker", "--service", "svc", "--broker", broker.endpoint,
        "--heartbeat", str(HB), "--liveness", "5", "--delay", "30", "zrouter.worker.examples:echo",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        peer = broker.wait_cmd(READY, timeout=20.0).identity
        broker.request(peer, 1, b"stuck")
        broker.wait_for(lambda m: m.cmd == HEARTBEAT)
        proc.send_signal(signal.SIGTERM)
        broker.wait_cmd(DRAIN)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        broker.wait_cmd(DISCONNECT)
        assert _wait_process(proc, 10.0) == 0
        assert time.monotonic() - t0 < 5.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.communicate()


def test_cli_rejects_a_bad_handler() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "zrouter.worker", "--service", "svc", "no_such_module:nothing"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert b"cannot load handler" in proc.stderr


def test_msgpack_payload_roundtrip_types(broker: ScriptedBroker, make_worker: Any) -> None:
    make_worker(lambda p: None if p == "none" else [p, p], broker.endpoint)
    peer = broker.wait_cmd(READY).identity
    broker.request(peer, 1, "none")
    broker.request(peer, 2, 7)
    assert broker.wait_reply(1).reply()[4] is None
    assert broker.wait_reply(2).reply()[4] == [7, 7]
    assert msgpack.unpackb(broker.wait_reply(2).payload) == [7, 7]
