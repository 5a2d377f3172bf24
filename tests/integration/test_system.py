"""The router end to end: a real broker process, real worker processes, real sockets."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
from typing import Any

import msgpack
import pytest
import zmq

from zrouter.client import AsyncClient, Client, RemoteError, RequestTimeout, ServiceUnavailable, WorkerLost
from tests.helpers import drain_one_of_two_workers, sigkill_a_busy_worker
from tests.procs import BrokerProc, ProcessGroup
from zrouter import protocol as p
from zrouter.broker.server import LOG_PEER_BURST
from zrouter.errors import MessageTooLarge, ProtocolError
from zrouter.transport import recv_frames

pytestmark = pytest.mark.timeout(90)


def _recv(sock: zmq.Socket[Any], timeout: float = 5.0) -> list[bytes]:
    assert sock.poll(int(timeout * 1000)), "no message within the timeout"
    return [f.bytes for f in recv_frames(sock)]


def _bare_worker(ctx: zmq.Context[Any], broker: BrokerProc, capacity: int, instance: str) -> zmq.Socket[Any]:
    """A scripted worker for service "svc": a bare DEALER that has sent READY and been taken in."""
    w = ctx.socket(zmq.DEALER)
    w.linger = 0
    w.connect(broker.backend)
    w.send_multipart([p.SIGNATURE, p.encode_ready("svc", capacity, 1, {"instance": instance})])
    broker.wait_workers(1)
    return w


def _served_by(answers: list[dict[str, Any]]) -> collections.Counter[str]:
    return collections.Counter(str(a["worker"]) for a in answers)


def test_requests_are_balanced_across_three_workers(procs: ProcessGroup) -> None:
    # Each request takes 10 ms of sleep, so a worker's share follows its free slots (what
    # least-outstanding balances on), not which of 3 worker processes the 2 cores happen to
    # schedule: with zero service time one descheduled worker kept its slots full and got 49 of 300.
    broker = procs.broker()
    for _ in range(3):
        procs.worker(broker, capacity=4, delay=0.01)
    broker.wait_workers(3)
    with Client(broker.frontend, timeout=10) as client:
        pending = [client.submit("svc", {"n": i}) for i in range(300)]
        answers = [x.result() for x in pending]
    assert [a["payload"] for a in answers] == [{"n": i} for i in range(300)]
    counts = _served_by(answers)
    assert len(counts) == 3 and min(counts.values()) >= 70, counts  # 100 each when even


def test_sigkill_while_holding_requests_loses_no_idempotent_request(procs: ProcessGroup) -> None:
    broker = procs.broker()
    victim, answers = sigkill_a_busy_worker(
        broker, lambda delay: procs.worker(broker, capacity=4, delay=delay), lambda: Client(broker.frontend, timeout=20)
    )
    assert [a["payload"] for a in answers] == list(range(60))  # each exactly once, in order, correct
    assert str(victim.pid) not in "".join(_served_by(answers))
    broker.wait_for(r"requeued", 1)
    assert broker.count(r"left service .*\(connection closed\); [1-9]\d* requests requeued") == 1


def test_non_idempotent_request_of_a_lost_worker_gets_outcome_unknown(
    procs: ProcessGroup, ctx: zmq.Context[Any]
) -> None:
    """A scripted worker takes the request (so we know it holds it), then its connection dies."""
    broker = procs.broker(heartbeat=5.0)  # the scripted worker sends no heartbeats
    w = _bare_worker(ctx, broker, 4, "doomed")
    with Client(broker.frontend, timeout=10) as client:
        pending = [client.submit("svc", "once only", idempotent=False), client.submit("svc", "again ok")]
        got = 0
        deadline = time.monotonic() + 10
        while got < 2 and time.monotonic() < deadline:
            pending[0].done()  # a sync client does its I/O when called: keep it going
            if w.poll(20) and p.decode_header(_recv(w)[1])[0] == p.REQUEST:
                got += 1
        assert got == 2
        w.close()  # the TCP connection closes, as when the process is killed
        procs.worker(broker)
        with pytest.raises(WorkerLost, match="outcome unknown"):
            pending[0].result()
        assert pending[1].result()["payload"] == "again ok"  # the idempotent one was requeued


def test_broker_never_sends_a_worker_more_than_its_capacity(procs: ProcessGroup, ctx: zmq.Context[Any]) -> None:
    """A scripted worker (a bare DEALER speaking the protocol) that holds what it gets."""
    broker = procs.broker(heartbeat=5.0)  # the scripted worker sends no heartbeats
    w = _bare_worker(ctx, broker, 2, "scripted")
    with Client(broker.frontend, timeout=10) as client:
        pending = [client.submit("svc", i) for i in range(6)]
        held: list[list[bytes]] = []
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            pending[0].done()  # a sync client does its I/O when called: keep it going
            if w.poll(20):
                msg = _recv(w)
                if p.decode_header(msg[1])[0] == p.REQUEST:
                    held.append(msg)
        assert len(held) == 2
        for _ in range(4):  # each reply frees exactly one credit
            rid = p.decode_header(held.pop(0)[1])[1]
            w.send_multipart([p.SIGNATURE, p.encode_reply(rid), b"ok"])
            got = []
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                pending[0].done()
                if w.poll(20):
                    msg = _recv(w)
                    if p.decode_header(msg[1])[0] == p.REQUEST:
                        got.append(msg)
            assert len(got) == 1
            held.extend(got)
        for msg in held:
            w.send_multipart([p.SIGNATURE, p.encode_reply(p.decode_header(msg[1])[1]), b"ok"])
        assert [x.result() for x in pending] == [b"ok"] * 6


def test_reply_sent_just_before_a_worker_leaves_is_delivered(procs: ProcessGroup, ctx: zmq.Context[Any]) -> None:
    """A draining worker's last REPLY, its DISCONNECT and the close of its connection arrive
    together; the broker must read the messages before acting on the close, or the request
    (non-idempotent here) would be answered "worker lost" although its reply was right there."""
    broker = procs.broker(heartbeat=5.0)  # the scripted workers send no heartbeats

    def next_command(w: zmq.Socket[Any], cmd: int, keep_going: Any) -> list[Any]:
        deadline = time.monotonic() + 10
        while True:  # skipping the broker's heartbeats
            keep_going()  # a sync client does its I/O when called
            assert time.monotonic() < deadline, f"command {cmd} never came"
            if w.poll(10):
                header = p.decode_header(_recv(w)[1])
                if header[0] == cmd:
                    return header

    with Client(broker.frontend, timeout=10) as client:
        for i in range(100):
            w = ctx.socket(zmq.DEALER)
            w.linger = 1000
            w.connect(broker.backend)
            w.send_multipart([p.SIGNATURE, p.encode_ready("svc", 1, 1, {"instance": f"brief-{i}"})])
            pending = client.submit("svc", i, idempotent=False)
            rid = next_command(w, p.REQUEST, pending.done)[1]
            w.send_multipart([p.SIGNATURE, p.encode_drain()])  # leaving, as a worker does
            next_command(w, p.DRAIN, pending.done)
            w.send_multipart([p.SIGNATURE, p.encode_reply(rid), b"done"])
            w.send_multipart([p.SIGNATURE, p.encode_disconnect("drained")])
            w.close()
            assert pending.result() == b"done"
    broker.wait_for("said goodbye", 100)  # none was taken for a lost connection
    assert broker.count("connection closed") == 0


def _slow_share(procs: ProcessGroup, policy: str) -> float:
    """Share of 240 requests served by the one slow worker (100 ms a request, the others ~0),
    from 6 closed request loops (each sends its next request when its reply is in), with
    capacities high enough that credits never decide."""
    broker = procs.broker("--policy", policy)
    procs.worker(broker, capacity=50, delay=0.1)
    broker.wait_workers(1)
    procs.worker(broker, capacity=50)
    procs.worker(broker, capacity=50)
    broker.wait_workers(3)

    async def run() -> list[dict[str, Any]]:
        answers: list[dict[str, Any]] = []
        async with AsyncClient(broker.frontend, timeout=30) as client:
            async def loop() -> None:
                while len(answers) < 240:
                    answers.append(await client.request("svc", len(answers)))

            await asyncio.gather(*(loop() for _ in range(6)))
        return answers

    counts = _served_by(asyncio.run(run()))
    slow = min(counts, key=lambda k: counts[k])
    return counts[slow] / sum(counts.values())


def test_slow_worker_gets_less_traffic_under_least_outstanding_than_round_robin(procs: ProcessGroup) -> None:
    lo = _slow_share(procs, "least-outstanding")
    procs.stop_all()
    rr = _slow_share(procs, "round-robin")
    assert rr > 0.28  # round-robin ignores speed: about a third
    print(f"slow worker share: least-outstanding {lo:.3f}, round-robin {rr:.3f}")
    assert lo < rr * 0.6, (lo, rr)


def test_graceful_drain_loses_nothing(procs: ProcessGroup) -> None:
    broker, leaving, staying, answers = drain_one_of_two_workers(procs, delay=0.4)
    assert [a["payload"] for a in answers] == list(range(4)) + [100 + i for i in range(8)]
    assert leaving.wait() == 0
    by_leaving = [a for a in answers[4:] if str(leaving.pid) in str(a["worker"])]
    assert by_leaving == []  # nothing new went to the draining worker
    broker.wait_for("said goodbye")  # logged just after the worker exits
    assert broker.count("said goodbye") == 1
    assert staying.popen is not None and staying.popen.poll() is None


def test_workers_survive_a_broker_restart_and_clients_never_hang(procs: ProcessGroup) -> None:
    broker = procs.broker()
    procs.worker(broker, capacity=2)
    broker.wait_workers(1)
    with Client(broker.frontend, timeout=3) as client:
        assert client.request("svc", "before")["payload"] == "before"
        broker.kill()
        t0 = time.monotonic()
        with pytest.raises((RequestTimeout, ServiceUnavailable)):
            client.request("svc", "while down", timeout=1.0)
        assert time.monotonic() - t0 < 2.0
        broker.restart()
        broker.wait_workers(1, timeout=15)
        answer = None
        end = time.monotonic() + 15
        while answer is None and time.monotonic() < end:
            t0 = time.monotonic()
            try:
                answer = client.request("svc", "after", timeout=1.0)
            except (RequestTimeout, ServiceUnavailable):
                assert time.monotonic() - t0 < 2.0
        assert answer is not None and answer["payload"] == "after"


def test_handler_exception_reaches_the_client_and_worker_keeps_serving(procs: ProcessGroup) -> None:
    broker = procs.broker()
    procs.worker(broker, service="fail", handler="zrouter.worker.examples:fail")
    procs.worker(broker, service="echo", handler="zrouter.worker.examples:echo")
    broker.wait_workers(2)
    with Client(broker.frontend, timeout=5) as client:
        for _ in range(2):
            with pytest.raises(RemoteError) as info:
                client.request("fail", "x")
            assert info.value.type == "ValueError" and "boom" in info.value.message
        assert client.request("echo", b"\x00raw") == b"\x00raw"
        assert client.request("echo", {"k": [1, 2]}) == {"k": [1, 2]}


def test_queued_request_times_out_and_unknown_service_is_unavailable(procs: ProcessGroup) -> None:
    broker = procs.broker("--grace", "0.3")
    procs.worker(broker, capacity=1, delay=1.0)
    broker.wait_workers(1)
    with Client(broker.frontend, timeout=5) as client:
        busy = client.submit("svc", "hold the only credit")
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            client.request("svc", "waits", timeout=0.3)
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(ServiceUnavailable, match="nobody"):
            client.request("nobody", "x")
        assert busy.result()["payload"] == "hold the only credit"


def test_bad_input_gets_clear_errors_and_the_broker_keeps_serving(procs: ProcessGroup, ctx: zmq.Context[Any]) -> None:
    broker = procs.broker("--max-message-size", "1k")
    procs.worker(broker, service="echo", handler="zrouter.worker.examples:echo")
    broker.wait_workers(1)
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(broker.frontend)
    cases = [
        [b"HTTP/1.1", b"GET /"],  # another dialect
        [p.SIGNATURE, b"\xc1", b""],  # header is not msgpack
        [p.SIGNATURE, msgpack.packb([p.REQUEST, 5, "echo"]), b""],  # header too short
        [p.SIGNATURE, msgpack.packb([p.REQUEST, 6, "echo", -1, 0, 1, None]), b""],  # bad timeout
        [p.SIGNATURE, p.encode_request(7, "echo", 1000)],  # payload frame missing
    ]
    for frames in cases:
        raw.send_multipart(frames)
        reply = _recv(raw)
        assert reply[0] == p.SIGNATURE
        assert p.check_reply(p.decode_header(reply[1])).status == p.STATUS_BAD_REQUEST
    with Client(broker.frontend, timeout=5) as client:
        with pytest.raises(MessageTooLarge):
            client.request("echo", b"x" * 2048)
        with pytest.raises(ProtocolError):
            client.request("echo", b"x" * 2048)
        # A client that vanishes mid-request costs nobody else anything.
        gone = ctx.socket(zmq.DEALER)
        gone.linger = 0
        gone.connect(broker.frontend)
        gone.send_multipart([p.SIGNATURE, p.encode_request(1, "echo", 5000), b"bye"])
        gone.close()
        assert client.request("echo", b"still here") == b"still here"
    assert broker.popen is not None and broker.popen.poll() is None
    # One peer's bad requests are logged at a paced rate: the first LOG_PEER_BURST at once.
    broker.wait_for("bad request from client", LOG_PEER_BURST)  # the log reader may lag the replies
    assert broker.count("bad request from client") == LOG_PEER_BURST < len(cases)


def test_broker_exits_cleanly_on_sigterm_answering_what_it_queued(
    procs: ProcessGroup, ctx: zmq.Context[Any]
) -> None:
    broker = procs.broker("--grace", "30")
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(broker.frontend)
    raw.send_multipart([p.SIGNATURE, p.encode_request(1, "nobody-yet", 20_000), b"x"])
    raw.send_multipart([p.SIGNATURE, b"\xc1", b""])
    # Messages on one connection arrive in order: the answer to the second proves the first queued.
    assert p.decode_header(_recv(raw)[1])[1] == 0
    broker.signal(signal.SIGTERM)
    reply = p.check_reply(p.decode_header(_recv(raw)[1]))
    assert (reply.rid, reply.status) == (1, p.STATUS_UNAVAILABLE) and "shutting down" in (reply.message or "")
    assert broker.wait() == 0
    broker.wait_for("broker stopped")


def test_cli_help_lists_the_flags() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "zrouter.broker", "--help"], capture_output=True, text=True, timeout=30,
                         env={**os.environ})
    assert out.returncode == 0
    for flag in ("--frontend", "--backend", "--heartbeat", "--liveness", "--policy", "--service-policy",
                 "--max-queue"):
        assert flag in out.stdout
