# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled twins of :mod:`appliance.hotpath.reference` (same names, same bytes out).

Built by setup.py (``pip install -e .`` in vagrant/provision.sh); where it is not built, the
reference runs. Inputs are bytes or bytearray (the relay's buffers); anything else is handed
to the reference."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.ref cimport PyObject
from libc.string cimport memcpy

from appliance.protocols.postgres.errors import RemoteProtocolError
from appliance.hotpath import reference as _ref


cdef inline bint _view(object buf, const unsigned char **data, Py_ssize_t *size):
    if type(buf) is bytes:
        data[0] = <const unsigned char *> PyBytes_AS_STRING(buf)
        size[0] = PyBytes_GET_SIZE(buf)
        return True
    if type(buf) is bytearray:
        data[0] = <const unsigned char *> PyByteArray_AS_STRING(buf)
        size[0] = PyByteArray_GET_SIZE(buf)
        return True
    return False


cdef inline long _i32(const unsigned char *p) noexcept nogil:
    return <int>((<unsigned int>p[0] << 24) | (<unsigned int>p[1] << 16) | (<unsigned int>p[2] << 8) | p[3])


def skip_unhandled(list handlers, object buf, Py_ssize_t pos, long max_size):
    cdef const unsigned char *data
    cdef Py_ssize_t n, e
    cdef long length
    if not _view(buf, &data, &n) or PyList_GET_SIZE(handlers) != 256:
        return _ref.skip_unhandled(handlers, buf, pos, max_size)
    if pos < 0:
        return pos
    while n - pos >= 5:
        length = _i32(data + pos + 1)
        if length < 4 or length > max_size:
            return pos
        e = pos + 1 + length
        if e > n or <object>PyList_GET_ITEM(handlers, data[pos]) is not None:
            return pos
        pos = e
    return pos


def skip_recorded(list stops, object buf, Py_ssize_t pos, long shortest):
    cdef const unsigned char *data
    cdef Py_ssize_t n, e
    cdef long length
    if not _view(buf, &data, &n) or PyList_GET_SIZE(stops) != 256:
        return _ref.skip_recorded(stops, buf, pos, shortest)
    if pos < 0:
        return pos
    while n - pos >= 5:
        length = _i32(data + pos + 1)
        if length < 4:
            return pos
        e = pos + 1 + length
        if e > n:
            return pos
        if <object>PyList_GET_ITEM(stops, data[pos]) is not None and not (
                data[pos] == 0x42 and shortest > 0 and _short_text_bind(data, pos + 5, e, shortest)):
            return pos
        pos = e
    return pos


def skip_rows(object buf, Py_ssize_t pos, long budget, int kind=0x44):
    cdef const unsigned char *data
    cdef Py_ssize_t n, e, start = pos
    cdef long length, rows = 0
    if not _view(buf, &data, &n):
        return _ref.skip_rows(buf, pos, budget, kind)
    if pos < 0:
        return pos, 0
    while n - pos >= 5 and data[pos] == kind:
        length = _i32(data + pos + 1)
        if length < 4:
            break
        e = pos + 1 + length
        if e > n or (budget >= 0 and e - start > budget):
            break
        pos = e
        rows += 1
    return pos, rows


cdef inline long _i16(const unsigned char *p) noexcept nogil:
    return <short>((<unsigned int>p[0] << 8) | p[1])


cdef bint _short_text_bind(const unsigned char *d, Py_ssize_t p, Py_ssize_t e, long shortest) noexcept nogil:
    cdef long nf, nv, ln, i, k
    for k in range(2):  # the portal's and the statement's names
        while p < e and d[p] != 0:
            p += 1
        if p >= e:
            return False
        p += 1
    if e - p < 2:
        return False
    nf = _i16(d + p)
    p += 2
    if nf < 0 or e - p < 2 * nf:
        return False
    for i in range(nf):
        if d[p] != 0 or d[p + 1] != 0:
            return False   # a binary parameter
        p += 2
    if e - p < 2:
        return False
    nv = _i16(d + p)
    p += 2
    if nv < 0:
        return False
    for i in range(nv):
        if e - p < 4:
            return False
        ln = _i32(d + p)
        if ln >= shortest or ln < -1:
            return False
        p += 4
        if ln > 0:
            if e - p < ln:
                return False
            p += ln
    return True


def row_values(object buf, Py_ssize_t start, Py_ssize_t end):
    cdef const unsigned char *data
    cdef Py_ssize_t size
    if not _view(buf, &data, &size) or start < 0 or end > size or end < start:
        return _ref.row_values(buf, start, end)
    return _row_values(data, start, end)


cdef list _row_values(const unsigned char *data, Py_ssize_t start, Py_ssize_t end):
    cdef Py_ssize_t pos, i, ncols
    cdef long ln
    cdef list out
    if end - start < 7:
        raise RemoteProtocolError("malformed DataRow: unpack_from requires a buffer of at least 2 bytes")
    ncols = (<Py_ssize_t>data[start + 5] << 8) | data[start + 6]
    pos = start + 7
    out = [None] * ncols
    for i in range(ncols):
        if end - pos < 4:
            raise RemoteProtocolError("malformed DataRow: truncated value length")
        ln = _i32(data + pos)
        pos += 4
        if ln >= 0:
            if pos + ln > end:
                raise RemoteProtocolError("DataRow values do not match its length")
            out[i] = PyBytes_FromStringAndSize(<const char *> data + pos, ln)
            pos += ln
    if pos != end:
        raise RemoteProtocolError("DataRow values do not match its length")
    return out


cdef inline void _put_i32(unsigned char *p, long v) noexcept nogil:
    cdef unsigned int u = <unsigned int> v
    p[0] = (u >> 24) & 0xff
    p[1] = (u >> 16) & 0xff
    p[2] = (u >> 8) & 0xff
    p[3] = u & 0xff


def encode_row(values):
    return _encode_row(values)


cdef object _encode_row(object values):
    cdef Py_ssize_t count, size, i, ln
    cdef object v
    cdef bytes result
    cdef unsigned char *p
    if type(values) is not list and type(values) is not tuple:
        return _ref.encode_row(values)
    count = len(values)
    if count > 0xffff:
        return _ref.encode_row(values)  # the reference raises struct.error, as it always did
    size = 6
    for v in values:
        if v is None:
            size += 4
        elif type(v) is bytes:
            size += 4 + PyBytes_GET_SIZE(v)
        else:
            return _ref.encode_row(values)
    result = PyBytes_FromStringAndSize(NULL, size + 1)
    p = <unsigned char *> PyBytes_AS_STRING(result)
    p[0] = 68  # 'D'
    _put_i32(p + 1, size)
    p[5] = (count >> 8) & 0xff
    p[6] = count & 0xff
    p += 7
    for v in values:
        if v is None:
            _put_i32(p, -1)
            p += 4
        else:
            ln = PyBytes_GET_SIZE(v)
            _put_i32(p, ln)
            memcpy(p + 4, PyBytes_AS_STRING(v), ln)
            p += 4 + ln
    return result


cdef inline bint _alnum(unsigned char c) noexcept nogil:
    return (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122)


cdef bytes _STARS = b"********"


def partial_utf8(bytes raw not None, long keep):
    """reference.partial_utf8 for ASCII values in C; anything else goes to the reference."""
    return _partial_utf8(raw, keep)


cdef object _partial_utf8(bytes raw, long keep):
    cdef const unsigned char *data = <const unsigned char *> PyBytes_AS_STRING(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw), i, j
    cdef long seen = 0
    cdef bint head_has_alnum = False
    cdef bytes result
    cdef unsigned char *out
    for j in range(n):
        if data[j] >= 128:
            return _ref.partial_utf8(raw, keep)
    i = n
    while i > 0 and seen < keep:
        i -= 1
        if _alnum(data[i]):
            seen += 1
    for j in range(i):
        if _alnum(data[j]):
            head_has_alnum = True
            break
    if seen < keep or not head_has_alnum:
        if not seen:
            return _STARS
        i = n  # mask it whole
    # A new object, then written: PyBytes_FromStringAndSize(data, 1) would hand back CPython's
    # shared one-byte object, and writing into it would change that byte everywhere.
    result = PyBytes_FromStringAndSize(NULL, n)
    out = <unsigned char *> PyBytes_AS_STRING(result)
    memcpy(out, data, n)
    for j in range(i):
        if _alnum(out[j]):
            out[j] = 42  # '*'
    return result



def mask_rows(object buf, Py_ssize_t pos, Py_ssize_t n, list steps, list counts):
    """reference.mask_rows: the same loop, each row through the compiled functions above."""
    cdef const unsigned char *data
    cdef Py_ssize_t size, e, k, i, nsteps = len(steps)
    cdef long length, keep
    cdef list parts = [], values
    cdef bint changed, changed_any = False
    cdef object new, old
    if not _view(buf, &data, &size) or n > size or pos < 0:
        return _ref.mask_rows(buf, pos, n, steps, counts)
    cdef list idx = [s[0] for s in steps]
    cdef list keeps = [s[1] for s in steps]
    while n - pos >= 5 and data[pos] == 68:
        length = _i32(data + pos + 1)
        e = pos + 1 + length
        if length < 4 or e > n:
            break
        values = _row_values(data, pos, e)
        changed = False
        for k in range(nsteps):
            i = idx[k]
            if i < len(values):
                old = values[i]
                if old is not None:
                    new = _partial_utf8(<bytes> old, keeps[k])
                    if new != old:
                        values[i] = new
                        counts[k] += 1
                        changed = True
        if changed:
            parts.append(_encode_row(values))
            changed_any = True
        else:
            parts.append(PyBytes_FromStringAndSize(<const char *> data + pos, e - pos))
        pos = e
    return pos, (b"".join(parts) if changed_any else None)
