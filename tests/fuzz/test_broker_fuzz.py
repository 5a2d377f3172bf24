"""A real broker process under random and mutated messages on both ports, over real sockets,
interleaved with valid traffic from the real client (and a raw witness client) to a real worker
process (issue 7, "What it must show").

Hostile peers: client-port peers; worker-port peers that never register, that register first
(and then send anything, answering some of the requests they are sent), and that name the real
worker's instance. At the end: the broker process is alive and logged no internal error, every
valid request got exactly one reply and it was the right one, and the broker's RSS grew by less
than RSS_GROWTH_KB.

`make test` replays a fixed seed (derandomize) with a few thousand messages; `make fuzz`
(`python -m bench.fuzz`) raises the counts through the environment: ZROUTER_FUZZ_SOCKET_EXAMPLES,
ZROUTER_FUZZ_SOCKET_MESSAGES (hostile messages per example), ZROUTER_FUZZ_INPROCESS, and
ZROUTER_FUZZ_RANDOM=1 for a new seed; ZROUTER_FUZZ_REPORT names a file the counts are appended
to (one JSON object a line).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.hostile import Counts, Mutator, client_peer, never_serves, rss_kb, wait_replies, worker_peer
from tests.fuzz.test_decoders import _check_all, headers
from tests.procs import ProcessGroup
from zrouter import protocol as p
from zrouter.client import Client

EXAMPLES = int(os.environ.get("ZROUTER_FUZZ_SOCKET_EXAMPLES", "30"))
MESSAGES = int(os.environ.get("ZROUTER_FUZZ_SOCKET_MESSAGES", "80"))
IN_PROCESS = int(os.environ.get("ZROUTER_FUZZ_INPROCESS", "3000"))
FIXED = os.environ.get("ZROUTER_FUZZ_RANDOM") != "1"
REPORT = os.environ.get("ZROUTER_FUZZ_REPORT")
RSS_GROWTH_KB = 64 * 1024  # a bound far below what a leak per message would cost over a run
SCENARIOS = ["client", "fresh", "registered", "thief"]
PROTECTED = "echo"  # the valid traffic's service: hostile workers never serve it

pytestmark = pytest.mark.timeout(max(120, EXAMPLES * MESSAGES // 1500 + IN_PROCESS // 2000))


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    c: zmq.Context[Any] = zmq.Context()
    yield c
    c.destroy(linger=0)


def _report(name: str, **figures: Any) -> None:
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


def test_broker_survives_hostile_peers_on_both_ports(procs: ProcessGroup, ctx: zmq.Context[Any]) -> None:
    broker = procs.broker("--heartbeat", "0.5", "--grace", "0.2")
    procs.worker(broker, service=PROTECTED, handler="zrouter.worker.examples:echo", capacity=8, heartbeat=1.0)
    broker.wait_workers(1)
    [instance] = [m.group(1) for line in broker.lines if (m := re.search(r"worker (\S+) joined", line))]
    counts = Counts()
    witness = ctx.socket(zmq.DEALER)
    witness.linger = 0
    witness.connect(broker.frontend)
    want: dict[int, bytes] = {}
    got: dict[int, int] = {}
    started = time.monotonic()

    def witness_request(rng: random.Random) -> None:
        rid = len(want) + 1
        want[rid] = rng.randbytes(rng.choice([0, 16, 3000]))
        witness.send_multipart([p.SIGNATURE, p.encode_request(rid, PROTECTED, 20_000), want[rid]])

    with Client(broker.frontend, timeout=20) as client:
        assert client.request(PROTECTED, b"warm") == b"warm"
        rss_start = rss_kb(broker.pid)

        @settings(max_examples=EXAMPLES, derandomize=FIXED, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.integers(0, 2**32 - 1), st.lists(st.sampled_from(SCENARIOS), min_size=1, max_size=4),
               st.lists(headers, max_size=3))
        def example(seed: int, plan: list[str], extra: list[list[Any]]) -> None:
            rng = random.Random(seed)
            mut = Mutator(rng, instance)
            valid = [(client.submit(PROTECTED, {"n": seed, "i": i}), {"n": seed, "i": i}) for i in range(2)]
            witness_request(rng)
            per_peer = max(1, MESSAGES // len(plan))
            for scenario in plan:
                if scenario == "client":
                    client_peer(ctx, broker.frontend, mut, per_peer, counts)
                else:
                    worker_peer(ctx, broker.backend, mut, per_peer, counts, PROTECTED, scenario)
                witness_request(rng)
            for header in extra:  # hypothesis's own headers, verbatim, on both ports
                try:
                    frame = msgpack.packb(header, use_bin_type=True)
                except (OverflowError, ValueError, TypeError):
                    continue
                for endpoint, frames in [(broker.frontend, [p.SIGNATURE, frame, b"x"]),
                                         (broker.backend, never_serves([p.SIGNATURE, frame], PROTECTED))]:
                    sock = ctx.socket(zmq.DEALER)
                    sock.linger = 0
                    sock.connect(endpoint)
                    sock.send_multipart(frames)
                    sock.close()
                    counts.hostile_messages += 1
            valid.append((client.submit(PROTECTED, b"after"), b"after"))
            for pending, payload in valid:
                assert pending.result() == payload
            counts.valid_requests += len(valid)
            counts.valid_replies += len(valid)
            wait_replies(witness, want, got, 20.0)
            assert all(rid in got for rid in want), "a witness request went unanswered"
            assert broker.popen is not None and broker.popen.poll() is None, "the broker exited"
            counts.examples += 1

        example()
        # Any second reply to a witness request would have arrived by now, or within this wait.
        wait_replies(witness, {**want, 0: b""}, got, 0.5)
        assert client.request(PROTECTED, b"last") == b"last"
    assert set(got) == set(want) and set(got.values()) == {1}, "a witness request got more than one reply"
    counts.valid_requests += len(want) + 2
    counts.valid_replies += sum(got.values()) + 2
    assert broker.popen is not None and broker.popen.poll() is None, "the broker exited"
    rss_end = rss_kb(broker.pid)
    assert broker.count(r"broker loop error|error handling a message") == 0, "\n".join(broker.lines[-30:])
    _report("broker_fuzz", **dataclasses.asdict(counts), broker_exits=0, rss_start_kb=rss_start,
            rss_end_kb=rss_end, seconds=round(time.monotonic() - started, 1))
    assert rss_end - rss_start < RSS_GROWTH_KB, (rss_start, rss_end)
    assert counts.hostile_messages >= EXAMPLES * len(SCENARIOS) // 4  # the run did send something


def test_mutated_messages_decode_within_limits_or_are_refused() -> None:
    """The same mutator in-process, straight into every decoder: many more inputs per second
    than the sockets allow (`make fuzz` counts them with the socket-level ones)."""
    rng = random.Random(7 if FIXED else None)
    mut = Mutator(rng, "real")
    accepted = 0
    for n in range(IN_PROCESS):
        base = mut.request() if n % 2 else mut.worker_message([1, 2])
        _, frames = mut.mutate(base)
        if len(frames) >= 2:
            accepted += _check_all(frames[1])
    _report("in_process_mutated", inputs=IN_PROCESS, accepted=accepted)
    assert 0 < accepted < IN_PROCESS * 5  # some survive mutation (the "valid" one), most do not
