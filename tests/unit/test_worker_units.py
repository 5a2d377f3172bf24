"""Unit tests of the worker's pure pieces: capacity split, backoff, CLI helpers, examples, config,
the request path."""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import msgpack
import pytest
import zmq

from zrouter import protocol as p
from zrouter.errors import ProtocolError
from zrouter.protocol import (
    FLAG_MSGPACK,
    STATUS_BAD_REQUEST,
    STATUS_OK,
    STATUS_REMOTE_ERROR,
    decode_payload,
    decode_reply,
    encode_payload,
)
from zrouter.worker import DEFAULT_BROKER, RequestInfo, Worker, current_request
from zrouter.worker._engine import _decode
from zrouter.worker._connection import BACKOFF_INITIAL, BACKOFF_MAX, BrokerConnection, backoff_delay, split_capacity
from zrouter.worker._handlers import Abandon, Job, respond, respond_async
from zrouter.worker._worker import _is_async
from zrouter.worker.cli import build_parser, load_handler, main, with_delay
from zrouter.worker.examples import async_echo, async_slow_echo, echo, fail, slow_echo, whoami


@pytest.mark.parametrize(
    ("total", "n", "expected"),
    [
        (5, 2, [3, 2]),
        (4, 2, [2, 2]),
        (1, 2, [1, 0]),
        (0, 3, [0, 0, 0]),
        (7, 3, [3, 2, 2]),
        (3, 1, [3]),
        (3, 0, []),
        (-1, 2, [0, 0]),
    ],
)
def test_split_capacity(total: int, n: int, expected: list[int]) -> None:
    shares = split_capacity(total, n)
    assert shares == expected
    assert sum(shares) == (max(total, 0) if n else 0)


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    rng = random.Random(1)
    for attempt in range(40):
        base = min(BACKOFF_MAX, BACKOFF_INITIAL * 2**attempt)
        delay = backoff_delay(attempt, rng=rng)
        assert base * 0.5 <= delay <= base
    assert backoff_delay(0, rng=rng) <= BACKOFF_INITIAL
    assert backoff_delay(100, rng=rng) <= BACKOFF_MAX
    # Jitter: two workers reconnecting after the same failure do not pick the same moment.
    assert len({round(backoff_delay(3), 6) for _ in range(20)}) > 1


def test_load_handler() -> None:
    assert load_handler("zrouter.worker.examples:echo") is echo
    assert load_handler("os.path:join") is os.path.join
    with pytest.raises(ValueError, match="module:function"):
        load_handler("worker.examples")
    with pytest.raises(ImportError):
        load_handler("no_such_module_xyz:f")
    with pytest.raises(AttributeError):
        load_handler("zrouter.worker.examples:nope")
    with pytest.raises(TypeError):
        load_handler("worker.cli:DELAY_ENV")


def test_with_delay_sync_and_async() -> None:
    assert with_delay(echo, 0) is echo
    slow = with_delay(echo, 0.05)
    t0 = time.monotonic()
    assert slow(b"x") == b"x"
    assert time.monotonic() - t0 >= 0.05
    slow_async = with_delay(async_echo, 0.05)
    assert _is_async(slow_async)
    t0 = time.monotonic()
    assert asyncio.run(slow_async(b"y")) == b"y"
    assert time.monotonic() - t0 >= 0.05


def test_cli_parser() -> None:
    args = build_parser().parse_args(
        ["--service", "echo", "--broker", "tcp://a:1,tcp://b:2", "--broker", "tcp://c:3",
         "--capacity", "4", "--heartbeat", "0.5", "--meta", "zone=eu", "--delay", "0.1",
         "zrouter.worker.examples:echo"]
    )  # fmt: skip
    assert args.service == "echo" and args.handler == "zrouter.worker.examples:echo"
    assert args.broker == ["tcp://a:1,tcp://b:2", "tcp://c:3"]
    assert (args.capacity, args.weight, args.heartbeat, args.liveness) == (4, 1, 0.5, 3)
    assert args.meta == [("zone", "eu")] and args.delay == 0.1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--service", "x", "--meta", "novalue", "m:f"])


def test_cli_inline_flag() -> None:
    assert build_parser().parse_args(["--service", "s", "m:f"]).inline is False
    assert build_parser().parse_args(["--service", "s", "--inline", "m:f"]).inline is True
    assert "--inline" in build_parser().format_help()


def test_cli_rejects_inline_with_an_async_handler(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--service", "s", "--broker", "tcp://127.0.0.1:1", "--inline", "zrouter.worker.examples:async_echo"])
    assert info.value.code == 2
    assert "inline runs sync handlers only" in capsys.readouterr().err


def test_cli_delay_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZROUTER_WORKER_DELAY", "0.25")
    assert build_parser().parse_args(["--service", "s", "m:f"]).delay == 0.25


def test_examples() -> None:
    assert echo(b"raw") == b"raw"
    assert slow_echo({"delay": 0.01, "x": 1}) == {"delay": 0.01, "x": 1}
    assert slow_echo(b"no delay") == b"no delay"
    with pytest.raises(ValueError, match="boom"):
        fail(None)
    assert whoami("p") == {"worker": str(os.getpid()), "payload": "p"}
    assert asyncio.run(async_slow_echo({"delay": 0.01})) == {"delay": 0.01}
    assert current_request() is None


def test_worker_configuration() -> None:
    w = Worker("svc", echo, capacity=3, weight=2, meta={"zone": "eu"}, heartbeat_interval=0.5)
    assert w.brokers == [DEFAULT_BROKER]
    assert w.instance_id.startswith("svc-") and str(os.getpid()) in w.instance_id
    assert w.meta["instance"] == w.instance_id
    assert w.meta["pid"] == str(os.getpid()) and w.meta["host"] and w.meta["zone"] == "eu"
    assert w.meta["heartbeat_ms"] == "500"
    assert not w.is_async and not w.running
    assert Worker("svc", echo).instance_id != w.instance_id
    assert Worker("svc", echo, meta={"instance": "mine"}).instance_id == "mine"
    assert Worker("svc", echo, broker=["tcp://a:1", "tcp://b:2", "tcp://a:1"]).brokers == [
        "tcp://a:1",
        "tcp://b:2",
    ]


@pytest.mark.parametrize(
    "kwargs",
    [{"capacity": 0}, {"weight": -1}, {"heartbeat_interval": 0}, {"liveness": 0}, {"broker": [""]}],
)
def test_worker_rejects_bad_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Worker("svc", echo, **kwargs)


def test_inline_is_for_sync_handlers_only() -> None:
    assert Worker("svc", echo, inline=True).inline
    assert not Worker("svc", echo).inline
    with pytest.raises(ValueError, match="inline runs sync handlers only"):
        Worker("svc", async_echo, inline=True)
    with pytest.raises(ValueError, match="inline runs sync handlers only"):
        Worker("svc", with_delay(async_echo, 0.1), inline=True)


def test_worker_rejects_bad_service_and_handler() -> None:
    with pytest.raises(ValueError):
        Worker("", echo)
    with pytest.raises(TypeError):
        Worker("svc", "not callable")  # type: ignore[arg-type]


def test_async_detection() -> None:
    class AsyncCallable:
        async def __call__(self, payload: Any) -> Any:
            return payload

    assert _is_async(async_echo)
    assert _is_async(AsyncCallable())
    assert not _is_async(echo)
    assert Worker("svc", AsyncCallable()).is_async


def test_stop_before_start_and_run_once() -> None:
    w = Worker("svc", echo)
    assert w.stop(timeout=1.0)
    with pytest.raises(RuntimeError):
        w.run()


def test_request_info_fields() -> None:
    info = RequestInfo(1, "svc", 0, 12.5, "inst")
    assert info._asdict() == {
        "rid": 1,
        "service": "svc",
        "attempt": 0,
        "deadline": 12.5,
        "instance_id": "inst",
    }


# -- the request path (worker._handlers.respond): decode, call, encode; no sockets -------------


def _job(payload: Any, *, flags: int | None = None, rid: int = 7) -> Job:
    wire_flags, body = encode_payload(payload)
    frame = zmq.Frame(bytes(body))
    return Job(BrokerConnection("tcp://127.0.0.1:1", 0), 1, rid, "svc", 2, 123.5,
               wire_flags if flags is None else flags, frame)  # fmt: skip


def _outcome(reply: tuple[bytes, Any]) -> tuple[int, int, str | None, str | None, Any]:
    header, payload = reply
    r = decode_reply(header)
    return r.rid, r.status, r.message, r.error_type, decode_payload(r.flags, bytes(payload))


def test_respond_decodes_calls_and_encodes_with_the_request_set() -> None:
    seen: list[RequestInfo | None] = []

    def handler(payload: Any) -> Any:
        seen.append(current_request())
        return payload

    assert _outcome(respond(_job(b"\x00raw"), handler, "inst")) == (7, STATUS_OK, None, None, b"\x00raw")
    assert _outcome(respond(_job({"a": [1]}), handler, "inst"))[4] == {"a": [1]}
    assert seen[0] == RequestInfo(7, "svc", 2, 123.5, "inst")
    assert current_request() is None


def test_respond_turns_every_failure_into_a_reply() -> None:
    rid, status, _, error_type, _ = _outcome(respond(_job(b"\xc1", flags=FLAG_MSGPACK), echo, "inst"))  # 0xc1: never valid
    assert (rid, status, error_type) == (7, STATUS_BAD_REQUEST, "ProtocolError")
    assert _outcome(respond(_job(b"x"), fail, "inst"))[1:4] == (STATUS_REMOTE_ERROR, "boom", "ValueError")

    def leaves(payload: Any) -> Any:
        raise SystemExit(3)

    assert _outcome(respond(_job(b"x"), leaves, "inst"))[1:4:2] == (STATUS_REMOTE_ERROR, "SystemExit")
    unencodable = _outcome(respond(_job(b"x"), lambda p: object(), "inst"))
    assert unencodable[1] == STATUS_REMOTE_ERROR and unencodable[3] == "TypeError"
    # A handler that raises ProtocolError itself (say, from a client it uses) is the handler's error.
    assert _outcome(respond(_job(b"x"), lambda p: fail_with(ProtocolError("mine")), "inst"))[1:4] == (
        STATUS_REMOTE_ERROR, "mine", "ProtocolError")  # fmt: skip
    assert current_request() is None


def fail_with(exc: BaseException) -> Any:
    raise exc


def test_respond_lets_abandon_out() -> None:
    with pytest.raises(Abandon):
        respond(_job(b"x"), lambda p: fail_with(Abandon()), "inst")
    assert current_request() is None


def test_respond_async_maps_like_respond() -> None:
    async def handler(payload: Any) -> Any:
        if payload == b"fail":
            raise ValueError("boom")
        info = current_request()
        assert info is not None
        return {"rid": info.rid, "instance": info.instance_id}

    def run(job: Job) -> tuple[int, int, str | None, str | None, Any]:
        return _outcome(asyncio.run(respond_async(job, handler, "inst")))

    assert run(_job(b"ok"))[1:5:3] == (STATUS_OK, {"rid": 7, "instance": "inst"})
    assert run(_job(b"fail"))[1:4] == (STATUS_REMOTE_ERROR, "boom", "ValueError")
    assert run(_job(b"\xc1", flags=FLAG_MSGPACK))[1] == STATUS_BAD_REQUEST


def test_the_worker_reads_broker_messages_with_the_protocol_decoders() -> None:
    def frames(*parts: bytes) -> list[zmq.Frame]:
        return [zmq.Frame(x) for x in parts]

    request = p.encode_request(5, "svc", 1000, 0, 0)
    assert _decode(frames(p.SIGNATURE, request, b"x")) == p.Request(5, "svc", 1000, 0, 0, None)
    assert _decode(frames(p.SIGNATURE, p.encode_heartbeat())) == p.HEARTBEAT_MSG
    assert _decode(frames(p.SIGNATURE, p.encode_disconnect("who?"))) == p.Disconnect("who?")
    refused = [
        (frames(p.SIGNATURE, p.encode_heartbeat(), b"x"), "frames", 0),  # HEARTBEAT has no payload
        (frames(p.SIGNATURE, request), "frames", 5),  # a REQUEST has one
        (frames(p.SIGNATURE, request, b"x", b"y"), "frames", 0),
        (frames(b"ZRT0", request, b"x"), "signature", 0),
        (frames(p.SIGNATURE, p.encode_request(6, "svc", 0, 0, 0), b"x"), "field", 6),  # timeout_ms 0
        (frames(p.SIGNATURE, p.encode_reply(7), b"x"), "wrong_command", 7),  # brokers send no REPLY to workers
        (frames(p.SIGNATURE, b"\xc1"), "not_msgpack", 0),
    ]
    for message, kind, rid in refused:
        with pytest.raises(p.BadMessage) as info:
            _decode(message)
        assert (info.value.kind, info.value.rid) == (kind, rid)
    with pytest.raises(p.UnknownCommand):
        _decode(frames(p.SIGNATURE, msgpack.packb([0x7F])))


def test_load_handler_finds_a_module_in_the_current_directory(tmp_path: Any, monkeypatch: Any) -> None:
    # A console script's sys.path has neither "" nor the current directory: the CLI adds it, as
    # `python -m` would, so `zrouter-worker myhandlers:resize` finds ./myhandlers.py.
    import sys

    (tmp_path / "zr_cwd_handlers.py").write_text("def resize(payload):\n    return payload\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    handler = load_handler("zr_cwd_handlers:resize")
    assert handler(b"x") == b"x"
