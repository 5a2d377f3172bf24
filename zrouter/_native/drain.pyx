# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The broker's socket drain loops, compiled (the reference is zrouter/_drain.py).

A valid REQUEST from a client (4 frames with the envelope, the signature, a header the
compiled codec takes on its fast path, a payload within the size limit) goes straight to
``request(client, rid, service, timeout_ms, attempt, flags, key, payload, now)``; a valid REPLY
from a worker (same shape) to ``reply(worker, rid, status, flags, message, error_type, payload,
now)``. Those are the calls the broker's per-message Python code makes for such messages
(a str key is passed as its UTF-8 bytes, as that code does). Every other message, malformed
ones and all control traffic, goes to ``other(frames, now)``: that same Python code; so does
every message when ``request`` is None (the broker checks CURVE keys per request in Python).
Should ``request`` or ``reply`` raise, ``failed(peer, rid, now)`` is called from the except
clause: the message alone fails, as it would in the Python code.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.long cimport PyLong_FromUnsignedLongLong
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t

from zrouter._native.codec cimport (
    Item, K_NIL, MAX_HEADER_SIZE, MAX_ITEMS, PARSE_OK, is_signature, parse_header, reply_items_ok,
    request_items_ok,
)

from zrouter._native.wire import recv_or_none as _recv

__all__ = ["drain_replies", "drain_requests"]


cdef inline int _header(object frame, Item *items, int *count) except? -99:
    cdef Py_buffer view
    cdef int rc
    PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
    if view.len > MAX_HEADER_SIZE:
        rc = -1
    else:
        rc = parse_header(<const uint8_t *>view.buf, view.len, items, count)
    PyBuffer_Release(&view)
    return rc


cdef inline object _text(const Item *it):
    return PyUnicode_DecodeUTF8(it.s, it.n, NULL)


def drain_requests(sock, int batch, Py_ssize_t max_size, request, other, failed, now):
    """See zrouter/_drain.py; returns True when ``batch`` messages were read."""
    cdef Item items[MAX_ITEMS]
    cdef int count, i, kk
    cdef list frames
    for i in range(batch):
        frames = _recv(sock)
        if frames is None:
            return False
        count = 0
        if (request is not None and len(frames) == 4 and is_signature(frames[1])
                and _header(frames[2], items, &count) == PARSE_OK and request_items_ok(items, count)
                and len(frames[3]) <= max_size):
            kk = items[6].kind
            key = None if kk == K_NIL else PyBytes_FromStringAndSize(items[6].s, items[6].n)
            client = frames[0].bytes
            rid = PyLong_FromUnsignedLongLong(items[1].u)
            try:
                request(client, rid, _text(&items[2]), <long>items[3].u, <long>items[4].u,
                        PyLong_FromUnsignedLongLong(items[5].u), key, frames[3], now)
            except Exception:  # a bug met by this one request: it alone fails
                failed(client, rid, now)
        else:
            other(frames, now)
    return True


def drain_replies(sock, int batch, reply, other, failed, now):
    """See zrouter/_drain.py; returns True when ``batch`` messages were read."""
    cdef Item items[MAX_ITEMS]
    cdef int count, i
    cdef list frames
    for i in range(batch):
        frames = _recv(sock)
        if frames is None:
            return False
        count = 0
        if (len(frames) == 4 and is_signature(frames[1]) and _header(frames[2], items, &count) == PARSE_OK
                and reply_items_ok(items, count)):
            worker = frames[0].bytes
            rid = PyLong_FromUnsignedLongLong(items[1].u)
            try:
                reply(worker, rid, <long>items[2].u, PyLong_FromUnsignedLongLong(items[3].u),
                      None if items[4].kind == K_NIL else _text(&items[4]),
                      None if items[5].kind == K_NIL else _text(&items[5]), frames[3], now)
            except Exception:  # a bug met by this one reply: it alone fails
                failed(worker, rid, now)
        else:
            other(frames, now)
    return True
