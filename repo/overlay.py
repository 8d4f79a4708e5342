"""The local overlay of a writable snapshot export: the guest's writes, never the repository.

One overlay per disk in a directory the user names, two files:

* ``DISK.overlay``: a sparse raw file of the disk's size holding every chunk
  the guest has written to (copied whole from the snapshot together with the
  new bytes on the first write into it, one lock per stripe of chunks
  ordering that against other writers; from then on the chunk is the
  overlay's);
* ``DISK.map``: a 4 KiB JSON header naming the repository, snapshot, disk,
  size and chunk size, then one byte per chunk, 1 where the chunk is the
  overlay's.

Zeros and trims punch holes into the overlay file. A flush makes the written
data durable first, then the map bytes of the chunks taken over since the
last flush, so a map never names a chunk whose data might be missing after a
crash. An overlay is locked (``flock``) while served; serving the same
snapshot with the same directory again continues from it, another snapshot
is refused. Deleting the directory throws the writes away.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmrepo.storage.local import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    fallocate,
    fsync_dir,
)

from .errors import OutputError, RestoreError
from .output import output_error

log = logging.getLogger(__name__)

HEADER = 4096
MAGIC = "vmrepo-overlay"
MAP_PAGE = 4096
_ZEROS = bytes(1 << 20)
_STRIPES = 64

#: The snapshot's bytes of a chunk by index; None where the chunk is all zeros.
BaseChunk = Callable[[int], bytes | None]


class Overlay:
    """One disk's overlay; its methods may be called from many threads."""

    def __init__(self, directory: Path, disk: str, size: int, chunk_size: int,
                 identity: dict[str, Any]) -> None:
        self.data_path = directory / f"{disk}.overlay"
        self.map_path = directory / f"{disk}.map"
        self.size, self.chunk_size = size, chunk_size
        chunks = (size + chunk_size - 1) // chunk_size
        header = {"format": MAGIC, "version": 1, "disk": disk, "size": size,
                  "chunk_size": chunk_size, **identity}
        self._lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._dirty: set[int] = set()
        self._data = self._map = -1
        try:
            self._map = os.open(self.map_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(self._map, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RestoreError(f"the overlay {self.map_path} is in use by another "
                                   "vmrepo serve", str(directory)) from None
            found = os.pread(self._map, HEADER, 0)
            self.resumed = bool(found.strip(b"\0"))
            if self.resumed:
                self._check_header(found, header, directory)
                self.mapped = bytearray(os.pread(self._map, chunks, HEADER).ljust(chunks,
                                                                                     b"\0"))
            else:
                raw = json.dumps(header, sort_keys=True).encode()
                os.pwrite(self._map, raw.ljust(HEADER, b"\0"), 0)
                os.ftruncate(self._map, HEADER + chunks)
                self.mapped = bytearray(chunks)
            self._data = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if os.fstat(self._data).st_size != size:
                os.ftruncate(self._data, size)
            if not self.resumed:
                os.fsync(self._data)
                os.fsync(self._map)
                fsync_dir(directory)
        except OSError as exc:
            self.close()
            raise output_error(exc, directory, "keep the overlay in") from None
        except BaseException:
            self.close()
            raise

    def _check_header(self, found: bytes, header: dict[str, Any], directory: Path) -> None:
        try:
            have = json.loads(found.rstrip(b"\0"))
        except ValueError:
            have = None
        if not isinstance(have, dict) or have.get("format") != MAGIC:
            raise RestoreError(f"{self.map_path} is not a vmrepo overlay map: choose another "
                               "directory", str(directory))
        if have != header:
            what = f"{have.get('vm')}@{str(have.get('snapshot'))[:8]} disk {have.get('disk')}"
            raise RestoreError(f"{directory} holds the overlay of another snapshot ({what}): "
                               "give another directory, or delete it to throw those writes "
                               "away", str(directory))

    @property
    def chunks_mapped(self) -> int:
        return self.mapped.count(1)

    def is_mapped(self, index: int) -> bool:
        return bool(self.mapped[index])

    def take(self, index: int) -> None:
        """Chunk ``index`` is the overlay's from now on (its data is written)."""
        with self._lock:
            if not self.mapped[index]:
                self.mapped[index] = 1
                self._dirty.add(index)

    # -- writes --------------------------------------------------------------

    def write(self, offset: int, length: int, data: memoryview | None,
              base: BaseChunk) -> None:
        """Write ``data`` (None: zeros) over ``[offset, offset + length)``; a chunk not held
        yet is first taken over from ``base``."""
        pos = 0
        end = offset + length
        while pos < length:
            index, lo = divmod(offset + pos, self.chunk_size)
            n = min(end, (index + 1) * self.chunk_size, self.size) - offset - pos
            self._write_chunk(index, lo, n, None if data is None else data[pos : pos + n],
                              base)
            pos += n

    def _write_chunk(self, index: int, lo: int, n: int, data: memoryview | None,
                     base: BaseChunk) -> None:
        start = index * self.chunk_size
        clen = min(self.chunk_size, self.size - start)
        if not self.mapped[index]:
            with self._stripes[index % _STRIPES]:
                if not self.mapped[index]:
                    old = b"" if lo == 0 and n == clen else base(index)
                    if old == b"":  # the whole chunk is written
                        self.zero(start, clen) if data is None else self.pwrite(start, data)
                    elif old is None:  # into a zero chunk
                        if data is None:
                            return  # zeros over zeros
                        self.zero(start, clen)  # bytes a crash may have left there
                        self.pwrite(start + lo, data)
                    else:
                        whole = bytearray(old)
                        whole[lo : lo + n] = bytes(n) if data is None else data
                        self.pwrite(start, whole)
                    self.take(index)
                    return
        if data is None:
            self.zero(start + lo, n)
        else:
            self.pwrite(start + lo, data)

    # -- data ----------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._data, length, offset)
        if len(data) < length:  # the file is never shorter than the disk, but be safe
            data += bytes(length - len(data))
        return data

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._data, view, offset)
            view, offset = view[n:], offset + n

    def zero(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` read as zeros, as a hole where possible."""
        if fallocate(self._data, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        end = offset + length
        while offset < end:
            n = min(len(_ZEROS), end - offset)
            self.pwrite(offset, memoryview(_ZEROS)[:n])
            offset += n

    def holes(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """``[offset, offset + length)`` as consecutive ``(length, is_hole)`` runs."""
        out: list[tuple[int, bool]] = []
        end = offset + length
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self._data, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    return [(length, False)]
                data = end
            if data > pos:
                out.append((min(data, end) - pos, True))
                pos = min(data, end)
                continue
            hole = min(os.lseek(self._data, pos, os.SEEK_HOLE), end)
            out.append((hole - pos, False))
            pos = hole
        return out

    def flush(self) -> None:
        """Make every accepted write durable: the data, then the map entries naming it."""
        # The map pages as they are now name only chunks whose data was written before
        # (take() follows the write): syncing the data next makes those durable first.
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            pages = {page: bytes(self.mapped[page * MAP_PAGE : (page + 1) * MAP_PAGE])
                     for page in {i // MAP_PAGE for i in dirty}}
        try:
            os.fdatasync(self._data)
            if not pages:
                return
            for page, raw in sorted(pages.items()):
                os.pwrite(self._map, raw, HEADER + page * MAP_PAGE)
            os.fdatasync(self._map)
        except OSError:
            with self._lock:
                self._dirty |= dirty
            raise

    def close(self) -> None:
        """Flush and close (the files stay)."""
        try:
            if self._data >= 0 and self._map >= 0:
                self.flush()
        except OSError as exc:
            log.warning("could not flush the overlay %s: %s", self.data_path, exc)
        finally:
            for fd in (self._data, self._map):
                if fd >= 0:
                    os.close(fd)
            self._data = self._map = -1


def prepare_directory(directory: Path) -> None:
    """Make the overlay directory (0700) if missing; OutputError if it cannot be used."""
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{directory} is not a directory (--writable names a directory "
                          "for the overlays)", str(directory))
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, directory, "create the overlay directory") from None
    if not directory.is_dir():
        raise OutputError(f"{directory} is not a directory", str(directory))

