"""Every conformance vector in tests/protocol/vectors, played against a real broker process."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from tests.procs import ProcessGroup
from tests.protocol.runner import VECTORS, Vector, load, run

ALL = sorted(VECTORS.glob("*.json"))


@pytest.fixture
def zctx() -> Iterator[zmq.Context[Any]]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_there_are_vectors_for_every_command_and_status() -> None:
    import json

    from zrouter import protocol as p

    text = " ".join(path.read_text() for path in ALL)
    seen_status = set()
    seen_cmd = set()
    for path in ALL:
        for st in json.loads(path.read_text())["steps"]:
            for f in st.get("frames", []):
                h = f.get("header")
                if isinstance(h, list) and h and isinstance(h[0], int):
                    seen_cmd.add(h[0])
                    if h[0] == p.REPLY and "expect" in st and isinstance(h[2], int):
                        seen_status.add(h[2])
    assert text
    assert seen_cmd >= {p.REQUEST, p.REPLY, p.READY, p.HEARTBEAT, p.DRAIN, p.DISCONNECT, p.UPDATE}, seen_cmd
    missing = set(p.STATUS_NAMES) - seen_status - {p.STATUS_FORBIDDEN}  # FORBIDDEN needs CURVE: tests/integration
    assert not missing, f"no vector expects status {sorted(missing)}"


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_vector(path: Any, procs: ProcessGroup, zctx: zmq.Context[Any]) -> None:
    vector: Vector = load(path)
    broker = procs.broker(*vector.broker_args, heartbeat=float(_arg(vector, "--heartbeat", "1.0")))
    stopped = []

    def stop() -> None:
        stopped.append(True)
        broker.signal(signal.SIGTERM)

    run(vector, zctx, broker.frontend, broker.backend, stop)
    if stopped:
        assert broker.wait() == 0, "the broker did not exit cleanly after SIGTERM"
    else:
        assert broker.popen is not None and broker.popen.poll() is None, "the broker exited"


def _arg(vector: Vector, flag: str, default: str) -> str:
    args = vector.broker_args
    return args[args.index(flag) + 1] if flag in args else default
