"""Rebuilding disk images from snapshots: raw (file or block device), qcow2, differential qcow2.

Every chunk is read through the read planner and checked against its id.
Files are written under a temporary name beside the final one and renamed
into place only when complete, so a failed or interrupted restore never
leaves a half-written image under the requested name; block devices are
written in place (:mod:`vmrepo.output`). qcow2 images, full or differential,
are written through a private qemu-nbd export of the new image and the NBD
client: no command is ever built from a path. A differential image's
backing image is checked chunk by chunk against the older snapshot before
anything is written on top of it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from vmrepo.sources.nbd.client import NbdClient
from vmrepo.sources.nbd.errors import NbdError
from vmrepo.sources.nbd.qemunbd import QemuNbd

from .errors import IntegrityError, OutputError, RestoreError
from .format import ZERO_ID
from .logs import ignored
from .manifest import Manifest, split_page
from .output import (
    PARTIAL,
    NbdTarget,
    Target,
    check_new_file,
    open_file_or_device,
    output_error,
    remove_leftovers,
)
from .planner import ReadPlanner
from .repository import Repository
from .snapshots import DiskRecord

log = logging.getLogger(__name__)

#: Chunks taken from the manifest at once, the ranges of their data reserved in the output
#: before any is written (1 GiB of them at 256 KiB chunks).
RESERVE_CHUNKS = 4096

Progress = Callable[[int], None]


@dataclass
class RestoreStats:
    bytes_written: int = 0
    chunks_read: int = 0
    chunks_zero: int = 0
    #: Storage requests the read planner made.
    requests: int = 0
    #: Byte ranges written as zeros because their data is damaged or missing (salvage).
    damaged: list[tuple[int, int]] = field(default_factory=list)


def disk_chunks(repo: Repository, manifest: Manifest, stats: RestoreStats,
                allow_damaged: bool = False) -> Iterator[tuple[int, bytes]]:
    """Every ``(chunk index, chunk id)`` of ``manifest``. A manifest page that cannot be read
    stops the restore naming its byte range, or with ``allow_damaged`` yields zero ids for
    its chunks and records the range."""
    for page_no in range(len(manifest.page_ids)):
        first, count = manifest.page_span(page_no)
        try:
            ids = split_page(repo.page(manifest, page_no), count, f"page {page_no}")
        except IntegrityError as exc:
            start = first * manifest.chunk_size
            end = min(manifest.size, (first + count) * manifest.chunk_size)
            if not allow_damaged:
                raise unrestorable(exc, start, end) from None
            stats.damaged.append((start, end))
            ids = [ZERO_ID] * count
        for slot, cid in enumerate(ids):
            yield first + slot, cid


def disk_manifest(repo: Repository, disk: DiskRecord, stats: RestoreStats,
                  allow_damaged: bool = False) -> tuple[Manifest, Iterator[tuple[int, bytes]]]:
    """The manifest of ``disk`` and its chunks (:func:`disk_chunks`). A root that cannot be
    read stops the restore naming the whole disk, or with ``allow_damaged`` makes every
    chunk a zero chunk and records the whole disk as damaged."""
    try:
        manifest = repo.manifest(disk.root)
    except IntegrityError as exc:
        if not allow_damaged:
            raise unrestorable(f"the manifest of disk {disk.name} is lost ({exc})", 0,
                               disk.size) from None
        stats.damaged.append((0, disk.size))
        manifest = Manifest(disk.size, repo.config.chunk_size, repo.config.page_entries, ())
        return manifest, ((i, ZERO_ID) for i in range(manifest.chunks))
    return manifest, disk_chunks(repo, manifest, stats, allow_damaged)


def unrestorable(exc: IntegrityError | str, start: int, end: int) -> IntegrityError:
    key = exc.key if isinstance(exc, IntegrityError) else None
    return IntegrityError(f"{exc}: bytes {start}-{end} of the disk cannot be restored "
                          "(--allow-damaged writes zeros there and goes on)", key=key)


def run_tool(cmd: list[str], what: str) -> str:
    """Run a QEMU tool (arguments as a list, never a command string); its error otherwise."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise RestoreError(f"{cmd[0]} not found: install qemu-utils") from None
    if res.returncode != 0:
        detail = [ln.removeprefix(f"{cmd[0]}: ") for ln in
                  (res.stderr or res.stdout).strip().splitlines() if ln.strip()]
        raise RestoreError(f"{what} failed: "
                           f"{'; '.join(detail[-3:]) if detail else res.returncode}")
    return res.stdout


def data_bytes(repo: Repository, disk: DiskRecord, allow_damaged: bool = False) -> int:
    """How many bytes of the disk are not all-zero chunks (what a restore reads); damage
    as :func:`disk_manifest` has it."""
    manifest, chunks = disk_manifest(repo, disk, RestoreStats(), allow_damaged)
    return sum(manifest.chunk_length(i) for i, cid in chunks if cid != ZERO_ID)


def joined(spans: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """``[start, end)`` spans in order, those that touch joined into one."""
    run: tuple[int, int] | None = None
    for start, end in spans:
        if run is not None and run[1] == start:
            run = (run[0], end)
            continue
        if run is not None:
            yield run
        run = (start, end)
    if run is not None:
        yield run


def write_disk(repo: Repository, manifest: Manifest, target: Target,
               chunks: Iterable[tuple[int, bytes]], stats: RestoreStats,
               progress: Progress | None, workers: int | None = None,
               check: Callable[[], None] | None = None, allow_damaged: bool = False) -> None:
    """Write ``chunks`` (index, id) of ``manifest`` into ``target`` through the read planner;
    zero chunks are written as zeros unless the target reads as zeros already. A chunk no
    copy of which is good stops the restore naming its byte range, or with
    ``allow_damaged`` is written as zeros and its range recorded."""
    lock = threading.Lock()

    def damaged(index: int, blob_id: bytes, why: str) -> None:
        start = index * manifest.chunk_size
        end = start + manifest.chunk_length(index)
        if not allow_damaged:
            raise unrestorable(IntegrityError(why, key=f"blob {blob_id.hex()}"), start, end)
        target.write(start, repo.zero_chunk(end - start))
        with lock:
            stats.damaged.append((start, end))

    def deliver(index: int, data: bytes) -> None:
        length = manifest.chunk_length(index)
        if len(data) != length:
            raise IntegrityError(f"chunk {index} is {len(data)} bytes, expected {length}")
        target.write(index * manifest.chunk_size, data)
        with lock:
            stats.bytes_written += length
            if progress:
                progress(length)

    zero_run: list[int] = []  # [start, end) of consecutive zero chunks not yet written

    def flush_zeros() -> None:
        if zero_run:
            target.zero(zero_run[0], zero_run[1] - zero_run[0])
            zero_run.clear()

    def wanted() -> Iterator[tuple[bytes, int]]:
        todo = iter(chunks)
        while group := list(islice(todo, RESERVE_CHUNKS)):
            reserve(group)
            yield from pick(group)
        flush_zeros()

    def reserve(group: list[tuple[int, bytes]]) -> None:
        """Reserve the data ranges of ``group`` (chunks in order) in the output."""
        for start, end in joined((index * manifest.chunk_size,
                                  index * manifest.chunk_size + manifest.chunk_length(index))
                                 for index, cid in group if cid != ZERO_ID):
            target.reserve(start, end - start)

    def pick(group: list[tuple[int, bytes]]) -> Iterator[tuple[bytes, int]]:
        for index, cid in group:
            if cid == ZERO_ID:
                stats.chunks_zero += 1
                if not target.zero_filled:
                    start = index * manifest.chunk_size
                    end = start + manifest.chunk_length(index)
                    if zero_run and zero_run[1] == start:
                        zero_run[1] = end
                    else:
                        flush_zeros()
                        zero_run[:] = [start, end]
                continue
            flush_zeros()
            stats.chunks_read += 1
            yield cid, index

    planner: ReadPlanner[int] = ReadPlanner(repo, deliver, workers=workers, check=check,
                                            damaged=damaged)
    stats.requests += planner.read(wanted()).requests
    stats.damaged.sort()


def restore_raw(repo: Repository, disk: DiskRecord, out: Path, *, force: bool = False,
                progress: Progress | None = None, workers: int | None = None,
                check: Callable[[], None] | None = None, sync: bool = True,
                discard: bool = False, allow_damaged: bool = False) -> RestoreStats:
    """Write ``disk`` as a raw image at ``out``: a new sparse file (durable before it gets its
    name, with ``sync``) or, in place, a block device."""
    stats = RestoreStats()
    manifest, chunks = disk_manifest(repo, disk, stats, allow_damaged)
    target = open_file_or_device(out, manifest.size, force=force, discard=discard, sync=sync)
    try:
        write_disk(repo, manifest, target, chunks, stats, progress, workers, check,
                   allow_damaged)
        target.finish()
    except BaseException:
        target.abort()
        raise
    return stats


class _NewImage:
    """A new qcow2 image under a temporary name beside ``final``, served by qemu-nbd."""

    def __init__(self, final: Path, create: list[str]) -> None:
        self.final = final
        self.tmp = final.with_name(f".{final.name}{PARTIAL}{os.urandom(4).hex()}")
        self._fd = -1
        self.server: QemuNbd | None = None
        self.client: NbdClient | None = None
        try:
            run_tool([*create, str(self.tmp)], "qemu-img create")
            self._fd = os.open(self.tmp, os.O_RDONLY | os.O_CLOEXEC)
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # alive: not a leftover
            os.fchmod(self._fd, 0o600)
            self.server = QemuNbd(str(self.tmp), "qcow2", writable=True)
            self.client = NbdClient(self.server.address)
        except NbdError as exc:
            self.abort()
            raise OutputError(f"cannot write {final}: {exc}", str(final)) from None
        except OSError as exc:
            self.abort()
            raise output_error(exc, final, "create") from None
        except BaseException:
            self.abort()
            raise

    def target(self, zero_filled: bool) -> NbdTarget:
        assert self.client is not None
        return NbdTarget(self.final, self.client, zero_filled=zero_filled)

    def _stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def finish(self) -> None:
        self._stop()
        try:
            os.replace(self.tmp, self.final)
        except OSError as exc:
            self.abort()
            raise output_error(exc, self.final, "complete") from None

    def abort(self) -> None:
        self._stop()
        with ignored(log, f"removing {self.tmp}", OSError):
            self.tmp.unlink()


def restore_qcow2(repo: Repository, disk: DiskRecord, out: Path, *, force: bool = False,
                  progress: Progress | None = None, workers: int | None = None,
                  check: Callable[[], None] | None = None,
                  allow_damaged: bool = False) -> RestoreStats:
    """Write ``disk`` as a new qcow2 image at ``out``."""
    stats = RestoreStats()
    manifest, chunks = disk_manifest(repo, disk, stats, allow_damaged)
    check_new_file(out, force)
    remove_leftovers(out)
    image = _NewImage(out, ["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                            f"size={manifest.size}"])
    try:
        target = image.target(zero_filled=True)
        write_disk(repo, manifest, target, chunks, stats, progress, workers, check,
                   allow_damaged)
        target.finish()
        image.finish()
    except BaseException:
        image.abort()
        raise
    return stats


def changed_chunks(repo: Repository, new: Manifest, old: Manifest) -> Iterator[tuple[int, bytes]]:
    """Chunks whose id differs between two manifests of one geometry (pages compared first)."""
    if (new.size, new.chunk_size, new.page_entries) != (old.size, old.chunk_size,
                                                        old.page_entries):
        raise RestoreError("the two snapshots of this disk differ in size; "
                           "a differential image needs equal sizes")
    for page_no, (pid_new, pid_old) in enumerate(zip(new.page_ids, old.page_ids, strict=True)):
        if pid_new == pid_old:
            continue
        first, count = new.page_span(page_no)
        ids_new = split_page(repo.page(new, page_no), count, f"page {page_no}")
        ids_old = split_page(repo.page(old, page_no), count, f"page {page_no}")
        for slot, (a, b) in enumerate(zip(ids_new, ids_old, strict=True)):
            if a != b:
                yield first + slot, a


def image_info(path: Path) -> tuple[str, int]:
    """Format and virtual size of an image, as qemu-img reports them."""
    info = json.loads(run_tool(["qemu-img", "info", "-U", "--output=json", str(path)],
                               f"reading image {path}"))
    return str(info["format"]), int(info["virtual-size"])


def verify_backing(repo: Repository, manifest: Manifest, backing: Path, fmt: str,
                   what: str) -> None:
    """RestoreError unless ``backing`` holds exactly the disk ``manifest`` describes."""
    zero = repo.zero_chunk(manifest.chunk_size)
    try:
        with QemuNbd(str(backing), fmt) as server, \
                NbdClient(server.address) as client:
            if client.size != manifest.size:
                raise RestoreError(f"backing image {backing} has {client.size} bytes, {what} "
                                   f"has {manifest.size}", str(backing))
            for page_no in range(len(manifest.page_ids)):
                first, count = manifest.page_span(page_no)
                ids = split_page(repo.page(manifest, page_no), count, f"page {page_no}")
                ranges = [((first + i) * manifest.chunk_size, manifest.chunk_length(first + i))
                          for i in range(count)]
                for (offset, data, _holes), cid in zip(client.read_ranges(ranges, depth=8), ids,
                                                       strict=True):
                    got = ZERO_ID if data == zero[: len(data)] else repo.hasher.id(data)
                    if got != cid:
                        raise RestoreError(
                            f"backing image {backing} is not {what}: bytes {offset}-"
                            f"{offset + len(data) - 1} differ (--no-check-backing skips this "
                            "check, at the risk of a wrong image)", str(backing))
    except NbdError as exc:
        raise RestoreError(f"cannot read backing image {backing}: {exc}", str(backing)) from None


def restore_differential(repo: Repository, disk: DiskRecord, since: DiskRecord, out: Path,
                         backing: Path, *, force: bool = False,
                         progress: Progress | None = None, workers: int | None = None,
                         check: Callable[[], None] | None = None,
                         check_backing: bool = True, since_label: str = "the older snapshot"
                         ) -> RestoreStats:
    """Write a qcow2 overlay on ``backing`` holding what changed from ``since`` to ``disk``."""
    new, old = repo.manifest(disk.root), repo.manifest(since.root)
    if not backing.exists():
        raise RestoreError(f"backing image {backing} does not exist", str(backing))
    fmt, vsize = image_info(backing)
    if vsize != old.size:
        raise RestoreError(f"backing image {backing} has {vsize} bytes, {since_label}'s "
                           f"disk {since.name} has {old.size}", str(backing))
    if check_backing:
        verify_backing(repo, old, backing, fmt, f"{since_label}'s disk {since.name}")
    check_new_file(out, force)
    remove_leftovers(out)
    # The overlay lives beside the final name, so a relative backing path resolves alike.
    rel = os.path.relpath(backing.absolute(), out.absolute().parent)
    image = _NewImage(out, ["qemu-img", "create", "-q", "-f", "qcow2", "-b", rel, "-F", fmt,
                            "-o", f"size={new.size}"])
    stats = RestoreStats()
    try:
        target = image.target(zero_filled=False)
        write_disk(repo, new, target, changed_chunks(repo, new, old), stats, progress, workers,
                   check)
        target.finish()
        image.finish()
    except BaseException:
        image.abort()
        raise
    return stats
