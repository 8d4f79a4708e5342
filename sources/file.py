"""The ``file`` source: image files (or block devices), one per disk.

Raw images are read directly and sparse-aware: the data and hole ranges come
from ``SEEK_DATA``/``SEEK_HOLE`` and holes are reported as zero extents
without being read. Images in another format (qcow2, vmdk, ...) are exported
read-only by a private ``qemu-nbd`` on a unix socket and read through
vmrepo's NBD client, allocation-aware: unallocated and zero areas are not
read. Every snapshot is a full read of the allocated data; deduplication in
the repository keeps later snapshots small. There is no change tracking, so
``finish`` has nothing to commit.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any

from .base import BackupContext, DiskStream, Extent, Source
from .errors import DiskUnreadable, SourceConfigError
from .nbd.client import NbdClient
from .nbd.qemunbd import QemuNbd
from .nbdread import ALLOCATION, ReadCounters, read_disk, source_errors
from .readorder import in_turns, split_point

#: Upper bound of one read; reads are aligned to the chunk size.
READ_BLOCK = 4 << 20

DISK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: Leading bytes of image formats other than raw (qemu-img then tells the format).
_FORMAT_MAGIC = (b"QFI\xfb", b"KDMV", b"conectix", b"vhdxfile", b"QED\x00", b"<<< ")


def data_ranges(fd: int, size: int, start: int = 0) -> Iterator[tuple[int, int, bool]]:
    """Yield ``(offset, length, is_data)`` covering ``[start, size)`` of an open file.

    Falls back to one data range when the file system cannot report holes.
    """
    pos = start
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                yield pos, size - pos, False
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, size - pos, True
                return
            raise
        data = min(data, size)
        if data > pos:
            yield pos, data - pos, False
        if data >= size:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        yield data, hole - data, True
        pos = hole


class FileDisk(DiskStream):
    """One raw image file read as a full disk."""

    def __init__(self, name: str, path: str, chunk_size: int) -> None:
        self.name = name
        self.path = path
        self.mode = "full"
        self.reason = "the file source reads every allocated byte"
        self.base_snapshot = None
        self._block = max(chunk_size, READ_BLOCK // chunk_size * chunk_size)
        self.bytes_read = 0
        self.hole_bytes = 0
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise DiskUnreadable(f"disk {name}: cannot open {path}: {exc.strerror}", name) from exc
        try:
            self.size = self._current_size(self._fd)
        except OSError as exc:
            self.close()
            raise DiskUnreadable(f"disk {name}: cannot read {path}: {exc.strerror}", name) from exc
        except DiskUnreadable:
            self.close()
            raise

    def _current_size(self, fd: int) -> int:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(fd, 0, os.SEEK_END)
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        raise DiskUnreadable(f"disk {self.name}: {self.path} is not a file or block device",
                             self.name)

    def _reopen(self) -> int:
        """Another descriptor of the file opened at the start (not of whatever the path
        names by now): the same file, with a read-ahead of its own."""
        try:
            fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return os.dup(self._fd)  # no /proc: the same file, sharing its read-ahead
        try:
            a, b = os.fstat(self._fd), os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        if (a.st_dev, a.st_ino, a.st_rdev) != (b.st_dev, b.st_ino, b.st_rdev):
            os.close(fd)
            return os.dup(self._fd)
        return fd

    def work_bytes(self) -> int:
        try:
            return sum(n for _, n, is_data in data_ranges(self._fd, self.size) if is_data)
        except OSError:
            return self.size

    def extents(self) -> Iterator[Extent]:
        fds = [self._fd]
        try:
            data = self.work_bytes()
            split = split_point(data_ranges(self._fd, self.size), data)
            fds.append(self._reopen())  # the second half's
            halves = in_turns(data_ranges(fds[0], split), data_ranges(fds[1], self.size, split))
            for half, (offset, length, is_data) in halves:
                if is_data:
                    yield from self._read(fds[half], offset, length)
                else:
                    self.hole_bytes += length
                    yield Extent(offset, length, None)
            # Shrinking beyond what was read looks like holes at the end: not a disk image.
            if self._current_size(self._fd) < self.size:
                raise self._shrank()
        except OSError as exc:
            raise DiskUnreadable(
                f"disk {self.name}: read error on {self.path}: {exc.strerror}", self.name
            ) from exc
        finally:
            for fd in fds[1:]:
                os.close(fd)

    def _shrank(self) -> DiskUnreadable:
        return DiskUnreadable(f"disk {self.name}: {self.path} shrank while being read", self.name)

    def _read(self, fd: int, offset: int, length: int) -> Iterator[Extent]:
        end = offset + length
        pos = offset
        while pos < end:
            # Stop at the next block boundary so pieces stay chunk-aligned.
            n = min(end, (pos // self._block + 1) * self._block) - pos
            data = os.pread(fd, n, pos)
            if len(data) != n:
                raise self._shrank()
            self.bytes_read += n
            yield Extent(pos, n, data)
            pos += n

    def report(self) -> dict[str, Any]:
        return {"path": self.path, "bytes_read": self.bytes_read, "hole_bytes": self.hole_bytes}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def image_format(path: str) -> str:
    """``raw`` for raw images and devices, else the format qemu-img reports."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return "raw"  # FileDisk reports the error with its context
    if not any(head.startswith(magic) for magic in _FORMAT_MAGIC):
        return "raw"
    try:
        res = subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                             capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DiskUnreadable(f"{path} is an image file: reading it needs qemu-img "
                             "(qemu-utils)") from None
    if res.returncode != 0:
        raise DiskUnreadable(f"cannot read image {path}: {res.stderr.strip()}")
    return str(json.loads(res.stdout)["format"])


class ImageDisk(DiskStream):
    """An image file in a format QEMU knows, read through a private qemu-nbd export."""

    def __init__(self, name: str, path: str, fmt: str) -> None:
        self.name, self.path, self.fmt = name, path, fmt
        self.mode = "full"
        self.reason = f"the file source reads every allocated byte ({fmt} through qemu-nbd)"
        self.base_snapshot = None
        self.counters = ReadCounters()
        self._client: NbdClient | None = None
        with source_errors(name):
            self._server: QemuNbd | None = QemuNbd(path, fmt)
        try:
            with source_errors(name):
                self._client = NbdClient(self._server.address, [ALLOCATION])
        except BaseException:
            self.close()
            raise
        self.size = self._client.size

    def extents(self) -> Iterator[Extent]:
        assert self._client is not None, "disk closed"
        with source_errors(self.name):
            yield from read_disk(self._client, [(0, self.size)], self.counters)

    def report(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.fmt, "bytes_read": self.counters.bytes_read,
                "bytes_zero": self.counters.bytes_zero}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._server is not None:
            self._server.stop()
            self._server = None


def check_disk_path(name: str, path: str) -> None:
    """Refuse at once what cannot be a disk (a FIFO would block the read for ever)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise DiskUnreadable(f"disk {name}: cannot open {path}: {exc.strerror}", name) from exc
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a character device"
            if stat.S_ISCHR(mode) else "not a regular file")
    raise DiskUnreadable(f"disk {name}: {path} is {kind}, not a file or block device", name)


class FileSource(Source):
    """Raw image files named in the VM's ``disks`` table."""

    plugin = "file"
    settings_keys = frozenset({"disks"})

    def __init__(self, vm: str, disks: Mapping[str, str]) -> None:
        self.vm = vm
        self.disks = dict(disks)
        self._open: list[FileDisk | ImageDisk] = []

    @classmethod
    def from_config(cls, vm: str, settings: Mapping[str, Any]) -> FileSource:
        disks = settings.get("disks")
        if not isinstance(disks, Mapping) or not disks:
            raise SourceConfigError(
                f"vm {vm}: source 'file' needs a table disks = {{ NAME = \"PATH\" }}"
            )
        for name, path in disks.items():
            if not DISK_NAME_RE.fullmatch(str(name)):
                raise SourceConfigError(f"vm {vm}: invalid disk name {name!r}")
            if not isinstance(path, str) or not path:
                raise SourceConfigError(f"vm {vm}: disk {name} needs a file path")
        return cls(vm, disks)

    def begin(self, context: BackupContext) -> list[DiskStream]:
        try:
            for name, path in self.disks.items():
                check_disk_path(name, path)
                fmt = image_format(path)
                self._open.append(FileDisk(name, path, context.chunk_size) if fmt == "raw"
                                  else ImageDisk(name, path, fmt))
        except BaseException:
            self._close_all()
            raise
        return list(self._open)

    def finish(self, committed: bool) -> None:
        self._close_all()

    def _close_all(self) -> None:
        for disk in self._open:
            disk.close()
        self._open.clear()

    def info(self) -> dict[str, Any]:
        return {"disks": dict(self.disks)}
