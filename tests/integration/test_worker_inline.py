"""Inline mode (``Worker(...)``, ``--inline``): the I/O thread runs the handler.

Against the scripted broker back end (tests/helpers.py: a ROUTER in a thread that records
everything) and against the real broker process. Every wait is bounded; no sleeps as synchronisation (the
handlers' own sleeps stand for work).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from zrouter.client import Client, RemoteError
from tests.helpers import HB, WAIT, ScriptedBackend, drain_one_of_two_workers
from tests.procs import ProcessGroup, Proc
from zrouter.worker import Worker, current_request
from zrouter.worker.examples import echo, fail, slow_echo
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
    encode_drain,
    encode_request,
    check_ready,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def start(backend: ScriptedBackend, make_worker: Callable[..., Worker]) -> Callable[..., Worker]:
    """Start an inline Worker on the scripted back end (``start(handler, **options)``)."""
    return lambda handler, **kw: make_worker(handler, backend.endpoint, inline=True, **kw)


def loud_sleep(payload: Any) -> Any:
    """A handler for the CLI tests: says it started (on stderr), then works for 30 s."""
    print(f"handler started on {payload!r}", file=sys.stderr, flush=True)
    time.sleep(30)
    return payload


def _cli(procs: ProcessGroup, backend: ScriptedBackend, handler: str, *extra: str) -> Proc:
    args = ["-m", "zrouter.worker", "--service", "svc", "--broker", backend.endpoint, "--heartbeat", str(HB),
            "--liveness", "5", "--inline", *extra, handler]  # fmt: skip
    proc = Proc(args, "worker[inline]")
    procs.add(proc)
    return proc


# -- against the scripted back end ------------------------------------------------------------


def test_echo_raw_and_msgpack(backend: ScriptedBackend, start: Any) -> None:
    w = start(echo, capacity=2)
    assert w.inline
    peer = backend.wait_cmd(READY).identity
    backend.request(peer, 1, b"\x00raw bytes\xff")
    backend.request(peer, 2, {"a": [1, 2, 3], "b": "text"})
    assert backend.wait_reply(1).reply()[1:5:3] == (STATUS_OK, b"\x00raw bytes\xff")
    r2 = backend.wait_reply(2)
    assert r2.header[3] & FLAG_MSGPACK
    assert r2.reply()[4] == {"a": [1, 2, 3], "b": "text"}


def test_exception_is_a_remote_error_and_bad_payload_a_bad_request(backend: ScriptedBackend, start: Any) -> None:
    def handler(payload: Any) -> Any:
        if payload == b"exit":
            raise SystemExit(3)  # a BaseException must not take the I/O thread down either
        return fail(payload) if payload == b"fail" else echo(payload)

    start(handler)
    peer = backend.wait_cmd(READY).identity
    backend.request(peer, 1, b"fail")
    assert backend.wait_reply(1).reply()[1:4] == (STATUS_REMOTE_ERROR, "boom", "ValueError")
    backend.send(peer, encode_request(2, "svc", 5000, 0, FLAG_MSGPACK), b"\xc1")  # 0xc1: never valid
    assert backend.wait_reply(2).reply()[1] == STATUS_BAD_REQUEST
    backend.request(peer, 3, b"exit")
    assert backend.wait_reply(3).reply()[1:4:2] == (STATUS_REMOTE_ERROR, "SystemExit")
    backend.request(peer, 4, b"ok")
    assert backend.wait_reply(4).reply()[1:5:3] == (STATUS_OK, b"ok")


def test_one_at_a_time_in_arrival_order_on_the_io_thread(backend: ScriptedBackend, start: Any) -> None:
    seen: list[tuple[int, str]] = []
    running = [0, 0]  # now, max

    def handler(payload: Any) -> Any:
        running[0] += 1
        running[1] = max(running)
        info = current_request()
        assert info is not None
        seen.append((info.rid, threading.current_thread().name))
        time.sleep(0.02)  # work: lets the later requests pile up in the worker
        running[0] -= 1
        return payload

    w = start(handler, capacity=4)
    assert check_ready(backend.wait_cmd(READY).header).capacity == 4
    peer = backend.messages(READY)[0].identity
    for rid in range(1, 9):
        backend.request(peer, rid, rid)
    for rid in range(1, 9):
        assert backend.wait_reply(rid).reply()[4] == rid
    assert [rid for rid, _ in seen] == list(range(1, 9))
    assert [m.header[1] for m in backend.messages(REPLY)] == list(range(1, 9))
    assert running[1] == 1
    assert {name for _, name in seen} == {f"zrouter-worker-{w.service}"}  # Worker.start()'s thread


def test_current_request(backend: ScriptedBackend, start: Any) -> None:
    seen: list[Any] = []

    def handler(payload: Any) -> Any:
        seen.append(current_request())
        return payload

    w = start(handler)
    peer = backend.wait_cmd(READY).identity
    backend.request(peer, 42, "hi", attempt=2)
    assert backend.wait_reply(42).reply()[4] == "hi"
    info = seen[0]
    assert (info.rid, info.service, info.attempt, info.instance_id) == (42, "svc", 2, w.instance_id)
    assert info.deadline > time.monotonic()
    assert current_request() is None


def test_request_expiring_in_the_local_queue_times_out(backend: ScriptedBackend, start: Any) -> None:
    start(slow_echo, capacity=3)
    peer = backend.wait_cmd(READY).identity
    backend.request(peer, 1, {"delay": 0.3})
    backend.request(peer, 2, {"delay": 0.3})
    # Read at the latest between requests 1 and 2 (the sockets are read again within a long
    # batch), then it waits behind request 2 past its deadline.
    backend.request(peer, 3, {"n": 3}, timeout_ms=50)
    assert backend.wait_reply(1).reply()[1] == STATUS_OK
    assert backend.wait_reply(2).reply()[1] == STATUS_OK
    assert backend.wait_reply(3).reply()[1:3] == (STATUS_TIMEOUT, "deadline passed while queued in the worker")
    assert [m.header[1] for m in backend.messages(REPLY)] == [1, 2, 3]


def test_a_handler_past_liveness_does_not_drop_a_broker_that_kept_talking(
    backend: ScriptedBackend, start: Any
) -> None:
    start(slow_echo, liveness=3)  # silent for 0.3 s: dead
    peer = backend.wait_cmd(READY).identity
    backend.request(peer, 1, {"delay": 0.8})
    reply = backend.wait_reply(1)
    # The broker's heartbeats waited unread behind the handler: it is alive, no reconnect; and
    # the worker's own heartbeats resume after the batch.
    beat = backend.wait_for(lambda m: m.cmd == HEARTBEAT and m.at > reply.at)
    later = backend.wait_for(lambda m: m.cmd == HEARTBEAT and m.at > beat.at + 5 * HB)
    assert len(backend.messages(READY)) == 1
    assert all(m.identity == peer for m in backend.messages() if m.at <= later.at)


def test_stop_drains_everything_then_disconnects(backend: ScriptedBackend, start: Any) -> None:
    backend.ack_drain = False
    w = start(slow_echo, capacity=3)
    peer = backend.wait_cmd(READY).identity
    backend.request(peer, 9, {"n": 0})  # rid 0 is reserved (docs/protocol.md)
    backend.wait_reply(9)  # heard from the broker: there is something to drain
    backend.request(peer, 1, {"delay": 0.2, "n": 1})
    backend.request(peer, 2, {"delay": 0.2, "n": 2})
    done: list[bool] = []
    stopper = threading.Thread(target=lambda: done.append(w.stop(timeout=10.0)))
    stopper.start()
    drain = backend.wait_cmd(DRAIN)
    backend.request(peer, 3, {"delay": 0.05, "n": 3})  # before the ack the broker may still send
    backend.wait_reply(2)
    backend.send(peer, encode_drain())
    bye = backend.wait_cmd(DISCONNECT, timeout=10.0)
    replies = {m.header[1]: m for m in backend.messages(REPLY)}
    assert set(replies) == {9, 1, 2, 3}
    assert all(m.reply()[1] == STATUS_OK for m in replies.values())
    assert all(drain.at < bye.at and m.at < bye.at for m in replies.values())
    stopper.join(WAIT)
    assert done == [True]
    assert not w.running


def test_async_handler_cannot_run_inline() -> None:
    async def handler(payload: Any) -> Any:
        return payload

    with pytest.raises(ValueError, match="inline"):
        Worker("svc", handler, broker="tcp://127.0.0.1:1", inline=True)


def test_cli_drains_on_sigterm(procs: ProcessGroup, backend: ScriptedBackend) -> None:
    proc = _cli(procs, backend, "zrouter.worker.examples:echo", "--capacity", "3", "--delay", "0.2")
    peer = backend.wait_cmd(READY, timeout=20.0).identity
    backend.request(peer, 1, b"one")
    backend.request(peer, 2, {"two": 2})
    backend.request(peer, 3, "three")
    backend.wait_reply(1)  # so 2 and 3 went out before the DRAIN acknowledgement can
    proc.signal(signal.SIGTERM)  # lands while request 2 runs: 2 and 3 are held
    drain = backend.wait_cmd(DRAIN)
    bye = backend.wait_cmd(DISCONNECT, timeout=10.0)
    replies = {m.header[1]: m.reply() for m in backend.messages(REPLY)}
    assert (replies[1][4], replies[2][4], replies[3][4]) == (b"one", {"two": 2}, "three")
    assert drain.at < bye.at and all(m.at < bye.at for m in backend.messages(REPLY))
    assert proc.wait(10.0) == 0
    proc.wait_for("sync inline handler")
    proc.wait_for("SIGTERM: draining")


def test_cli_second_signal_interrupts_the_running_handler(procs: ProcessGroup, backend: ScriptedBackend) -> None:
    backend.ack_drain = False
    proc = _cli(procs, backend, "tests.integration.test_worker_inline:loud_sleep")
    peer = backend.wait_cmd(READY, timeout=20.0).identity
    backend.request(peer, 1, b"stuck")
    proc.wait_for(r"handler started on b'stuck'")
    proc.signal(signal.SIGTERM)
    proc.wait_for("SIGTERM: draining")  # a graceful stop waits for the handler...
    t0 = time.monotonic()
    proc.signal(signal.SIGTERM)  # ...a second signal does not
    assert proc.wait(10.0) == 0
    assert time.monotonic() - t0 < 5.0
    proc.wait_for("request 1 abandoned")
    backend.wait_cmd(DISCONNECT)
    assert not backend.messages(REPLY)


# -- against the real broker -----------------------------------------------------------------


def test_real_broker_end_to_end(procs: ProcessGroup) -> None:
    broker = procs.broker()
    procs.worker(broker, service="echo", handler="zrouter.worker.examples:echo", extra=["--inline"])
    procs.worker(broker, service="fail", handler="zrouter.worker.examples:fail", extra=["--inline"])
    broker.wait_workers(2)
    with Client(broker.frontend, timeout=5) as client:
        assert client.request("echo", b"\x00raw") == b"\x00raw"
        assert client.request("echo", {"k": [1, 2]}) == {"k": [1, 2]}
        with pytest.raises(RemoteError) as info:
            client.request("fail", "x")
        assert info.value.type == "ValueError" and "boom" in info.value.message
        pending = [client.submit("echo", i) for i in range(200)]
        assert [x.result() for x in pending] == list(range(200))


def test_real_broker_capacity_bounds_what_the_worker_holds(procs: ProcessGroup) -> None:
    broker = procs.broker()
    held: list[int] = []
    worker: Worker | None = None

    def handler(payload: Any) -> Any:
        assert worker is not None
        held.append(worker._engine.running + 1)  # queued in the worker + this one
        time.sleep(0.01)
        return payload

    worker = Worker("svc", handler, broker=broker.backend, capacity=3, heartbeat_interval=broker.heartbeat,
                    inline=True)  # fmt: skip
    worker.start()
    try:
        broker.wait_workers(1)
        with Client(broker.frontend, timeout=10) as client:
            pending = [client.submit("svc", i) for i in range(30)]
            assert [x.result() for x in pending] == list(range(30))
    finally:
        assert worker.stop(timeout=10.0)
    assert len(held) == 30
    assert 1 < max(held) <= 3  # several held at once (the rest of the credits), never more


def test_real_broker_sigterm_drain_loses_nothing(procs: ProcessGroup) -> None:
    broker, leaving, staying, answers = drain_one_of_two_workers(procs, delay=0.1, extra=["--inline"])
    assert [a["payload"] for a in answers] == list(range(4)) + [100 + i for i in range(8)]
    assert leaving.wait() == 0
    assert [a for a in answers[4:] if str(leaving.pid) in str(a["worker"])] == []
    broker.wait_for("said goodbye")  # logged just after the worker exits
    assert broker.count(r"said goodbye \(drained\)\); 0 requests requeued, 0 failed") == 1
    assert staying.popen is not None and staying.popen.poll() is None
