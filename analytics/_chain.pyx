# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled twin of the writer's row hash (:func:`analytics.chain.compile_row_hasher`).

``RowHasher(plan, prefix, fallback).hash(prev, row)`` returns ``sha256(prev || prefix || canonical_json(row))``,
the same bytes as the pure-Python hasher (which stays the reference, and which ``audit verify``
uses): the canonical JSON is written straight into one C buffer instead of a dict handed to
json's encoder. ``plan``: ``(index, b'"name":', type code)`` for every column, in sorted key order
(:func:`analytics.chain.row_plan`). A row with a value whose type is not the one its column
normalizes to is hashed by the reference (``fallback``).

Built by setup.py (``pip install -e .`` in vagrant/provision.sh); where it is not built, the
reference runs (``analytics.chain.COMPILED``)."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_GET_LENGTH, PyUnicode_READ, PyUnicode_KIND, PyUnicode_DATA
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, strlen
from libc.stdio cimport snprintf
from libc.math cimport isnan, isinf


cdef extern from "Python.h":
    char *PyOS_double_to_string(double val, char format_code, int precision, int flags, int *ptype) except NULL
    int Py_DTSF_ADD_DOT_0
    void PyMem_Free(void *p)

cdef extern from "openssl/evp.h":
    ctypedef struct EVP_MD:
        pass
    ctypedef struct EVP_MD_CTX:
        pass
    EVP_MD *EVP_MD_fetch(void *libctx, const char *algorithm, const char *properties)
    EVP_MD_CTX *EVP_MD_CTX_new()
    int EVP_DigestInit_ex(EVP_MD_CTX *ctx, const EVP_MD *type, void *impl)
    int EVP_DigestUpdate(EVP_MD_CTX *ctx, const void *d, size_t cnt)
    int EVP_DigestFinal_ex(EVP_MD_CTX *ctx, unsigned char *md, unsigned int *s)

# SHA-256 fetched once (OpenSSL 3: an implicit fetch per digest costs more than the digest of a
# row). One context, used only while the GIL is held and with no Python call in between.
cdef EVP_MD *_SHA256 = EVP_MD_fetch(NULL, b"SHA256", NULL)
cdef EVP_MD_CTX *_CTX = EVP_MD_CTX_new()
if _SHA256 == NULL or _CTX == NULL:
    raise ImportError("OpenSSL's SHA-256 is not available")


cdef bytes _digest(const char *data, Py_ssize_t n):
    cdef unsigned char md[32]
    cdef unsigned int size = 0
    if (EVP_DigestInit_ex(_CTX, _SHA256, NULL) != 1 or EVP_DigestUpdate(_CTX, data, n) != 1
            or EVP_DigestFinal_ex(_CTX, md, &size) != 1 or size != 32):
        raise RuntimeError("OpenSSL's SHA-256 failed")
    return PyBytes_FromStringAndSize(<char *> md, 32)

# Type codes: the same numbers as analytics.chain.TYPE_CODES.
DEF T_STR = 0
DEF T_INT = 1       # int and ts (microseconds since the epoch)
DEF T_FLOAT = 2
DEF T_BOOL = 3
DEF T_BYTES = 4     # a lowercase hex string
DEF T_STR_LIST = 5
DEF T_COUNT_MAP = 6

cdef const char *_HEX = b"0123456789abcdef"
# json's short escapes: the letter after the backslash (0: written as \uXXXX).
cdef char _ESCAPE[128]
for _c in range(128):
    _ESCAPE[_c] = 0
for _c, _letter in ((34, b'"'), (92, b"\\"), (10, b"n"), (13, b"r"), (9, b"t"), (8, b"b"), (12, b"f")):
    _ESCAPE[_c] = _letter[0]


cdef struct Buf:
    char *data
    Py_ssize_t size
    Py_ssize_t cap


cdef int _grow(Buf *b, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap = b.cap * 2
    cdef char *p
    if cap < b.size + need:
        cap = b.size + need + 256
    p = <char *> realloc(b.data, cap)
    if p == NULL:
        raise MemoryError()
    b.data, b.cap = p, cap
    return 0


cdef inline int _put(Buf *b, const char *s, Py_ssize_t n) except -1:
    if b.size + n > b.cap:
        _grow(b, n)
    memcpy(b.data + b.size, s, n)
    b.size += n
    return 0


cdef inline int _putc(Buf *b, char c) except -1:
    if b.size + 1 > b.cap:
        _grow(b, 1)
    b.data[b.size] = c
    b.size += 1
    return 0


cdef inline int _put_u4(Buf *b, unsigned int c) except -1:
    cdef char esc[6]
    esc[0] = 92  # backslash
    esc[1] = 117  # u
    esc[2] = _HEX[(c >> 12) & 15]
    esc[3] = _HEX[(c >> 8) & 15]
    esc[4] = _HEX[(c >> 4) & 15]
    esc[5] = _HEX[c & 15]
    return _put(b, esc, 6)


cdef int _put_str(Buf *b, str s) except -1:
    """json's encode_basestring_ascii: quotes, the short escapes, every other character outside
    ' '..'~' as \\uXXXX (a surrogate pair above U+FFFF)."""
    cdef Py_ssize_t i, n = PyUnicode_GET_LENGTH(s)
    cdef int kind = PyUnicode_KIND(s)
    cdef void *data = PyUnicode_DATA(s)
    cdef unsigned int c, v
    cdef const unsigned char *p
    if b.size + n + 2 > b.cap:
        _grow(b, n + 2)
    _putc(b, 34)
    if kind == 1:  # the common case: nothing to escape, one copy
        p = <const unsigned char *> data
        i = 0
        while i < n and p[i] >= 32 and p[i] <= 126 and p[i] != 34 and p[i] != 92:
            i += 1
        if i == n:
            memcpy(b.data + b.size, p, n)
            b.size += n
            _putc(b, 34)
            return 0
    for i in range(n):
        c = PyUnicode_READ(kind, data, i)
        if c >= 32 and c <= 126 and c != 34 and c != 92:
            _putc(b, <char> c)
        elif c < 128 and _ESCAPE[c]:
            _putc(b, 92)
            _putc(b, _ESCAPE[c])
        elif c >= 0x10000:
            v = c - 0x10000
            _put_u4(b, 0xd800 | ((v >> 10) & 0x3ff))
            _put_u4(b, 0xdc00 | (v & 0x3ff))
        else:
            _put_u4(b, c)
    _putc(b, 34)
    return 0


cdef int _put_int(Buf *b, long long v) except -1:
    cdef char tmp[32]
    cdef int n = snprintf(tmp, 32, "%lld", v)
    return _put(b, tmp, n)


cdef inline bint _int64(object v, long long *out):
    """v is an int (not a bool) inside 64 bits: its value in out."""
    if type(v) is not int:
        return False
    try:
        out[0] = v
    except OverflowError:
        return False
    return True


cdef int _put_float(Buf *b, double v) except -1:
    """float.__repr__ (what json writes for a finite float), NaN and Infinity as json does."""
    cdef char *r
    if isnan(v):
        return _put(b, b"NaN", 3)
    if isinf(v):
        return _put(b, b"Infinity", 8) if v > 0 else _put(b, b"-Infinity", 9)
    r = PyOS_double_to_string(v, b'r', 0, Py_DTSF_ADD_DOT_0, NULL)
    try:
        _put(b, r, strlen(r))
    finally:
        PyMem_Free(r)
    return 0


cdef int _put_hex(Buf *b, bytes v) except -1:
    cdef Py_ssize_t i, n = PyBytes_GET_SIZE(v)
    cdef const unsigned char *p = <const unsigned char *> PyBytes_AS_STRING(v)
    if b.size + 2 * n + 2 > b.cap:
        _grow(b, 2 * n + 2)
    b.data[b.size] = 34
    b.size += 1
    for i in range(n):
        b.data[b.size] = _HEX[p[i] >> 4]
        b.data[b.size + 1] = _HEX[p[i] & 15]
        b.size += 2
    b.data[b.size] = 34
    b.size += 1
    return 0


cdef int _put_value(Buf *b, int code, object v) except -1:
    """1: written; 0: not the type the column normalizes to (the reference decides)."""
    cdef Py_ssize_t i
    cdef object x
    cdef long long n
    if code == T_STR:
        if type(v) is not str:
            return 0
        _put_str(b, v)
    elif code == T_INT:
        if not _int64(v, &n):
            return 0
        _put_int(b, n)
    elif code == T_FLOAT:
        if type(v) is not float:
            return 0
        _put_float(b, v)
    elif code == T_BOOL:
        if v is True:
            _put(b, b"true", 4)
        elif v is False:
            _put(b, b"false", 5)
        else:
            return 0
    elif code == T_BYTES:
        if type(v) is not bytes:
            return 0
        _put_hex(b, v)
    elif code == T_STR_LIST:
        if type(v) is not list:
            return 0
        _putc(b, 91)
        for i in range(len(<list> v)):
            if i:
                _putc(b, 44)
            x = (<list> v)[i]
            if x is None:
                _put(b, b"null", 4)
            elif type(x) is str:
                _put_str(b, x)
            else:
                return 0
        _putc(b, 93)
    elif code == T_COUNT_MAP:
        if type(v) is not dict:
            return 0
        _putc(b, 123)
        i = 0
        for k, x in (<dict> v).items():
            if type(k) is not str or not _int64(x, &n):
                return 0
            if i:
                _putc(b, 44)
            i += 1
            _put_str(b, k)
            _putc(b, 58)
            _put_int(b, n)
        _putc(b, 125)
    else:
        return 0
    return 1


cdef class RowHasher:
    """``RowHasher(plan, prefix, fallback).hash(prev, row)``: sha256(prev || prefix || canonical
    JSON of row). ``fallback(prev, row)`` (the reference) decides a row with a value of a type its
    column does not normalize to. The plan is unpacked once into C arrays."""

    cdef Py_ssize_t n
    cdef Py_ssize_t *index
    cdef int *code
    cdef tuple keys
    cdef bytes prefix
    cdef object fallback

    def __cinit__(self, tuple plan, bytes prefix not None, object fallback):
        cdef Py_ssize_t i
        self.n = len(plan)
        self.index = <Py_ssize_t *> malloc(max(self.n, 1) * sizeof(Py_ssize_t))
        self.code = <int *> malloc(max(self.n, 1) * sizeof(int))
        if self.index == NULL or self.code == NULL:
            raise MemoryError()
        keys = []
        for i in range(self.n):
            index, key, code = plan[i]
            if type(key) is not bytes or not 0 <= index < self.n or not T_STR <= code <= T_COUNT_MAP:
                raise ValueError("a row plan step is (column index, key bytes, type code)")
            self.index[i], self.code[i] = index, code
            keys.append(key)
        self.keys = tuple(keys)
        self.prefix = prefix
        self.fallback = fallback

    def __dealloc__(self):
        free(self.index)
        free(self.code)

    def hash(self, object prev, object row):
        cdef Buf b
        cdef bint first = True
        cdef Py_ssize_t i, n = self.n
        cdef object v
        cdef bytes key
        if type(prev) is not bytes or type(row) is not tuple or len(<tuple> row) != n:
            return self.fallback(prev, row)
        b.cap = 512
        b.size = 0
        b.data = <char *> malloc(b.cap)
        if b.data == NULL:
            raise MemoryError()
        try:
            _put(&b, PyBytes_AS_STRING(prev), PyBytes_GET_SIZE(prev))
            _put(&b, PyBytes_AS_STRING(self.prefix), PyBytes_GET_SIZE(self.prefix))
            _putc(&b, 123)
            for i in range(n):
                v = (<tuple> row)[self.index[i]]
                if v is None:
                    continue
                if not first:
                    _putc(&b, 44)
                first = False
                key = <bytes> self.keys[i]
                _put(&b, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
                if not _put_value(&b, self.code[i], v):
                    return self.fallback(prev, row)
            _putc(&b, 125)
            return _digest(b.data, b.size)
        finally:
            free(b.data)
