"""A real Worker (in a thread, and the CLI as a subprocess) against a scripted broker back end.

The back end (tests/helpers.py: ScriptedBackend) is a ROUTER on a free loopback port speaking
zrouter.protocol, run by a thread of its own: it records every message, heartbeats every worker
that sent READY (unless told to go silent), acknowledges DRAIN (unless told not to) and sends
what the test queues. Every wait is a bounded wait on what it recorded; no sleeps are used for
synchronisation.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.helpers import HB, WAIT, ScriptedBackend, eventually
from zrouter.worker import current_request
from zrouter.worker.examples import echo, fail, slow_echo, whoami
from zrouter.protocol import (
    DISCONNECT,
    DRAIN,
    FLAG_MSGPACK,
    HEARTBEAT,
    READY,
    REPLY,
    STATUS_BAD_REQUEST,
    STATUS_OK,
    STATUS_REMOTE_ERROR,
    STATUS_TIMEOUT,
    encode_disconnect,
    encode_drain,
    encode_request,
    check_ready,
)
from zrouter.transport import free_tcp_endpoint

ROOT = Path(__file__).resolve().parents[2]


def test_ready_announces_service_capacity_weight_meta(backend: ScriptedBackend, make_worker: Any) -> None:
    w = make_worker(echo, backend.endpoint, capacity=3, weight=2, meta={"zone": "eu-1"})
    ready = check_ready(backend.wait_cmd(READY).header)
    assert (ready.service, ready.capacity, ready.weight) == ("svc", 3, 2)
    assert ready.meta["instance"] == w.instance_id
    assert ready.meta["pid"] == str(os.getpid())
    assert ready.meta["host"]
    assert ready.meta["zone"] == "eu-1"


def test_echo_raw_and_msgpack(backend: ScriptedBackend, make_worker: Any) -> None:
    make_worker(echo, backend.endpoint, capacity=2)
    peer = backend.wait_cmd(READY).identity
    backend.request(peer, 1, b"\x00raw bytes\xff")
    backend.request(peer, 2, {"a": [1, 2, 3], "b": "text"})
    _, status, _, _, payload = backend.wait_reply(1).reply()
    assert (status, payload) == (STATUS_OK, b"\x00raw bytes\xff")
    r2 = backend.wait_reply(2)
    assert r2.header[3] & FLAG_MSGPACK
    assert r2.reply()[4] == {"a": [1, 2, 3], "b": "text"}


def test_handler_exception_is_a_remote_error_and_the_worker_goes_on(backend: ScriptedBackend, make_worker: Any) -> None:
    def handler(payload: Any) -> Any:
        return fail(payload) if payload == b"fail" else echo(payload)

    make_worker(handler, backend.endpoint)
    peer = backend.wait_cmd(READY).identity
    backend.request(peer, 1, b"fail")
    _, status, message, error_type, _ = backend.wait_reply(1).reply()
    assert (status, message, error_type) == (STATUS_REMOTE_ERROR, "boom", "ValueError")
    backend.request(peer, 2, b"ok")
    assert backend.wait_reply(2).reply()[1:5:3] == (STATUS_OK, b"ok")


def test_bad_msgpack_payload_is_a_bad_request(backend: ScriptedBackend, make_worker: Any) -> None:
    make_worker(echo, backend.endpoint)
    peer = backend.wait_cmd(READY).identity
    backend.send(peer, encode_request(7, "svc", 5000, 0, FLAG_MSGPACK), b"\xc1")  # 0xc1: never used
    assert backend.wait_reply(7).reply()[1] == STATUS_BAD_REQUEST


def test_bad_messages_from_the_broker_are_refused_and_unknown_commands_ignored(
    backend: ScriptedBackend, make_worker: Any
) -> None:
    w = make_worker(echo, backend.endpoint)
    peer = backend.wait_cmd(READY).identity
    backend.send(peer, msgpack.packb([0x01, 5, "svc", 0, 0, 0, None]), b"x")  # timeout_ms 0: refused
    _, status, message, _, _ = backend.wait_reply(5).reply()
    assert status == STATUS_BAD_REQUEST and "timeout_ms" in (message or "")
    backend.send(peer, msgpack.packb([0x7F, "from a later version"]))  # unknown command: ignored
    backend.send(peer, b"\xc1")  # not msgpack: dropped (no rid to answer)
    backend.request(peer, 6, b"still here")
    assert backend.wait_reply(6).reply()[1:5:3] == (STATUS_OK, b"still here")
    assert len(backend.messages(READY)) == 1 and len(backend.messages(REPLY)) == 2
    assert w._engine.bad_messages == 2  # the refused REQUEST and the header that is not msgpack


def test_heartbeats_keep_flowing_while_a_handler_runs_long(backend: ScriptedBackend, make_worker: Any) -> None:
    make_worker(slow_echo, backend.endpoint)
    peer = backend.wait_cmd(READY).identity
    start = backend.mark()
    backend.request(peer, 1, {"delay": 3.0})
    reply = backend.wait_reply(1, timeout=10.0)
    beats = [m for m in backend.log[start:] if m.cmd == HEARTBEAT and m.at < reply.at]
    assert len(beats) >= 15  # ~30 expected at 0.1 s over 3 s
    gaps = [b.at - a.at for a, b in itertools.pairwise(beats)]
    assert max(gaps) < 0.5
    assert len(backend.messages(READY)) == 1  # no reconnect meanwhile


def test_reconnects_when_the_broker_goes_silent_and_drops_stale_replies(
    backend: ScriptedBackend, make_worker: Any
) -> None:
    w = make_worker(slow_echo, backend.endpoint, liveness=3)
    first = backend.wait_cmd(READY)
    backend.request(first.identity, 1, {"delay": 0.6})
    backend.heartbeats_on = False
    second = backend.wait_for(lambda m: m.cmd == READY and m.identity != first.identity)
    assert second.at - first.at >= 3 * HB
    assert check_ready(second.header).meta["instance"] == w.instance_id
    backend.heartbeats_on = True
    backend.request(second.identity, 2, b"after")
    assert backend.wait_reply(2).reply()[4] == b"after"
    # Request 1 belonged to the first connection: its reply must have been dropped.
    assert not [m for m in backend.messages(REPLY) if m.header[1] == 1]


def test_reconnects_on_disconnect(backend: ScriptedBackend, make_worker: Any) -> None:
    make_worker(echo, backend.endpoint)
    first = backend.wait_cmd(READY)
    backend.send(first.identity, encode_disconnect("who are you?"))
    second = backend.wait_for(lambda m: m.cmd == READY and m.identity != first.identity)
    backend.request(second.identity, 1, b"x")
    assert backend.wait_reply(1).reply()[4] == b"x"


def test_broker_restart_on_the_same_endpoint(make_backend: Any, make_worker: Any) -> None:
    old = make_backend()
    w = make_worker(echo, old.endpoint, liveness=3)
    old.wait_cmd(READY)
    old.close()  # the broker process dies; a new one binds the same endpoint
    new = make_backend(old.endpoint)
    ready = new.wait_cmd(READY)
    assert check_ready(ready.header).meta["instance"] == w.instance_id
    new.request(ready.identity, 1, b"again")
    assert new.wait_reply(1).reply()[4] == b"again"


def test_no_broker_at_first_then_discovery_adds_one(backend: ScriptedBackend, make_worker: Any) -> None:
    w = make_worker(echo, [])
    assert w.brokers == []
    w.set_brokers([backend.endpoint])
    peer = backend.wait_cmd(READY).identity
    backend.request(peer, 1, b"found")
    assert backend.wait_reply(1).reply()[4] == b"found"


def test_stop_without_a_reachable_broker_is_quick(make_worker: Any) -> None:
    w = make_worker(echo, free_tcp_endpoint(), drain_timeout=30.0)
    t0 = time.monotonic()
    assert w.stop(timeout=WAIT)
    assert time.monotonic() - t0 < 2.0  # nothing received, nothing to drain: no 30 s wait


def test_stop_drains_everything_then_disconnects(backend: ScriptedBackend, make_worker: Any) -> None:
    backend.ack_drain = False
    w = make_worker(slow_echo, backend.endpoint, capacity=2)
    peer = backend.wait_cmd(READY).identity
    backend.request(peer, 9, {"n": 0})  # rid 0 is reserved (docs/protocol.md)
    backend.wait_reply(9)  # the worker has heard from the broker: there is something to drain
    backend.request(peer, 1, {"delay": 0.5, "n": 1})
    backend.request(peer, 2, {"delay": 0.5, "n": 2})
    done: list[bool] = []
    stopper = threading.Thread(target=lambda: done.append(w.stop(timeout=10.0)))
    stopper.start()
    drain = backend.wait_cmd(DRAIN)
    # Before the ack the broker may still send: over capacity, so the worker queues it.
    backend.request(peer, 3, {"delay": 0.1, "n": 3})
    backend.wait_reply(1)
    backend.send(peer, encode_drain())
    bye = backend.wait_cmd(DISCONNECT, timeout=10.0)
    replies = {m.header[1]: m for m in backend.messages(REPLY)}
    assert set(replies) == {9, 1, 2, 3}
    assert all(m.reply()[1] == STATUS_OK for m in replies.values())
    assert all(drain.at < bye.at and m.at < bye.at for m in replies.values())
    stopper.join(WAIT)
    assert done == [True]
    assert not w.running


def test_over_capacity_requests_are_queued_locally(backend: ScriptedBackend, make_worker: Any) -> None:
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

    make_worker(handler, backend.endpoint, capacity=1)
    peer = backend.wait_cmd(READY).identity
    for rid in range(1, 5):
        backend.request(peer, rid, rid)
    for rid in range(1, 5):
        assert backend.wait_reply(rid).reply()[4] == rid
    assert state["max"] == 1


def test_request_expiring_in_the_local_queue_times_out(backend: ScriptedBackend, make_worker: Any) -> None:
    make_worker(slow_echo, backend.endpoint, capacity=1)
    peer = backend.wait_cmd(READY).identity
    backend.request(peer, 1, {"delay": 0.4})
    backend.request(peer, 2, {"delay": 0.0}, timeout_ms=50)
    assert backend.wait_reply(1).reply()[1] == STATUS_OK
    assert backend.wait_reply(2).reply()[1] == STATUS_TIMEOUT


def test_async_handler_runs_several_at_once(backend: ScriptedBackend, make_worker: Any) -> None:
    state = {"now": 0, "max": 0}

    async def handler(payload: Any) -> Any:
        state["now"] += 1  # one event loop thread: no lock needed
        state["max"] = max(state["max"], state["now"])
        await asyncio.sleep(0.3)
        state["now"] -= 1
        info = current_request()
        assert info is not None
        return {"rid": info.rid, "payload": payload}

    w = make_worker(handler, backend.endpoint, capacity=4)
    assert w.is_async
    peer = backend.wait_cmd(READY).identity
    t0 = time.monotonic()
    for rid in range(1, 5):
        backend.request(peer, rid, rid * 10)
    for rid in range(1, 5):
        assert backend.wait_reply(rid).reply()[4] == {"rid": rid, "payload": rid * 10}
    assert time.monotonic() - t0 < 1.0  # four 0.3 s calls overlapped
    assert state["max"] == 4


def test_whoami_and_current_request(backend: ScriptedBackend, make_worker: Any) -> None:
    seen: list[Any] = []

    def handler(payload: Any) -> Any:
        seen.append(current_request())
        return whoami(payload)

    w = make_worker(handler, backend.endpoint)
    peer = backend.wait_cmd(READY).identity
    backend.request(peer, 42, "hi", attempt=2)
    assert backend.wait_reply(42).reply()[4] == {"worker": w.instance_id, "payload": "hi"}
    info = seen[0]
    assert (info.rid, info.service, info.attempt, info.instance_id) == (42, "svc", 2, w.instance_id)
    assert info.deadline > time.monotonic()
    assert current_request() is None


def test_two_brokers_share_the_capacity(make_backend: Any, make_worker: Any) -> None:
    b1, b2 = make_backend(), make_backend()
    w = make_worker(echo, [b1.endpoint, b2.endpoint], capacity=5)
    eventually(lambda: b1.announced() == 3 and b2.announced() == 2, WAIT)
    for b in (b1, b2):  # both serve
        peer = b.messages(READY)[-1].identity
        b.request(peer, 1, b"x")
        assert b.wait_reply(1).reply()[4] == b"x"

    # b2 goes silent: its share moves to b1; it comes back: shares split again.
    b2.heartbeats_on = False
    eventually(lambda: b1.announced() == 5, WAIT)
    b2.heartbeats_on = True
    eventually(lambda: b1.announced() == 3 and b2.announced() == 2, WAIT)

    # Discovery drops b2: it is drained (DRAIN, ack, DISCONNECT) and b1 gets everything.
    mark = b2.mark()
    w.set_brokers([b1.endpoint])
    b2.wait_cmd(DRAIN, start=mark)
    b2.wait_cmd(DISCONNECT, start=mark)
    eventually(lambda: b1.announced() == 5, WAIT)
    assert w.brokers == [b1.endpoint]


def test_capacity_below_the_number_of_brokers(make_backend: Any, make_worker: Any) -> None:
    b1, b2 = make_backend(), make_backend()
    make_worker(echo, [b1.endpoint, b2.endpoint], capacity=1)
    eventually(lambda: b1.announced() is not None and b2.announced() is not None, WAIT)
    eventually(lambda: (b1.announced(), b2.announced()) == (1, 0), WAIT)


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
def test_registration_hook(backend: ScriptedBackend, make_worker: Any, broken: bool) -> None:
    reg = FakeRegistration(broken)
    w = make_worker(echo, backend.endpoint, registration=reg)
    peer = backend.wait_cmd(READY).identity
    eventually(lambda: sum(1 for c in reg.calls if c[0] == "pass_ttl") >= 3, WAIT)
    backend.request(peer, 1, b"x")
    assert backend.wait_reply(1).reply()[4] == b"x"
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
def test_cli_drains_on_signal(backend: ScriptedBackend, sig: signal.Signals) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable, "-m", "zrouter.worker", "--service", "svc", "--broker", backend.endpoint,
        "--capacity", "2", "--weight", "1", "--heartbeat", str(HB), "--liveness", "5",
        "--delay", "0.5", "zrouter.worker.examples:echo",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = check_ready(backend.wait_cmd(READY, timeout=20.0).header)
        assert (ready.service, ready.capacity, ready.meta["pid"]) == ("svc", 2, str(proc.pid))
        peer = backend.messages(READY)[0].identity
        backend.request(peer, 1, b"one")
        backend.request(peer, 2, {"two": 2})
        backend.wait_for(lambda m: m.cmd == HEARTBEAT)  # the worker is past start-up
        proc.send_signal(sig)
        drain = backend.wait_cmd(DRAIN)
        bye = backend.wait_cmd(DISCONNECT, timeout=10.0)
        replies = {m.header[1]: m.reply() for m in backend.messages(REPLY)}
        assert replies[1][4] == b"one" and replies[2][4] == {"two": 2}
        assert all(m.at < bye.at for m in backend.messages(REPLY))
        assert drain.at < bye.at
        assert _wait_process(proc, 10.0) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _, err = proc.communicate()
    assert b"draining" in err


def test_cli_second_signal_stops_without_waiting(backend: ScriptedBackend) -> None:
    backend.ack_drain = False
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable, "-m", "zrouter.worker", "--service", "svc", "--broker", backend.endpoint,
        "--heartbeat", str(HB), "--liveness", "5", "--delay", "30", "zrouter.worker.examples:echo",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        peer = backend.wait_cmd(READY, timeout=20.0).identity
        backend.request(peer, 1, b"stuck")
        backend.wait_for(lambda m: m.cmd == HEARTBEAT)
        proc.send_signal(signal.SIGTERM)
        backend.wait_cmd(DRAIN)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        backend.wait_cmd(DISCONNECT)
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


def test_msgpack_payload_roundtrip_types(backend: ScriptedBackend, make_worker: Any) -> None:
    make_worker(lambda p: None if p == "none" else [p, p], backend.endpoint)
    peer = backend.wait_cmd(READY).identity
    backend.request(peer, 1, "none")
    backend.request(peer, 2, 7)
    assert backend.wait_reply(1).reply()[4] is None
    assert backend.wait_reply(2).reply()[4] == [7, 7]
    assert msgpack.unpackb(backend.wait_reply(2).payload) == [7, 7]
