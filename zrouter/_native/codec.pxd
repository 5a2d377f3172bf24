# cython: language_level=3
"""C-level API of the compiled codec, for the other compiled modules (cimport)."""

from libc.stdint cimport uint8_t, uint64_t, int64_t

# What one msgpack element of a header is, as far as the per-request checks need to know.
cdef enum:
    K_NIL = 0
    K_FALSE = 1
    K_TRUE = 2
    K_UINT = 3      # any integer >= 0, whatever its msgpack format
    K_NEG = 4       # an integer < 0
    K_FLOAT = 5
    K_STR = 6       # UTF-8 already validated
    K_BIN = 7

# Results of parse_header.
cdef enum:
    PARSE_OK = 0
    PARSE_BAD = -1      # not one msgpack value within the limits: always "not_msgpack"
    PARSE_OTHER = -2    # a shape the fast path leaves to the Python reference (nested, ext, not an array)

cdef enum:
    MAX_ITEMS = 64      # msgpack's max_array_len in zrouter.protocol

# zrouter.protocol's limits (codec.pyx asserts they agree at import).
cdef enum:
    MAX_HEADER_SIZE = 8192
    MAX_SERVICE_LEN = 255
    MAX_KEY_LEN = 255
    MAX_TIMEOUT_MS = 86400000
    MAX_ATTEMPT = 255
    MAX_STATUS = 255
    MAX_TEXT_LEN = 1024

cdef struct Item:
    int kind
    uint64_t u
    const char *s
    Py_ssize_t n

cdef bint is_signature(object frame) except -1
cdef int parse_header(const uint8_t *p, Py_ssize_t n, Item *items, int *count) noexcept
cdef bint request_items_ok(const Item *items, int count) noexcept
cdef bint reply_items_ok(const Item *items, int count) noexcept
cdef object request_or_none(Item *items, int count)
cdef object reply_or_none(Item *items, int count)
cdef Py_ssize_t pack_request(uint8_t *out, uint64_t rid, const char *service, Py_ssize_t service_n,
                             uint64_t timeout_ms, uint64_t attempt, uint64_t flags, int key_kind,
                             const char *key, Py_ssize_t key_n) noexcept nogil
cdef Py_ssize_t pack_reply_head(uint8_t *out, uint64_t rid, uint64_t status, uint64_t flags) noexcept nogil
