"""Rebuilding disk images from snapshots: raw, qcow2 and differential qcow2.

Every image is written under a temporary name in the target directory and
renamed into place only when complete, so a failed or interrupted restore
never leaves a half-written image under the requested name. Raw images are
sparse: all-zero chunks are holes. Every chunk is verified against its id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import IntegrityError, RestoreError
from .format import ZERO_ID
from .logs import ignored
from .manifest import Manifest, iter_chunks, split_page
from .planner import ReadPlanner
from .repository import Repository
from .snapshots import DiskRecord
from .writeback import Writeback

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass
class RestoreStats:
    bytes_written: int = 0
    chunks_read: int = 0
    chunks_zero: int = 0
    #: Storage requests the read planner made.
    requests: int = 0


def _partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.vmrepo-partial-{secrets.token_hex(4)}")


@contextlib.contextmanager
def _atomic_output(final: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` on success."""
    if final.exists() and not force:
        raise RestoreError(f"{final} exists (use --force to replace it)", str(final))
    if not final.parent.is_dir():
        raise RestoreError(f"directory {final.parent} does not exist", str(final.parent))
    tmp = _partial_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with ignored(log, f"removing {tmp}", OSError):
            tmp.unlink()
        raise


def _run(cmd: list[str], what: str) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise RestoreError(f"{cmd[0]} not found: install qemu-utils") from None
    if res.returncode != 0:
        detail = (res.stderr or res.stdout).strip().splitlines()
        raise RestoreError(f"{what} failed: {detail[-1] if detail else res.returncode}")
    return res.stdout


def write_chunks(repo: Repository, manifest: Manifest, fd: int,
                 chunks: Iterator[tuple[int, bytes]], stats: RestoreStats,
                 progress: Progress | None, workers: int | None = None,
                 check: Callable[[], None] | None = None,
                 writeback: Writeback | None = None) -> None:
    """Write the data chunks at their offsets through the read planner; zero chunks stay
    holes of the sparse file."""
    lock = threading.Lock()

    def deliver(index: int, data: bytes) -> None:
        length = manifest.chunk_length(index)
        if len(data) != length:
            raise IntegrityError(f"chunk {index} is {len(data)} bytes, expected {length}")
        os.pwrite(fd, data, index * manifest.chunk_size)
        if writeback is not None:
            writeback.written(length)
        with lock:
            stats.bytes_written += length
            if progress:
                progress(length)

    def wanted() -> Iterator[tuple[bytes, int]]:
        for index, cid in chunks:
            if cid == ZERO_ID:
                stats.chunks_zero += 1
                if progress:
                    progress(manifest.chunk_length(index))
                continue
            stats.chunks_read += 1
            yield cid, index

    planner: ReadPlanner[int] = ReadPlanner(repo, deliver, workers=workers, check=check)
    planned = planner.read(wanted())
    stats.requests += planned.requests


def restore_raw(repo: Repository, disk: DiskRecord, out: Path, *, force: bool = False,
                progress: Progress | None = None, workers: int | None = None,
                check: Callable[[], None] | None = None, sync: bool = True) -> RestoreStats:
    """Write ``disk`` as a sparse raw image at ``out``; with ``sync`` it is durable before
    it gets its name."""
    manifest = repo.manifest(disk.root)
    stats = RestoreStats()
    with _atomic_output(out, force) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        writeback = Writeback(fd) if sync else None
        try:
            os.ftruncate(fd, manifest.size)
            chunks = iter_chunks(manifest, lambda n: repo.page(manifest, n))
            write_chunks(repo, manifest, fd, chunks, stats, progress, workers, check,
                         writeback)
            if writeback is not None:
                writeback.finish()
        finally:
            if writeback is not None:
                writeback.close()
            os.close(fd)
    return stats


def restore_qcow2(repo: Repository, disk: DiskRecord, out: Path, *, force: bool = False,
                  progress: Progress | None = None, workers: int | None = None,
                  check: Callable[[], None] | None = None) -> RestoreStats:
    """Write ``disk`` as a qcow2 image at ``out`` (through a sparse raw in the same place)."""
    with _atomic_output(out, force) as tmp:
        raw = _partial_path(out)
        try:
            stats = restore_raw(repo, disk, raw, progress=progress, workers=workers,
                                check=check)
            _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(tmp)],
                 "qemu-img convert")
        finally:
            with ignored(log, f"removing {raw}", OSError):
                raw.unlink()
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


def _backing_info(backing: Path) -> tuple[str, int]:
    info = json.loads(_run(["qemu-img", "info", "--output=json", str(backing)],
                           f"reading backing image {backing}"))
    return str(info["format"]), int(info["virtual-size"])


def restore_differential(repo: Repository, disk: DiskRecord, since: DiskRecord, out: Path,
                         backing: Path, *, force: bool = False,
                         progress: Progress | None = None) -> RestoreStats:
    """Write a qcow2 overlay on ``backing`` holding what changed from ``since`` to ``disk``."""
    new, old = repo.manifest(disk.root), repo.manifest(since.root)
    if not backing.exists():
        raise RestoreError(f"backing image {backing} does not exist", str(backing))
    fmt, vsize = _backing_info(backing)
    if vsize != old.size:
        raise RestoreError(f"backing image {backing} has {vsize} bytes, the older snapshot's "
                           f"disk {since.name} has {old.size}", str(backing))
    stats = RestoreStats()
    with _atomic_output(out, force) as tmp:
        rel = os.path.relpath(backing.absolute(), out.absolute().parent)
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", rel, "-F", fmt, str(tmp),
              str(new.size)], "qemu-img create")
        # The overlay is created beside the final name, so relative backing paths resolve.
        with tempfile.TemporaryDirectory(prefix=".vmrepo-diff-", dir=out.parent) as scratch:
            _apply_changes(repo, new, changed_chunks(repo, new, old), tmp, Path(scratch),
                           stats, progress)
    return stats


def _apply_changes(repo: Repository, manifest: Manifest, chunks: Iterator[tuple[int, bytes]],
                   image: Path, scratch: Path, stats: RestoreStats,
                   progress: Progress | None, batch_bytes: int = 256 << 20) -> None:
    """Write changed chunks into a qcow2 image with qemu-io, in batches of files."""
    commands: list[str] = []
    pending = 0

    def flush() -> None:
        nonlocal pending
        if commands:
            cmd = ["qemu-io", "-f", "qcow2", str(image)]
            for c in commands:
                cmd += ["-c", c]
            _run(cmd, "qemu-io write")
        for f in scratch.iterdir():
            f.unlink()
        commands.clear()
        pending = 0

    for index, cid in chunks:
        length = manifest.chunk_length(index)
        offset = index * manifest.chunk_size
        if cid == ZERO_ID:
            stats.chunks_zero += 1
            commands.append(f"write -q -z {offset} {length}")
        else:
            path = scratch / f"c{index}"
            path.write_bytes(repo.read_chunk(cid, length))
            stats.chunks_read += 1
            pending += length
            commands.append(f"write -q -s {path} {offset} {length}")
        stats.bytes_written += length
        if progress:
            progress(length)
        if pending >= batch_bytes or len(commands) >= 2000:
            flush()
    flush()
