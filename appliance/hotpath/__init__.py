"""The byte-level hot paths of the PostgreSQL relay and of masking: compiled when the extension
``_compiled`` is built (setup.py, at ``pip install``), else the pure-Python reference
(:mod:`appliance.hotpath.reference`), which is also the specification the compiled code is tested
against byte for byte (tests/test_hotpath.py).

``BOTWARDEN_PURE_PYTHON=1`` in the environment forces the reference (how the suite runs the
fallback); ``COMPILED`` says which one this process uses.
"""

from __future__ import annotations

import os

from . import reference

if os.environ.get("BOTWARDEN_PURE_PYTHON", "") not in ("", "0"):
    _impl = reference
else:
    try:
        from . import _compiled as _impl
    except ImportError:  # not built (a source checkout without a compiler): the reference runs
        _impl = reference

COMPILED: bool = _impl is not reference

skip_unhandled = _impl.skip_unhandled
skip_recorded = _impl.skip_recorded
skip_rows = _impl.skip_rows
row_values = _impl.row_values
encode_row = _impl.encode_row
partial_utf8 = _impl.partial_utf8
mask_rows = _impl.mask_rows
partial = reference.partial  # str in, str out: only partial_utf8 is compiled

__all__ = ["COMPILED", "skip_unhandled", "skip_recorded", "skip_rows", "row_values", "encode_row", "partial_utf8", "mask_rows", "partial", "reference"]
