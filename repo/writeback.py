"""Durable outputs without a long wait at the end: write-back starts while a restore writes.

A restore makes its output durable (``fsync``) before it gives it its final
name. On a machine with much memory the kernel starts writing dirty pages
only late, so the whole image would be written back during that one final
``fsync``. :class:`Writeback` asks the kernel (``sync_file_range`` with
``SYNC_FILE_RANGE_WRITE``, from a background thread) to start writing every
``every`` bytes, so that writing back overlaps fetching and decompressing,
and the final ``fsync`` has little left to do. Where the call is not
available, only the final ``fsync`` runs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable

from vmrepo.storage import libc

log = logging.getLogger(__name__)

SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable[[int], bool] | None:
    fn = libc.function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                           ctypes.c_uint])
    if fn is None:
        return None

    def start(fd: int) -> bool:
        return bool(fn(fd, 0, 0, SYNC_FILE_RANGE_WRITE) == 0)

    return start


_START = _sync_file_range()


class Writeback:
    """Starts write-back of ``fd`` as data is written; :meth:`finish` makes it durable."""

    def __init__(self, fd: int, every: int = 64 << 20) -> None:
        self.fd = fd
        self.every = every
        self._pending = 0
        self._lock = threading.Lock()
        self._due = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        if _START is not None:
            self._thread = threading.Thread(target=self._run, name="vmrepo-writeback",
                                            daemon=True)
            self._thread.start()

    def written(self, n: int) -> None:
        """``n`` more bytes were written."""
        if self._thread is None:
            return
        with self._lock:
            self._pending += n
            if self._pending >= self.every:
                self._pending = 0
                self._due.set()

    def _run(self) -> None:
        assert _START is not None
        while True:
            self._due.wait()
            self._due.clear()
            if self._stop:
                return
            if not _START(self.fd):
                log.debug("sync_file_range failed (errno %d): only the final fsync runs",
                          ctypes.get_errno())
                return

    def close(self) -> None:
        """Stop the background thread (nothing is made durable)."""
        if self._thread is not None:
            self._stop = True
            self._due.set()
            self._thread.join()
            self._thread = None

    def finish(self) -> None:
        """Make everything written durable."""
        self.close()
        os.fsync(self.fd)
