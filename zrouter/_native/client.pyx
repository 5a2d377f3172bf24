# cython: language_level=3, boundscheck=False, wraparound=False
"""The client's per-request path, compiled: the common case of ``ClientCore.start`` (register
and send a request) and of ``ClientCore.handle_reply`` (settle it), and the drain loop that
reads a broker socket into the latter.

The reference is zrouter/client/_core.py. ``ClientPath`` works on one core's own state (its
pending table, deadline heap, waiting queue and broker set) with the same effects, field by
field, and hands every other case to the reference methods before changing anything: a closed
client, an argument the reference would refuse or convert (a service that is not a non-empty
str, a timeout that is not a positive float, a key that is not bytes or str), a payload over a
bound, a reply that is not three frames with a REPLY header on the codec's fast path, a reply
for no pending request. Settling anything but an OK reply with a raw payload within the size
limit goes to ``ClientCore._settle_reply``. tests/native/test_client.py drives a core through
this module and another through the reference with the same random traffic and compares every
frame sent, every outcome and the bookkeeping after each step.
"""

from zrouter._native.codec cimport is_signature

from heapq import heappush as _heappush

import zmq

from zrouter import protocol as _p
from zrouter._native.codec import decode_reply as _decode_reply
from zrouter._native.codec import encode_request as _encode_request
from zrouter._native.wire import recv_or_none as _recv
from zrouter._native.wire import send_frames as _send

__all__ = ["ClientPath"]


cdef object _SIGNATURE = _p.SIGNATURE
cdef object _BadMessage = _p.BadMessage
cdef object _Again = zmq.Again
cdef object _encode_payload = _p.encode_payload
cdef long _FLAG_IDEMPOTENT = _p.FLAG_IDEMPOTENT
cdef long _FLAG_MSGPACK = _p.FLAG_MSGPACK
cdef long _STATUS_OK = _p.STATUS_OK
cdef int _NOBLOCK = zmq.NOBLOCK
cdef long long _MAX_TIMEOUT_MS = _p.MAX_TIMEOUT_MS
cdef double _MAX_TIMEOUT = _p.MAX_TIMEOUT_MS / 1000.0  # client/_core.py's MAX_TIMEOUT


cdef class ClientPath:
    """The compiled twin of one ``ClientCore``'s per-request methods; ``start``,
    ``handle_reply`` and ``drain`` take the same arguments as ``ClientCore.start``,
    ``ClientCore.handle_reply`` and ``ClientCore._drain``."""

    cdef object core, brokers, pending, start_ref, reply_ref

    def __init__(self, core, start_ref, reply_ref):
        """``core``: the ClientCore; ``start_ref`` and ``reply_ref``: its reference ``start`` and
        ``handle_reply``, bound, for everything off the common path."""
        self.core = core
        self.brokers = core._brokers
        self.pending = core.pending  # cleared by close(), never replaced
        self.start_ref = start_ref
        self.reply_ref = reply_ref

    def start(self, entry, service, payload, timeout, idempotent, key, now):
        cdef object core = self.core
        cdef object brokers = self.brokers
        cdef object frame, limit, heap, waiting, conn
        cdef long flags
        cdef Py_ssize_t size
        cdef double t, deadline
        if (core.closed or type(service) is not str or not service
                or not (key is None or type(key) is bytes or type(key) is str)):
            return self.start_ref(entry, service, payload, timeout, idempotent, key, now)
        if timeout is None:
            timeout = core.timeout
        elif type(timeout) is not float or not (0.0 < <double>timeout <= _MAX_TIMEOUT):
            return self.start_ref(entry, service, payload, timeout, idempotent, key, now)  # raises
        if type(payload) is bytes:
            flags = 0
            frame = payload
            size = len(<bytes>payload)
        else:
            flags, frame = _encode_payload(payload)
            size = frame.nbytes if type(frame) is memoryview else len(frame)
        limit = core.max_message_size
        if (limit is not None and size > limit) or size > brokers.max_inflight_bytes:
            return self.start_ref(entry, service, payload, timeout, idempotent, key, now)  # raises
        if idempotent:
            flags |= _FLAG_IDEMPOTENT
        rid = core._next_rid
        core._next_rid = rid + 1
        entry.rid = rid
        entry.service = service
        entry.flags = flags
        entry.key = key
        entry.payload = frame
        entry.size = size
        entry.timeout = timeout
        t = timeout
        deadline = <double>now + t
        entry.deadline = deadline
        self.pending[rid] = entry
        heap = core._deadlines
        if len(heap) > 64 + 2 * len(self.pending):
            core._compact()
            heap = core._deadlines
        _heappush(heap, (deadline, rid, entry))
        if not brokers.up and brokers.conns:
            brokers.read_monitors(now)
        waiting = core._waiting
        if waiting:
            waiting.append(entry)
            return None
        conn = self._try_send(entry, rid, service, frame, flags, key, size, deadline, now)
        if conn is None:
            waiting.append(entry)
        return conn

    cdef object _try_send(self, entry, rid, service, frame, long flags, key, Py_ssize_t size, double deadline,
                          double now):
        """ClientCore._try_send for an entry sent for the first time."""
        cdef object brokers = self.brokers
        cdef list up = brokers.up
        cdef object conn
        cdef long long ms
        if len(up) == 1:
            conn = up[0]
            if not (conn.pending < brokers.max_inflight and conn.pending_bytes + size <= brokers.max_inflight_bytes):
                return None
        else:
            conn = brokers.pick(size)
            if conn is None:
                return None
        ms = <long long>((deadline - now) * 1000.0 + 0.999)  # as request_frames: see there
        ms = 1 if ms < 1 else _MAX_TIMEOUT_MS if ms > _MAX_TIMEOUT_MS else ms
        frames = (_SIGNATURE, _encode_request(rid, service, ms, entry.attempt, flags, key), frame)
        try:
            _send(conn.sock, frames, _NOBLOCK)
        except _Again:
            conn = self.core._send_elsewhere(conn, frames, size)
            if conn is None:
                return None
        entry.conn = conn
        conn.pending += 1
        conn.pending_bytes += size
        return conn

    def handle_reply(self, frames):
        self._handle(frames)

    cdef _handle(self, frames):
        cdef object reply, entry, conn, body, limit
        if len(frames) != 3 or not is_signature(frames[0]):
            return self.reply_ref(frames)
        try:
            reply = _decode_reply(frames[1])
        except _BadMessage:
            return self.reply_ref(frames)  # decodes it again, and answers as the reference does
        entry = self.pending.pop(reply.rid, None)
        if entry is None:
            return self.reply_ref(frames)  # finds no entry either: a late answer, rid 0, ...
        conn = entry.conn
        if conn is not None:
            entry.conn = None
            if conn.removed:
                self.brokers.release(conn, entry.size)
            else:  # BrokerSet.release for a connection that stays
                conn.pending -= 1
                conn.pending_bytes -= entry.size
        body = frames[2]
        limit = self.core.max_message_size
        if (reply.status != _STATUS_OK or reply.flags & _FLAG_MSGPACK
                or (limit is not None and len(body) > limit)):
            self.core._settle_reply(entry, reply, frames)
            return
        entry._settle(body.bytes, None)

    def drain(self, conn):
        sock = conn.sock
        while not conn.closed:
            frames = _recv(sock)
            if frames is None:
                return
            self._handle(frames)
