"""Each flood of issue 7 against a real broker process: its resident memory (VmRSS, from
/proc/PID/status) must stay within the documented bound while the flood runs, and every
request still gets exactly one reply. Each flood lasts a few seconds; unbounded, each would
grow the broker by 100 MB or more in that time."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from tests.observe_helpers import broker_with_http, scrape
from tests.procs import ProcessGroup
from zrouter import protocol as p
from zrouter.client import Client
from zrouter.errors import MessageTooLarge
from zrouter.transport import recv_frames

pytestmark = pytest.mark.timeout(60)

MB = 1024 * 1024


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    c: zmq.Context[Any] = zmq.Context()
    yield c
    c.destroy(linger=0)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class Peak:
    """Samples a process's RSS every 20 ms on a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = rss(pid)
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss(self.pid))

    def growth(self) -> float:
        """MB above the RSS when sampling started, at the peak."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(self.pid))
        return (self.peak - self.base) / MB


def dealer(ctx: zmq.Context[Any], endpoint: str, **options: int) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name.upper()), value)
    sock.connect(endpoint)
    return sock


def request(sock: zmq.Socket[Any], rid: int, service: str, payload: bytes, timeout_ms: int = 10_000) -> None:
    sock.send_multipart([p.SIGNATURE, p.encode_request(rid, service, timeout_ms), payload], copy=False)


def replies(sock: zmq.Socket[Any], until: int, got: list[p.Reply], timeout: float) -> None:
    """Read replies into ``got`` until there are ``until`` of them or ``timeout`` seconds pass."""
    end = time.monotonic() + timeout
    while len(got) < until and time.monotonic() < end:
        if sock.poll(50):
            while True:
                try:
                    frames = recv_frames(sock, zmq.NOBLOCK)
                except zmq.Again:
                    break
                got.append(p.decode_reply(frames[1].buffer))


def warm_up(broker_frontend: str, service: str = "echo") -> None:
    """Some traffic first, so the baseline includes what every broker allocates once."""
    with Client(broker_frontend, timeout=10) as client:
        client.map(service, [b"x" * 4096] * 200)


def test_steady_flood_to_a_service_nobody_serves(procs: ProcessGroup, ctx: zmq.Context[Any]) -> None:
    """4,000 requests/s of 4 KB for 3 s, each answered UNAVAILABLE after the 0.2 s grace period:
    the broker holds a grace period's worth (~12 MB measured), not the flood (~110 MB before)."""
    broker = procs.broker("--grace", "0.2", "--max-client-requests", "100000")  # only the grace bounds it
    client = dealer(ctx, broker.frontend, sndhwm=0, rcvhwm=0)
    payload = b"x" * 4096
    got: list[p.Reply] = []
    request(client, 1, "nobody", payload)
    replies(client, 1, got, 5.0)
    peak = Peak(broker.pid)
    sent, t0 = 1, time.monotonic()
    while (now := time.monotonic()) < t0 + 3.0:
        due = 1 + int((now - t0) * 4000)
        while sent < due:
            sent += 1
            request(client, sent, "nobody", payload)
        replies(client, len(got) + 1, got, 0.005)
    replies(client, sent, got, 10.0)
    growth = peak.growth()
    assert len(got) == sent and {r.status for r in got} == {p.STATUS_UNAVAILABLE}
    assert len({r.rid for r in got}) == sent
    assert growth < 25, f"broker grew {growth:.1f} MB"


def test_worker_that_never_reads_nor_replies_with_huge_capacity(procs: ProcessGroup, ctx: zmq.Context[Any]) -> None:
    """A worker declares capacity 1,000,000 (clamped to 1,024) and neither reads nor replies;
    256 KB requests at 200/s for 3 s with 0.3 s deadlines: each is answered TIMEOUT at its
    deadline and freed; the worker pins at most --max-worker-bytes (16 MiB) in the broker's
    send queue. Before: every payload sent to it stayed (150 MB here)."""
    broker = procs.broker(heartbeat=5.0)  # the scripted worker sends no heartbeats
    worker = dealer(ctx, broker.backend, rcvhwm=1, rcvbuf=4096)
    worker.send_multipart([p.SIGNATURE, p.encode_ready("hoard", 1_000_000, 1, {"instance": "hoarder"})])
    broker.wait_workers(1)
    broker.wait_for("grants at most 1024")
    client = dealer(ctx, broker.frontend, sndhwm=0, rcvhwm=0)
    payload = b"x" * (256 * 1024)
    got: list[p.Reply] = []
    peak = Peak(broker.pid)
    sent, t0 = 0, time.monotonic()
    while (now := time.monotonic()) < t0 + 3.0:
        while sent < int((now - t0) * 200):
            sent += 1
            request(client, sent, "hoard", payload, timeout_ms=300)
        replies(client, len(got) + 1, got, 0.005)
    replies(client, sent, got, 10.0)
    growth = peak.growth()
    statuses = Counter(r.status for r in got)
    assert len(got) == sent and set(statuses) <= {p.STATUS_TIMEOUT, p.STATUS_OVERLOADED}, statuses
    assert any("worker held" in (r.message or "") for r in got)
    assert growth < 45, f"broker grew {growth:.1f} MB"


def test_client_that_never_reads_its_replies(procs: ProcessGroup, ctx: zmq.Context[Any]) -> None:
    """40,000 requests of 4 KB to an echo worker from a client that reads nothing: the broker
    holds the client's 1,000 requests and 1,000 queued replies, counts and logs the replies it
    cannot queue, and keeps serving others. Before: ~160 MB here, kept after the client left."""
    broker, url = broker_with_http(procs, "--heartbeat", "5")  # the scripted probe sends no heartbeats
    procs.worker(broker, service="echo", handler="zrouter.worker.examples:echo", capacity=50, heartbeat=5.0,
                 extra=["--inline"])
    probe = dealer(ctx, broker.backend)
    probe.send_multipart([p.SIGNATURE, p.encode_ready("probe", 1, 1, {"instance": "probe"})])
    broker.wait_workers(2)
    warm_up(broker.frontend)
    client = dealer(ctx, broker.frontend, sndhwm=0, rcvhwm=1, rcvbuf=4096)
    payload = b"x" * 4096
    peak = Peak(broker.pid)
    for rid in range(1, 40_001):
        request(client, rid, "echo", payload)
    request(client, 40_001, "probe", b"")  # read after all the others: one connection, in order
    assert probe.poll(30_000), "the broker did not get through the flood"
    growth = peak.growth()
    broker.wait_for("reply to client [0-9a-f]+ dropped: it has 1000 replies unread")
    assert growth < 40, f"broker grew {growth:.1f} MB"
    assert scrape(url)[("zrouter_undeliverable_replies_total", ())] > 1000  # counted, not lost unsaid
    client.close()
    with Client(broker.frontend, timeout=10) as other:
        assert other.request("echo", b"still served") == b"still served"


def test_a_reply_to_a_client_that_left_is_counted_and_logged_at_info(
    procs: ProcessGroup, ctx: zmq.Context[Any]
) -> None:
    """A client that leaves with requests out (as one that gave up at its deadline does) is
    normal: the replies that come later are counted as undeliverable and logged at INFO, not as
    a WARNING an operator should act on."""
    broker, url = broker_with_http(procs, "--heartbeat", "5")  # the scripted worker sends no heartbeats
    worker = dealer(ctx, broker.backend)
    worker.send_multipart([p.SIGNATURE, p.encode_ready("hold", 40, 1, {"instance": "holder"})])
    broker.wait_workers(1)
    client = dealer(ctx, broker.frontend)
    for rid in range(1, 41):
        request(client, rid, "hold", b"")
    held: list[p.Request] = []
    while len(held) < 40:
        assert worker.poll(10_000), f"only {len(held)} of 40 requests reached the worker"
        msg = p.decode_broker_message(worker.recv_multipart()[1])
        assert type(msg) is p.Request
        held.append(msg)
    client.close()
    # The broker learns of the disconnect asynchronously; replies sent before that go down the
    # closing connection. So reply one at a time until one is refused, and counted.
    for msg in held:
        worker.send_multipart([p.SIGNATURE, p.encode_reply(msg.rid), b"late"])
        time.sleep(0.05)  # paces the replies over 2 s; the disconnect takes milliseconds
        if scrape(url)[("zrouter_undeliverable_replies_total", ())] > 0:
            break
    else:
        raise AssertionError("no reply to the departed client was counted as undeliverable")
    broker.wait_for(" INFO .*reply to client [0-9a-f]+ dropped: its connection is gone")
    assert not [line for line in broker.lines if "WARNING" in line and "dropped" in line]
    worker.close()


def _big_replier(ctx: zmq.Context[Any], backend: str, size: int, stop: threading.Event) -> None:
    sock = dealer(ctx, backend)
    sock.send_multipart([p.SIGNATURE, p.encode_ready("big", 100, 1, {"instance": "big-replier"})])
    body = b"y" * size
    while not stop.is_set():
        if not sock.poll(50):
            continue
        frames = sock.recv_multipart()
        msg = p.decode_broker_message(frames[1])
        if type(msg) is p.Request:
            sock.send_multipart([p.SIGNATURE, p.encode_reply(msg.rid), body], copy=False)
    sock.close()


def test_unread_reply_bytes_are_bounded_and_every_request_still_gets_one_reply(
    procs: ProcessGroup, ctx: zmq.Context[Any]
) -> None:
    """100 small requests whose replies are 1 MiB each, from a client that does not read: the
    broker queues about --max-client-unread-bytes (16 MiB) of them and answers the rest
    TOO_LARGE, so once the client reads it finds exactly one reply per request."""
    broker, url = broker_with_http(procs, "--heartbeat", "5")  # the scripted worker sends no heartbeats
    stop = threading.Event()
    thread = threading.Thread(target=_big_replier, args=(ctx, broker.backend, MB, stop), daemon=True)
    thread.start()
    try:
        broker.wait_workers(1)
        client = dealer(ctx, broker.frontend, sndhwm=0, rcvhwm=1, rcvbuf=4096)
        peak = Peak(broker.pid)
        for rid in range(1, 101):
            request(client, rid, "big", b"")
        broker.wait_for("replaced by TOO_LARGE", timeout=20)
        time.sleep(0.5)  # a measuring window: the peak sampler runs while the last replies come in
        growth = peak.growth()
        got: list[p.Reply] = []
        replies(client, 100, got, 20.0)
    finally:
        stop.set()
        thread.join(5)
    statuses = Counter(r.status for r in got)
    assert sorted(r.rid for r in got) == list(range(1, 101)), statuses
    assert set(statuses) == {p.STATUS_OK, p.STATUS_TOO_LARGE} and statuses[p.STATUS_OK] >= 10, statuses
    assert all("was served" in (r.message or "") for r in got if r.status == p.STATUS_TOO_LARGE)
    assert scrape(url)[("zrouter_unread_overflow_replies_total", ())] == statuses[p.STATUS_TOO_LARGE]
    assert growth < 50, f"broker grew {growth:.1f} MB"


def test_oversize_frames_are_refused_before_they_are_in_memory(procs: ProcessGroup, ctx: zmq.Context[Any]) -> None:
    """A 64 MiB frame against --max-message-size 1m: libzmq drops the sender's connection as soon
    as it reads the frame's size, so the broker never holds it; others keep being served, and
    the client library refuses its own oversize request before sending it."""
    broker = procs.broker("--max-message-size", "1m")
    procs.worker(broker, service="echo", handler="zrouter.worker.examples:echo")
    broker.wait_workers(1)
    warm_up(broker.frontend)
    peak = Peak(broker.pid)
    hostile = dealer(ctx, broker.frontend, sndhwm=0)
    request(hostile, 1, "echo", b"z" * (64 * MB))
    with Client(broker.frontend, timeout=10, max_message_size=MB) as client:
        with pytest.raises(MessageTooLarge):
            client.request("echo", b"z" * (MB + 1))
        for _ in range(20):  # meanwhile the 64 MiB go out and are refused
            assert client.request("echo", b"ok") == b"ok"
            time.sleep(0.05)
    growth = peak.growth()
    assert growth < 20, f"broker grew {growth:.1f} MB"
    assert not hostile.poll(100)  # no answer: the connection was dropped, not the broker


def test_every_bound_is_a_documented_flag_and_contradictions_are_refused() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "zrouter.broker", "--help"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    for flag in ("--max-message-size", "--max-client-requests", "--max-client-bytes", "--max-client-unread",
                 "--max-client-unread-bytes", "--max-services", "--max-capacity", "--max-worker-bytes"):
        assert flag in out
    bad = subprocess.run([sys.executable, "-m", "zrouter.broker", "--max-message-size", "32m"], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "max_client_bytes" in bad.stderr
