# cython: language_level=3, boundscheck=False, wraparound=False
"""The compiled twin of a kind's record validator (:func:`analytics.schema.normalize`).

``Normalizer(spec, helpers, fallback)(record)`` returns the same row as ``fallback(record)``, the
straight-line Python that ``analytics.schema._compile_normalizer`` generates (which stays the
reference): every field read from the dict in column order, the common cases checked here in C
(an exact ``str`` of ASCII text, an ``int`` in 64-bit range, a ``float``, a ``datetime`` in UTC,
a list of ASCII ``str`` or None, absent or None where the field may be), the rest given to the reference's own helper for that
type (any other list of str, a count map, bytes, a bool: the same function, the same result). Anything
else (a record that is not a dict, a required field missing, a value of another type, non-ASCII
text, a value outside a field's choices, a time zone other than UTC) is handed whole to
``fallback``, which returns the row or raises the error naming the field, as it always has.

Built by setup.py (``pip install -e .`` in vagrant/provision.sh); where it is not built, or with
``BOTWARDEN_PURE_PYTHON=1``, the reference runs (``analytics.schema.COMPILED``).
tests/test_schema_compiled.py holds the two to the same rows and the same errors (Hypothesis)."""

from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.ref cimport Py_INCREF
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.datetime cimport (import_datetime, datetime_tzinfo, datetime_year, datetime_month, datetime_day,
                               datetime_hour, datetime_minute, datetime_second, datetime_microsecond)
import datetime as _dt

cdef extern from "Python.h":
    int PyUnicode_IS_ASCII(object o)

import_datetime()

DEF T_OTHER = 0     # the reference's helper for the type decides (and converts)
DEF T_STR = 1
DEF T_TS = 2
DEF T_INT = 3
DEF T_FLOAT = 4
DEF T_STR_LIST = 5  # checked here when every item is None or ASCII str, else by the reference's helper

cdef object _UTC = _dt.timezone.utc
cdef type _DATETIME = _dt.datetime
_CODES = {"str": T_STR, "ts": T_TS, "int": T_INT, "float": T_FLOAT, "str_list": T_STR_LIST}


cdef inline long long _days_from_civil(long long y, long long m, long long d):
    # Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
    y -= m <= 2
    cdef long long era = (y if y >= 0 else y - 399) // 400
    cdef long long yoe = y - era * 400
    cdef long long doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    cdef long long doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef inline bint _ascii_items(list items):
    cdef object x
    for x in items:
        if x is not None and (type(x) is not str or not PyUnicode_IS_ASCII(x)):
            return False
    return True


cdef class Normalizer:
    cdef tuple names
    cdef tuple codes
    cdef tuple required
    cdef tuple choices
    cdef tuple helpers
    cdef object fallback
    cdef Py_ssize_t n

    def __init__(self, spec, helpers, fallback):
        """``spec``: the kind's (name, type, required, choices) per column; ``helpers``: the
        reference's check function per column for the types handled there (None for the others);
        ``fallback``: the reference normalizer of the kind."""
        self.names = tuple(f[0] for f in spec)
        self.codes = tuple(_CODES.get(f[1], T_OTHER) for f in spec)
        self.required = tuple(bool(f[2]) for f in spec)
        self.choices = tuple(f[3] for f in spec)
        self.helpers = tuple(helpers)
        self.fallback = fallback
        self.n = len(spec)
        if len(self.helpers) != self.n:
            raise ValueError("one helper (or None) per column")

    def __call__(self, record):
        if type(record) is not dict:
            return self.fallback(record)
        cdef Py_ssize_t i
        cdef int code, overflow
        cdef PyObject *p
        cdef object v, row, tz, choices
        cdef long long us
        row = PyTuple_New(self.n)
        for i in range(self.n):
            p = PyDict_GetItem(record, self.names[i])
            if p == NULL or <object> p is None:
                if self.required[i]:
                    return self.fallback(record)
                v = None
            else:
                v = <object> p
                code = self.codes[i]
                if code == T_STR:
                    if type(v) is not str or not PyUnicode_IS_ASCII(v):
                        return self.fallback(record)
                    choices = self.choices[i]
                    if choices is not None and v not in choices:
                        return self.fallback(record)
                elif code == T_INT:
                    if type(v) is not int:
                        return self.fallback(record)
                    PyLong_AsLongLongAndOverflow(v, &overflow)
                    if overflow:
                        return self.fallback(record)
                elif code == T_FLOAT:
                    if type(v) is not float:
                        return self.fallback(record)
                elif code == T_TS:
                    if type(v) is not _DATETIME:
                        return self.fallback(record)
                    tz = datetime_tzinfo(v)
                    if tz is not _UTC:
                        return self.fallback(record)
                    us = (_days_from_civil(datetime_year(v), datetime_month(v), datetime_day(v)) * 86400
                          + datetime_hour(v) * 3600 + datetime_minute(v) * 60 + datetime_second(v)) * 1000000 \
                        + datetime_microsecond(v)
                    v = us
                elif code == T_STR_LIST and type(v) is list and _ascii_items(v):
                    v = list(v)
                else:
                    v = self.helpers[i](v)
            Py_INCREF(v)
            PyTuple_SET_ITEM(row, i, v)
        return row
