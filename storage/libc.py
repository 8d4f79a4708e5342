"""Functions of the C library that Python's ``os`` module lacks, looked up once.

:func:`function` gives a ctypes function of the C library (``errno`` kept for
``ctypes.get_errno``), or None where there is no C library or it lacks the
function (other systems, other C libraries): callers then do without it.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any


@functools.cache
def _library() -> ctypes.CDLL | None:
    # The process's own symbols, the C library's among them: no search for the library
    # (ctypes.util.find_library runs ldconfig, 13 ms of every command's start).
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def function(name: str, argtypes: list[Any], restype: Any = ctypes.c_int) -> Any | None:
    """The C library's ``name`` with these argument and result types, or None."""
    lib = _library()
    if lib is None:
        return None
    try:
        fn = lib[name]  # a function object of its own (getattr would share one, types too)
    except AttributeError:
        return None
    fn.argtypes = argtypes
    fn.restype = restype
    return fn
