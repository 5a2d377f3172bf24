"""Hostile traffic for fuzzing a real broker over real sockets: a fast mutator of valid messages
and the peers that send them (clients, unregistered and registered workers, instance thieves).

hypothesis picks each example's seed and scenario (so `make test` replays the same inputs); this
module expands them into many messages with ``random.Random(seed)``, cheaply enough for `make
fuzz` to send hundreds of thousands. Every message is a list of frames as a DEALER sends them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import zmq

from zrouter import protocol as p
from zrouter.transport import recv_frames

__all__ = ["Counts", "FUZZ_SERVICE", "Mutator", "client_peer", "rss_kb", "worker_peer"]

FUZZ_SERVICE: Final = "fuzz"  # what hostile workers serve; the valid traffic's service is never theirs
_SERVICES: Final = [FUZZ_SERVICE, "nobody", "x" * 255, "ünï", "fuzz-2"]

# Values at and past every limit of docs/protocol.md, and of types that do not belong.
PALETTE: Final[list[Any]] = [
    None, True, False, 0, 1, -1, 9, 10, 60_000, 60_001, 255, 256, 2**31 - 1, 2**32, 2**53 + 1, 2**63 - 1,
    2**64 - 1, -(2**63), p.MAX_TIMEOUT_MS, p.MAX_TIMEOUT_MS + 1, p.MAX_CAPACITY, p.MAX_CAPACITY + 1,
    0.0, 0.5, -1.5, float("inf"), float("-inf"), float("nan"), "", "fuzz", "nobody", "heartbeat_ms", "instance",
    "9" * 400, "é" * 300, "x" * 1025, b"", b"\x00" * 300, b"echo", [], [1], [[[[]]]], {}, {"instance": 1},
    {"heartbeat_ms": "5"}, {"heartbeat_ms": 2**64 - 1}, {str(i): i for i in range(17)},
]


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


@dataclass
class Counts:
    """What a fuzz run did, for its report."""

    hostile_messages: int = 0
    hostile_peers: int = 0
    valid_requests: int = 0
    valid_replies: int = 0
    answers_to_hostile: int = 0
    examples: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def note(self, kind: str) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


class Mutator:
    """Valid messages of either side, then broken in one of many ways (see ``_MUTATIONS``)."""

    def __init__(self, rng: random.Random, real_instance: str = "") -> None:
        self.rng = rng
        self.real_instance = real_instance

    def value(self) -> Any:
        rng = self.rng
        if rng.random() < 0.7:
            return rng.choice(PALETTE)
        return rng.choice([rng.randint(-(2**63), 2**64 - 1), rng.randbytes(rng.randint(0, 40)),
                           "".join(chr(rng.randint(32, 0x2FF)) for _ in range(rng.randint(0, 20)))])

    # -- valid templates ------------------------------------------------------------------------

    def request(self) -> list[bytes]:
        rng = self.rng
        header = p.encode_request(rng.randint(1, 2**64 - 1), rng.choice(_SERVICES), rng.randint(1, 3000),
                                  rng.randint(0, 3), rng.randint(0, 3), rng.choice([None, b"k", "key"]))
        return [p.SIGNATURE, header, rng.randbytes(rng.choice([0, 1, 100, 4000]))]

    def ready(self, service: str = FUZZ_SERVICE, instance: str | None = None) -> list[bytes]:
        rng = self.rng
        meta = {"instance": instance or f"hostile-{rng.getrandbits(32):08x}"}
        if rng.random() < 0.5:
            meta["heartbeat_ms"] = str(rng.choice([10, 100, 1000, 60_000]))
        return [p.SIGNATURE, p.encode_ready(service, rng.randint(0, 8), rng.randint(0, 3), meta)]

    def worker_message(self, rids: list[int]) -> list[bytes]:
        rng = self.rng
        choice = rng.random()
        if choice < 0.35:
            rid = rng.choice(rids) if rids and rng.random() < 0.7 else rng.randint(0, 2**64 - 1)
            status = rng.choice([0, 0, 1, 2, 6, 3, 200])
            return [p.SIGNATURE, p.encode_reply(rid, status, rng.randint(0, 3), rng.choice([None, "m"])),
                    rng.randbytes(rng.choice([0, 10, 1000]))]
        if choice < 0.5:
            return self.ready()
        if choice < 0.65:
            return [p.SIGNATURE, p.encode_update(rng.randint(0, 10), rng.randint(0, 5))]
        if choice < 0.8:
            return [p.SIGNATURE, p.encode_heartbeat()]
        if choice < 0.9:
            return [p.SIGNATURE, p.encode_drain()]
        return [p.SIGNATURE, p.encode_disconnect(rng.choice([None, "bye", "é" * 10]))]

    # -- breaking them ----------------------------------------------------------------------------

    def mutate(self, frames: list[bytes]) -> tuple[str, list[bytes]]:
        """(mutation name, frames): ``frames`` broken one way, or left valid now and then."""
        name, fn = self.rng.choice(_MUTATIONS)
        return name, fn(self, list(frames))

    def _header(self, frames: list[bytes]) -> list[Any]:
        return list(msgpack.unpackb(frames[1], raw=False, strict_map_key=False))

    def _with_header(self, frames: list[bytes], header: Any) -> list[bytes]:
        try:
            frames[1] = _pack(header)
        except (OverflowError, ValueError, TypeError):
            frames[1] = b"\xc1"
        return frames

    def _field(self, frames: list[bytes]) -> list[bytes]:
        header = self._header(frames)
        i = self.rng.randrange(1, len(header) + 2)
        if i < len(header):
            header[i] = self.value()
        else:
            header.append(self.value())
        return self._with_header(frames, header)

    def _fields(self, frames: list[bytes]) -> list[bytes]:
        for _ in range(self.rng.randint(2, 4)):
            frames = self._field(frames) if frames[1] != b"\xc1" else frames
        return frames

    def _truncate_header(self, frames: list[bytes]) -> list[bytes]:
        header = self._header(frames)
        return self._with_header(frames, header[: self.rng.randrange(0, len(header))])

    def _flip(self, frames: list[bytes]) -> list[bytes]:
        b = bytearray(frames[1])
        for _ in range(self.rng.randint(1, 3)):
            b[self.rng.randrange(len(b))] = self.rng.randrange(256)
        frames[1] = bytes(b)
        return frames

    def _cut(self, frames: list[bytes]) -> list[bytes]:
        frames[1] = frames[1][: self.rng.randrange(len(frames[1]))]
        return frames

    def _noise(self, frames: list[bytes]) -> list[bytes]:
        frames[1] = self.rng.randbytes(self.rng.randint(0, 64))
        return frames

    def _nested(self, frames: list[bytes]) -> list[bytes]:
        depth = self.rng.choice([2, 100, 1000, 5000])
        bomb = b"\x91" * depth + b"\x01"
        frames[1] = bomb if self.rng.random() < 0.5 else b"\x92" + bomb + b"\x01"
        return frames

    def _lying_length(self, frames: list[bytes]) -> list[bytes]:
        frames[1] = self.rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                                     b"\xc6\xff\xff\xff\xff", b"\x97\x01\xdd\x7f\xff\xff\xff"])
        return frames

    def _oversize(self, frames: list[bytes]) -> list[bytes]:
        return self._with_header(frames, [self._header(frames)[0], "x" * self.rng.choice([8200, 20_000])])

    def _shape(self, frames: list[bytes]) -> list[bytes]:
        rng = self.rng
        k = rng.randrange(7)
        if k == 0:
            return frames[:-1] if len(frames) > 1 else [b""]
        if k == 1:
            return [*frames, b"extra"]
        if k == 2:
            return [b"ZRT2", *frames[1:]]
        if k == 3:
            return frames[1:] or [b""]
        if k == 4:
            return [b""]
        if k == 5:
            return [*frames, b"", b"", b""]
        return [p.SIGNATURE, frames[1], rng.randbytes(rng.choice([0, 70_000]))]

    def _unknown_command(self, frames: list[bytes]) -> list[bytes]:
        header = self._header(frames)
        header[0] = self.rng.choice([0, 0x03, 0x15, 0x7F, 0xFF, 2**64 - 1])
        return self._with_header(frames, header)

    def _not_an_array(self, frames: list[bytes]) -> list[bytes]:
        return self._with_header(frames, self.rng.choice([{}, {"0": 1}, "REQUEST", 1, None, 1.5, [], [None], ["1"]]))

    def _valid(self, frames: list[bytes]) -> list[bytes]:
        return frames


_MUTATIONS: Final[list[tuple[str, Callable[[Mutator, list[bytes]], list[bytes]]]]] = [
    ("field", Mutator._field), ("field", Mutator._field), ("fields", Mutator._fields),
    ("truncate_header", Mutator._truncate_header), ("flip", Mutator._flip), ("cut", Mutator._cut),
    ("noise", Mutator._noise), ("nested", Mutator._nested), ("lying_length", Mutator._lying_length),
    ("oversize", Mutator._oversize), ("shape", Mutator._shape), ("shape", Mutator._shape),
    ("unknown_command", Mutator._unknown_command), ("not_an_array", Mutator._not_an_array),
    ("valid", Mutator._valid),
]


def never_serves(frames: list[bytes], protected: str) -> list[bytes]:
    """A hostile worker must not register for the service the valid traffic uses (it would
    hold those requests without answering, which is a worker's right, and the check would
    fail for reasons that have nothing to do with the broker): such a READY gets another
    service name."""
    if len(frames) >= 2 and frames[0] == p.SIGNATURE:
        try:
            msg = p.decode_worker_message(frames[1])
        except p.BadMessage:
            return frames
        if type(msg) is p.Ready and msg.service == protected:
            frames = [frames[0], p.encode_ready(FUZZ_SERVICE, msg.capacity, msg.weight, msg.meta), *frames[2:]]
    return frames


def _send(sock: zmq.Socket[Any], frames: list[bytes]) -> None:
    sock.send_multipart(frames)  # SNDTIMEO set: a broker that stops reading fails the run


def _drain(sock: zmq.Socket[Any]) -> list[list[bytes]]:
    out = []
    while sock.poll(0):
        out.append([f.bytes for f in recv_frames(sock)])
    return out


def _socket(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.sndtimeo = 10_000
    s.connect(endpoint)
    return s


def client_peer(ctx: zmq.Context[Any], endpoint: str, mut: Mutator, n: int, counts: Counts) -> None:
    """A client-port peer sending ``n`` messages, most of them broken, reading what comes back."""
    sock = _socket(ctx, endpoint)
    try:
        for i in range(n):
            name, frames = mut.mutate(mut.request())
            counts.note(f"client:{name}")
            _send(sock, frames)
            if i % 64 == 63:
                counts.answers_to_hostile += len(_drain(sock))
        counts.hostile_messages += n
        counts.hostile_peers += 1
        counts.answers_to_hostile += len(_drain(sock))
    finally:
        sock.close()


def worker_peer(ctx: zmq.Context[Any], endpoint: str, mut: Mutator, n: int, counts: Counts, protected: str,
                mode: str) -> None:
    """A worker-port peer: ``mode`` "fresh" (never registers), "registered" (a valid READY
    first) or "thief" (READY naming the real worker's instance), then ``n`` messages, most of
    them broken; requests it is sent are answered now and then, validly or not."""
    sock = _socket(ctx, endpoint)
    rng = mut.rng
    rids: list[int] = []
    sent = 0
    try:
        if mode == "registered":
            _send(sock, mut.ready())
            sent += 1
        elif mode == "thief":
            _send(sock, mut.ready(FUZZ_SERVICE, mut.real_instance))
            sent += 1
        for i in range(n):
            base = mut.worker_message(rids)
            name, frames = mut.mutate(base) if rng.random() < 0.85 else ("valid", base)
            counts.note(f"worker:{mode}:{name}")
            _send(sock, never_serves(frames, protected))
            sent += 1
            if i % 16 == 15:
                for got in _drain(sock):
                    counts.answers_to_hostile += 1
                    if len(got) == 3:
                        try:
                            rids.append(p.decode_request(got[1]).rid)
                        except p.BadMessage:
                            pass
            if mode == "registered" and rids and rng.random() < 0.3:  # now and then, a proper reply
                _send(sock, [p.SIGNATURE, p.encode_reply(rids.pop(0)), b"ok"])
                sent += 1
        counts.hostile_messages += sent
        counts.hostile_peers += 1
    finally:
        sock.close()


def rss_kb(pid: int) -> int:
    """A process's resident set size in KiB (/proc/PID/status VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def wait_replies(sock: zmq.Socket[Any], want: dict[int, bytes], got: dict[int, int], timeout: float) -> None:
    """Read REPLYs on a witness client's socket into ``got`` (rid -> replies seen) until every
    rid in ``want`` has one, or the timeout. A reply that is not OK with the request's own
    payload, or answers a rid never sent, fails at once; duplicates are counted for the caller."""
    deadline = time.monotonic() + timeout
    while any(r not in got for r in want) and (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1):
            break
        frames = [f.bytes for f in recv_frames(sock)]
        reply = p.decode_reply(frames[1])
        assert reply.rid in want, f"reply to a request never sent: {reply}"
        assert reply.status == p.STATUS_OK and frames[2] == want[reply.rid], (reply, frames[2][:40])
        got[reply.rid] = got.get(reply.rid, 0) + 1
