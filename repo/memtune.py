"""Keeps large buffers in the process heap between uses (glibc only).

The snapshot pipeline allocates and frees many buffers of 256 KiB to a few
MiB. By default glibc maps each one fresh from the kernel and unmaps it on
free, so every byte read costs a page fault; on virtual machines that
doubles the CPU time of a snapshot. Raising the mmap and trim thresholds
lets freed buffers be reused. Elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
from typing import Any

from vmrepo.storage import libc

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit
TRIM_THRESHOLD = 256 << 20


def _mallopt() -> Any | None:
    return libc.function("mallopt", [ctypes.c_int, ctypes.c_int])


def tune_malloc() -> bool:
    """Apply the thresholds; return whether the C library accepted them."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    trim_ok: bool = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return trim_ok and ok


def limit_malloc_arenas(arenas: int = 1) -> bool:
    """Let glibc keep at most ``arenas`` malloc arenas (call before starting threads).

    Threads each get an arena of their own by default, every one keeping freed buffers
    (the trim threshold above is raised): that doubled a server's peak RSS over its chunk
    cache. Every command keeps two (the CLI), a server one; neither costs speed."""
    mallopt = _mallopt()
    return mallopt is not None and mallopt(M_ARENA_MAX, arenas) == 1
