# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled twins of :mod:`zrouter.protocol`'s per-request codec: ``decode_request``,
``decode_reply``, ``encode_request`` and ``encode_reply``.

The Python module stays the reference. Each function here has one fast path for the shapes
well-behaved peers send (a flat msgpack array of scalars, every field within its limits) and
hands every other input to the reference function itself: a refused header, anything nested, an
ext type, a top-level value that is not an array, an argument of an unexpected type. So on every
input the result is the reference's, record for record and BadMessage for BadMessage (kind, rid
and text); tests/fuzz/test_decoders.py compares the two on random input.

The fast path parses the msgpack bytes in place (no intermediate list), checks each field
against the same limits in the same order, and builds the same NamedTuple. The encoders write
msgpack's shortest forms, byte for byte what ``msgpack.Packer(use_bin_type=True)`` writes.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_Clear
from cpython.long cimport PyLong_FromUnsignedLongLong
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memcmp
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from zrouter import protocol as _p

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t *size) except NULL
    bint PyLong_CheckExact(object o)
    bint PyUnicode_CheckExact(object o)
    bint PyBytes_CheckExact(object o)
    char *PyBytes_AS_STRING(object o)
    Py_ssize_t PyBytes_GET_SIZE(object o)
    unsigned long long PyLong_AsUnsignedLongLong(object o) except? -1

__all__ = ["decode_reply", "decode_request", "decode_worker_message", "encode_reply", "encode_request"]

# The reference, for every input the fast path leaves to it.
_py_decode_request = _p.decode_request
_py_decode_reply = _p.decode_reply
_py_decode_worker_message = _p.decode_worker_message
_py_encode_request = _p.encode_request
_py_encode_reply = _p.encode_reply
_Request = _p.Request
_Reply = _p.Reply
_tuple_new = tuple.__new__

# The protocol's limits (MAX_HEADER_SIZE ... MAX_TEXT_LEN) are in codec.pxd, shared with drain.pyx.
cdef enum:
    MAX_STR = 8192                  # msgpack max_str_len / max_bin_len in the reference
    FAST_TEXT = 1024                # longer strings in an encoder's arguments go to the reference
    PACK_BUF = 4 * FAST_TEXT + 128  # room for the largest header the fast encoders write

cdef uint64_t MAX_FLAGS = 0xFFFFFFFFu

# The reference's limits, as this module's constants say them: a change there must show here.
assert _p.MAX_HEADER_SIZE == MAX_HEADER_SIZE and _p.MAX_SERVICE_LEN == MAX_SERVICE_LEN
assert _p.MAX_KEY_LEN == MAX_KEY_LEN and _p.MAX_TIMEOUT_MS == MAX_TIMEOUT_MS and _p.MAX_ATTEMPT == MAX_ATTEMPT
assert _p.MAX_STATUS == MAX_STATUS and _p.MAX_TEXT_LEN == MAX_TEXT_LEN and _p.MAX_FLAGS == MAX_FLAGS
assert _p.MAX_RID == 2**64 - 1 and _p.REQUEST == 1 and _p.REPLY == 2


# -- reading ----------------------------------------------------------------------------------

cdef inline uint64_t _be(const uint8_t *p, int size) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(size):
        v = (v << 8) | p[i]
    return v


cdef inline bint _ascii(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] & 0x80:
            return False
    return True


cdef int _utf8_ok(const uint8_t *p, Py_ssize_t n) noexcept:
    """Whether Python's strict UTF-8 decoder (msgpack's, for str) takes these bytes."""
    if _ascii(p, n):
        return 1
    try:
        PyUnicode_DecodeUTF8(<const char *>p, n, NULL)
    except UnicodeDecodeError:
        return 0
    except BaseException:  # MemoryError: let the reference say what it says
        PyErr_Clear()
        return -1
    return 1


cdef int parse_header(const uint8_t *p, Py_ssize_t n, Item *items, int *count) noexcept:
    """Parse a header frame that is a flat array of scalars into ``items``.

    PARSE_BAD for input the reference refuses as "not_msgpack" (truncated, trailing bytes, an
    unused byte 0xc1, an array over 64 elements, invalid UTF-8); PARSE_OTHER for shapes left to
    the reference (the top level is not an array, or an element is a container or an ext)."""
    cdef Py_ssize_t pos = 1, length
    cdef uint8_t b
    cdef int i, cnt, sz, ok
    cdef int64_t sv
    if n < 1:
        return PARSE_BAD
    b = p[0]
    if 0x90 <= b <= 0x9f:
        cnt = b & 0x0f
    elif b == 0xdc or b == 0xdd:
        sz = 2 if b == 0xdc else 4
        if n < 1 + sz:
            return PARSE_BAD
        length = <Py_ssize_t>_be(p + 1, sz)
        if length > MAX_ITEMS:
            return PARSE_BAD
        cnt = <int>length
        pos = 1 + sz
    else:
        return PARSE_OTHER
    for i in range(cnt):
        if pos >= n:
            return PARSE_BAD
        b = p[pos]
        pos += 1
        items[i].s = NULL
        items[i].n = 0
        if b <= 0x7f:
            items[i].kind = K_UINT
            items[i].u = b
        elif b >= 0xe0:
            items[i].kind = K_NEG
            items[i].u = 0
        elif 0xa0 <= b <= 0xbf or b == 0xd9 or b == 0xda or b == 0xdb:
            if b <= 0xbf:
                length = b & 0x1f
            else:
                sz = 1 if b == 0xd9 else (2 if b == 0xda else 4)
                if pos + sz > n:
                    return PARSE_BAD
                length = <Py_ssize_t>_be(p + pos, sz)
                pos += sz
            if length > MAX_STR or length > n - pos:
                return PARSE_BAD
            ok = _utf8_ok(p + pos, length)
            if ok <= 0:
                return PARSE_BAD if ok == 0 else PARSE_OTHER
            items[i].kind = K_STR
            items[i].s = <const char *>(p + pos)
            items[i].n = length
            pos += length
        elif b == 0xc0:
            items[i].kind = K_NIL
        elif b == 0xc2:
            items[i].kind = K_FALSE
        elif b == 0xc3:
            items[i].kind = K_TRUE
        elif b == 0xc4 or b == 0xc5 or b == 0xc6:
            sz = 1 if b == 0xc4 else (2 if b == 0xc5 else 4)
            if pos + sz > n:
                return PARSE_BAD
            length = <Py_ssize_t>_be(p + pos, sz)
            pos += sz
            if length > MAX_STR or length > n - pos:
                return PARSE_BAD
            items[i].kind = K_BIN
            items[i].s = <const char *>(p + pos)
            items[i].n = length
            pos += length
        elif b == 0xca or b == 0xcb:
            sz = 4 if b == 0xca else 8
            if pos + sz > n:
                return PARSE_BAD
            items[i].kind = K_FLOAT
            pos += sz
        elif 0xcc <= b <= 0xcf:
            sz = 1 << (b - 0xcc)
            if pos + sz > n:
                return PARSE_BAD
            items[i].kind = K_UINT
            items[i].u = _be(p + pos, sz)
            pos += sz
        elif 0xd0 <= b <= 0xd3:
            sz = 1 << (b - 0xd0)
            if pos + sz > n:
                return PARSE_BAD
            if sz == 1:
                sv = <int8_t>p[pos]
            elif sz == 2:
                sv = <int16_t><uint16_t>_be(p + pos, 2)
            elif sz == 4:
                sv = <int32_t><uint32_t>_be(p + pos, 4)
            else:
                sv = <int64_t>_be(p + pos, 8)
            pos += sz
            if sv >= 0:
                items[i].kind = K_UINT
                items[i].u = <uint64_t>sv
            else:
                items[i].kind = K_NEG
                items[i].u = 0
        elif b == 0xc1:
            return PARSE_BAD
        else:  # fixmap, fixarray, array16/32, map16/32, ext: the reference knows those
            return PARSE_OTHER
    if pos != n:
        return PARSE_BAD  # msgpack's ExtraData
    count[0] = cnt
    return PARSE_OK


cdef inline object _text(const Item *it):
    return PyUnicode_DecodeUTF8(it.s, it.n, NULL)


cdef bint request_items_ok(const Item *items, int count) noexcept:
    """Whether the reference accepts these items as a REQUEST (every field's kind and range)."""
    if count < 7 or items[0].kind != K_UINT or items[0].u != 1:
        return False
    if items[1].kind != K_UINT or items[1].u < 1:
        return False
    if items[2].kind != K_STR or items[2].n < 1 or items[2].n > MAX_SERVICE_LEN:
        return False
    if items[3].kind != K_UINT or items[3].u < 1 or items[3].u > MAX_TIMEOUT_MS:
        return False
    if items[4].kind != K_UINT or items[4].u > MAX_ATTEMPT:
        return False
    if items[5].kind != K_UINT or items[5].u > MAX_FLAGS:
        return False
    return items[6].kind == K_NIL or ((items[6].kind == K_BIN or items[6].kind == K_STR)
                                      and items[6].n <= MAX_KEY_LEN)


cdef object request_or_none(Item *items, int count):
    """The Request the reference returns for these items, or None where it would refuse them."""
    if not request_items_ok(items, count):
        return None
    cdef int kk = items[6].kind
    if kk == K_NIL:
        key = None
    else:
        key = PyBytes_FromStringAndSize(items[6].s, items[6].n) if kk == K_BIN else _text(&items[6])
    return _tuple_new(_Request, (PyLong_FromUnsignedLongLong(items[1].u), _text(&items[2]), <long>items[3].u,
                                 <long>items[4].u, PyLong_FromUnsignedLongLong(items[5].u), key))


cdef inline bint _opt_text_ok(const Item *it) noexcept:
    return it.kind == K_NIL or (it.kind == K_STR and it.n <= MAX_TEXT_LEN)


cdef bint reply_items_ok(const Item *items, int count) noexcept:
    """Whether the reference accepts these items as a REPLY (every field's kind and range)."""
    if count < 6 or items[0].kind != K_UINT or items[0].u != 2:
        return False
    if items[1].kind != K_UINT or items[2].kind != K_UINT or items[2].u > MAX_STATUS:
        return False
    if items[3].kind != K_UINT or items[3].u > MAX_FLAGS:
        return False
    return _opt_text_ok(&items[4]) and _opt_text_ok(&items[5])


cdef object reply_or_none(Item *items, int count):
    """The Reply the reference returns for these items, or None where it would refuse them."""
    if not reply_items_ok(items, count):
        return None
    message = None if items[4].kind == K_NIL else _text(&items[4])
    error_type = None if items[5].kind == K_NIL else _text(&items[5])
    return _tuple_new(_Reply, (PyLong_FromUnsignedLongLong(items[1].u), <long>items[2].u,
                               PyLong_FromUnsignedLongLong(items[3].u), message, error_type))


assert _p.SIGNATURE == b"ZRT1"  # is_signature's constant


cdef bint is_signature(object frame) except -1:
    """Whether ``frame`` (any buffer) is the 4-byte signature: the first check of every message,
    shared by the compiled drains and the client's path."""
    cdef Py_buffer view
    cdef bint ok
    PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
    ok = view.len == 4 and memcmp(view.buf, b"ZRT1", 4) == 0
    PyBuffer_Release(&view)
    return ok


cdef object _decode(object frame, bint request):
    """The fast path's record for ``frame``, or None (the reference must decide)."""
    cdef Py_buffer view
    cdef Item items[MAX_ITEMS]
    cdef int count = 0
    try:
        PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
    except Exception:
        return None
    try:
        if view.itemsize != 1 or view.len > MAX_HEADER_SIZE:
            return None
        if parse_header(<const uint8_t *>view.buf, view.len, items, &count) != PARSE_OK:
            return None
        return request_or_none(items, count) if request else reply_or_none(items, count)
    finally:
        PyBuffer_Release(&view)


def decode_request(frame):
    """:func:`zrouter.protocol.decode_request`, compiled (same result on every input)."""
    msg = _decode(frame, True)
    return _py_decode_request(frame) if msg is None else msg


def decode_reply(frame):
    """:func:`zrouter.protocol.decode_reply`, compiled (same result on every input)."""
    msg = _decode(frame, False)
    return _py_decode_reply(frame) if msg is None else msg


def decode_worker_message(frame):
    """:func:`zrouter.protocol.decode_worker_message`, compiled for REPLY (the reference for
    every other command): same result on every input."""
    msg = _decode(frame, False)
    return _py_decode_worker_message(frame) if msg is None else msg


# -- writing ----------------------------------------------------------------------------------

cdef inline Py_ssize_t _put_be(uint8_t *out, uint64_t v, int size) noexcept nogil:
    cdef int i
    for i in range(size):
        out[i] = <uint8_t>(v >> (8 * (size - 1 - i)))
    return size


cdef inline Py_ssize_t _pack_uint(uint8_t *out, uint64_t v) noexcept nogil:
    if v < 0x80:
        out[0] = <uint8_t>v
        return 1
    if v < 0x100:
        out[0] = 0xcc
        return 1 + _put_be(out + 1, v, 1)
    if v < 0x10000:
        out[0] = 0xcd
        return 1 + _put_be(out + 1, v, 2)
    if v < <uint64_t>0x100000000ULL:
        out[0] = 0xce
        return 1 + _put_be(out + 1, v, 4)
    out[0] = 0xcf
    return 1 + _put_be(out + 1, v, 8)


cdef inline Py_ssize_t _pack_raw(uint8_t *out, const char *s, Py_ssize_t n, bint binary) noexcept nogil:
    cdef Py_ssize_t h
    cdef Py_ssize_t i
    if binary:
        if n < 0x100:
            out[0] = 0xc4
            h = 1 + _put_be(out + 1, n, 1)
        elif n < 0x10000:
            out[0] = 0xc5
            h = 1 + _put_be(out + 1, n, 2)
        else:
            out[0] = 0xc6
            h = 1 + _put_be(out + 1, n, 4)
    elif n < 32:
        out[0] = <uint8_t>(0xa0 | n)
        h = 1
    elif n < 0x100:
        out[0] = 0xd9
        h = 1 + _put_be(out + 1, n, 1)
    elif n < 0x10000:
        out[0] = 0xda
        h = 1 + _put_be(out + 1, n, 2)
    else:
        out[0] = 0xdb
        h = 1 + _put_be(out + 1, n, 4)
    for i in range(n):
        out[h + i] = <uint8_t>s[i]
    return h + n


cdef Py_ssize_t pack_request(uint8_t *out, uint64_t rid, const char *service, Py_ssize_t service_n,
                             uint64_t timeout_ms, uint64_t attempt, uint64_t flags, int key_kind,
                             const char *key, Py_ssize_t key_n) noexcept nogil:
    """A REQUEST header into ``out`` (room for 64 + service_n + key_n bytes); its length."""
    cdef Py_ssize_t pos = 2
    out[0] = 0x97
    out[1] = 0x01
    pos += _pack_uint(out + pos, rid)
    pos += _pack_raw(out + pos, service, service_n, False)
    pos += _pack_uint(out + pos, timeout_ms)
    pos += _pack_uint(out + pos, attempt)
    pos += _pack_uint(out + pos, flags)
    if key_kind == K_NIL:
        out[pos] = 0xc0
        pos += 1
    else:
        pos += _pack_raw(out + pos, key, key_n, key_kind == K_BIN)
    return pos


cdef Py_ssize_t pack_reply_head(uint8_t *out, uint64_t rid, uint64_t status, uint64_t flags) noexcept nogil:
    """The first four elements of a 6-element REPLY header (message and error_type follow)."""
    cdef Py_ssize_t pos = 2
    out[0] = 0x96
    out[1] = 0x02
    pos += _pack_uint(out + pos, rid)
    pos += _pack_uint(out + pos, status)
    pos += _pack_uint(out + pos, flags)
    return pos


cdef inline bint _u64(object o, uint64_t *out):
    """An exact int in 0..2**64-1, as the fast path takes it (False: leave it to the reference)."""
    if not PyLong_CheckExact(o):
        return False
    try:
        out[0] = PyLong_AsUnsignedLongLong(o)
    except OverflowError:  # negative, or past 64 bits
        return False
    return True


cdef inline bint _utf8(object o, const char **s, Py_ssize_t *n):
    """An exact str's UTF-8 of at most FAST_TEXT bytes (False: leave it to the reference)."""
    if not PyUnicode_CheckExact(o):
        return False
    try:
        s[0] = PyUnicode_AsUTF8AndSize(o, n)
    except UnicodeEncodeError:  # lone surrogates: the reference raises what msgpack raises
        return False
    return n[0] <= FAST_TEXT


def encode_request(rid, service, timeout_ms, attempt=0, flags=_p.FLAG_IDEMPOTENT, key=None):
    """:func:`zrouter.protocol.encode_request`, compiled (the same bytes for every input)."""
    cdef uint8_t buf[PACK_BUF]
    cdef uint64_t r, t, a, f
    cdef const char *s = NULL
    cdef const char *k = NULL
    cdef Py_ssize_t sn = 0, kn = 0
    cdef int kind
    if not (_u64(rid, &r) and _u64(timeout_ms, &t) and _u64(attempt, &a) and _u64(flags, &f)
            and _utf8(service, &s, &sn)):
        return _py_encode_request(rid, service, timeout_ms, attempt, flags, key)
    if key is None:
        kind = K_NIL
    elif PyBytes_CheckExact(key) and PyBytes_GET_SIZE(key) <= FAST_TEXT:
        kind = K_BIN
        k = PyBytes_AS_STRING(key)
        kn = PyBytes_GET_SIZE(key)
    elif _utf8(key, &k, &kn):
        kind = K_STR
    else:
        return _py_encode_request(rid, service, timeout_ms, attempt, flags, key)
    return PyBytes_FromStringAndSize(<char *>buf, pack_request(buf, r, s, sn, t, a, f, kind, k, kn))


def encode_reply(rid, status=_p.STATUS_OK, flags=0, message=None, error_type=None):
    """:func:`zrouter.protocol.encode_reply`, compiled (the same bytes for every input; text
    over MAX_TEXT_LEN bytes goes to the reference, which cuts it)."""
    cdef uint8_t buf[PACK_BUF]
    cdef uint64_t r, st, f
    cdef const char *m = NULL
    cdef const char *e = NULL
    cdef Py_ssize_t mn = 0, en = 0, pos
    if not (_u64(rid, &r) and _u64(status, &st) and _u64(flags, &f)
            and (message is None or (_utf8(message, &m, &mn) and mn <= MAX_TEXT_LEN))
            and (error_type is None or (_utf8(error_type, &e, &en) and en <= MAX_TEXT_LEN))):
        return _py_encode_reply(rid, status, flags, message, error_type)
    pos = pack_reply_head(buf, r, st, f)
    if m == NULL:
        buf[pos] = 0xc0
        pos += 1
    else:
        pos += _pack_raw(buf + pos, m, mn, False)
    if e == NULL:
        buf[pos] = 0xc0
        pos += 1
    else:
        pos += _pack_raw(buf + pos, e, en, False)
    return PyBytes_FromStringAndSize(<char *>buf, pos)
