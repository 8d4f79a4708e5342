"""Keeps large buffers in the process heap between uses (glibc only).

The snapshot pipeline allocates and frees many buffers of 256 KiB to a few
MiB. By default glibc maps each one fresh from the kernel and unmaps it on
free, so every byte read costs a page fault; on virtual machines that
doubles the CPU time of a snapshot. Raising the mmap and trim thresholds
lets freed buffers be reused. Elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit
TRIM_THRESHOLD = 256 << 20


def tune_malloc() -> bool:
    """Apply the thresholds; return whether the C library accepted them."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    trim_ok: bool = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return trim_ok and ok
