"""Taking a snapshot: source extents -> chunks -> dedup -> packs -> record.

Ordering (the safety rule of docs/format.md): every pack is stored, then the
index segment naming them, then the snapshot record, and only then is the
source told the snapshot committed. Any failure before the record leaves
only unreferenced packs and the source is told to roll back.

Work is spread over a thread pool: the calling thread drains the source and
assembles chunks; workers hash, compress and pack them (BLAKE3, zstd and
file I/O release the GIL, so all cores are busy).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from vmrepo.sources.base import (
    BackupContext,
    DiskStream,
    PriorSnapshot,
    Source,
    Wanted,
)
from vmrepo.sources.errors import SourceError

from . import __version__
from .chunker import ChunkAssembler, Piece
from .errors import IntegrityError, SnapshotNotFound
from .format import ID_SIZE, BlobType
from .interrupts import came_while_committing, held
from .manifest import Manifest, ManifestBuilder
from .repository import Repository
from .session import WriteSession
from .snapshots import DiskRecord, Snapshot, new_snapshot_id, save_snapshot

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
#: Bytes of chunks handed to a worker at once.
BATCH_BYTES = 1 << 20
Progress = Callable[[int], None]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class DiskStats:
    """Figures of one disk's pass, stored in the snapshot record."""

    bytes_data: int = 0
    bytes_zero: int = 0
    chunks: int = 0
    chunks_zero: int = 0
    chunks_new: int = 0
    bytes_new: int = 0
    bytes_stored: int = 0
    pages_new: int = 0
    bytes_manifest: int = 0
    milliseconds: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class SnapshotOptions:
    vm: str
    tags: Sequence[str] = ()
    wanted: Wanted = "auto"
    workers: int = field(default_factory=lambda: max(2, os.cpu_count() or 2))
    clock: Clock = utc_now
    progress: Progress | None = None
    #: Called with the disks once the source has begun (e.g. to size a progress bar).
    on_begin: Callable[[list[DiskStream]], None] | None = None
    #: Called as the snapshot goes; raises to stop it (e.g. the lock was lost).
    check: Callable[[], None] | None = None
    #: A snapshot to reproduce (a copy into a repository with other parameters): its id,
    #: time, host, tags and how each disk was taken are kept.
    like: Snapshot | None = None
    #: Called just before the record is written (the command line holds signals from then).
    on_commit: Callable[[], None] | None = None


def history_for(snapshots: Sequence[Snapshot]) -> dict[str, list[PriorSnapshot]]:
    """Per disk, the committed snapshots containing it, newest first."""
    out: dict[str, list[PriorSnapshot]] = {}
    for snap in sorted(snapshots, key=lambda s: (s.time, s.id), reverse=True):
        for d in snap.disks:
            out.setdefault(d.name, []).append(PriorSnapshot(snap.id, d.size, d.taken == "full"))
    return out


class _DiskWriter:
    """Turns one disk stream into a manifest, using the shared pool and packer."""

    def __init__(self, repo: Repository, session: WriteSession, pool: ThreadPoolExecutor,
                 workers: int, disk: DiskStream, base: Manifest | None,
                 opts: SnapshotOptions) -> None:
        self.repo, self.session, self.pool = repo, session, pool
        self.disk, self.base = disk, base
        self.progress, self.check = opts.progress, opts.check
        self.stats = DiskStats()
        cfg = repo.config
        self.builder = ManifestBuilder(
            disk.size, cfg.chunk_size, cfg.page_entries, self._store_page,
            load_page=(lambda n: repo.page(base, n)) if base is not None else None,
            base=base,
        )
        #: Chunks go to the pool in batches of about 1 MiB (fewer tasks, less overhead).
        self._batch: list[tuple[int, Piece]] = []
        self._batch_size = max(1, BATCH_BYTES // cfg.chunk_size)
        self._inflight: deque[tuple[list[int], Future[list[tuple[bytes, int]]]]] = deque()
        self._max_inflight = workers * 2

    def _store_page(self, page: bytes) -> bytes:
        pid = self.repo.hasher.id(page)
        stored = self.session.add(pid, BlobType.PAGE, page)
        if stored:
            self.stats.pages_new += 1
            self.stats.bytes_manifest += stored
        return pid

    def _store_chunks(self, batch: list[tuple[int, Piece]]) -> list[tuple[bytes, int]]:
        out = []
        for _, data in batch:
            cid = self.repo.hasher.id(data)
            out.append((cid, self.session.add(cid, BlobType.CHUNK, data)))
        return out

    def _emit(self, index: int, data: Piece | None) -> None:
        if data is None or self._is_zero(data):
            self._emit_zeros(index, index + 1)
            return
        self.stats.chunks += 1
        self._batch.append((index, data))
        if len(self._batch) >= self._batch_size:
            self._submit()

    def _emit_zeros(self, first: int, end: int) -> None:
        self.stats.chunks += end - first
        self.stats.chunks_zero += end - first
        self.builder.set_zeros(first, end)

    def _is_zero(self, data: Piece) -> bool:
        # Comparing a memoryview with bytes goes item by item (70 times slower than bytes
        # with bytes); data that neither starts nor ends with a zero byte is not copied.
        if len(data) and (data[0] or data[-1]):
            return False
        return bytes(data) == self.repo.zero_chunk(len(data))

    def _submit(self) -> None:
        if not self._batch:
            return
        while len(self._inflight) >= self._max_inflight:
            self._collect_one()
        batch, self._batch = self._batch, []
        self._inflight.append(([i for i, _ in batch], self.pool.submit(self._store_chunks, batch)))

    def _collect_one(self) -> None:
        indices, fut = self._inflight.popleft()
        for index, (cid, stored) in zip(indices, fut.result(), strict=True):
            if stored:
                self.stats.chunks_new += 1
                self.stats.bytes_stored += stored
                self.stats.bytes_new += self.builder.shape.chunk_length(index)
            self.builder.set(index, cid)

    def _base_chunk(self, index: int) -> bytes:
        """The base snapshot's content of a chunk the source sent only in part."""
        assert self.base is not None
        page_no, slot = divmod(index, self.base.page_entries)
        page = self.repo.page(self.base, page_no)
        cid = page[slot * ID_SIZE : (slot + 1) * ID_SIZE]
        return self.repo.read_chunk(cid, self.base.chunk_length(index))

    def run(self) -> DiskRecord:
        started = time.monotonic()
        asm = ChunkAssembler(self.disk.size, self.repo.config.chunk_size, self._emit,
                             self._emit_zeros)
        try:
            for ext in self.disk.extents():
                asm.add(ext.offset, ext.length, ext.data)
                if self.progress and ext.data is not None:
                    self.progress(ext.length)
                if self.check is not None:
                    self.check()
            asm.finish(self._base_chunk if self.base is not None else None)
            self._submit()
            while self._inflight:
                self._collect_one()
        finally:
            for _, fut in self._inflight:
                fut.cancel()
        manifest = self.builder.finish()
        root = manifest.encode()
        root_id = self.repo.hasher.id(root)
        self.stats.bytes_manifest += self.session.add(root_id, BlobType.ROOT, root)
        self.stats.bytes_data = asm.data_bytes
        self.stats.bytes_zero = asm.zero_bytes
        self.stats.milliseconds = int((time.monotonic() - started) * 1000)
        return DiskRecord(self.disk.name, self.disk.size, root_id, "full", self.disk.reason,
                          stats=self.stats.as_dict(), source=self.disk.report())


def _base_manifest(repo: Repository, disk: DiskStream,
                   by_id: dict[str, Snapshot]) -> Manifest:
    base_snap = by_id.get(disk.base_snapshot or "")
    rec = base_snap.disk(disk.name) if base_snap else None
    if rec is None:
        raise SnapshotNotFound(f"{disk.base_snapshot} (base of disk {disk.name})")
    manifest = repo.manifest(rec.root)
    if manifest.size != disk.size:
        raise IntegrityError(
            f"disk {disk.name}: base snapshot has size {manifest.size}, disk has {disk.size}"
        )
    return manifest


def _reproduce(snap: Snapshot, like: Snapshot) -> None:
    """Give ``snap`` the identity of the snapshot it copies (its data is its own)."""
    snap.host, snap.tags, snap.source, snap.source_info = like.host, list(like.tags), \
        like.source, dict(like.source_info)
    snap.program = like.program or snap.program
    for rec in snap.disks:
        old = like.disk(rec.name)
        if old is not None:
            rec.taken, rec.reason, rec.base, rec.source = old.taken, old.reason, old.base, \
                dict(old.source)


def take_snapshot(repo: Repository, source: Source, opts: SnapshotOptions) -> Snapshot:
    """Back up every disk ``source`` offers and commit one snapshot record."""
    prior = repo.snapshots(opts.vm)
    by_id = {s.id: s for s in prior}
    like = opts.like
    snap_id = like.id if like is not None else new_snapshot_id()
    context = BackupContext(repo.config.repository_id, repo.config.chunk_size, snap_id,
                            opts.wanted, history_for(prior))
    started = like.time if like is not None else opts.clock()
    repo.require_current_format("taking a snapshot")
    repo.only_usable_packs()  # never deduplicate against a missing pack
    session = repo.session(check=opts.check)
    committed = False
    try:
        disks = source.begin(context)
        if opts.on_begin is not None:
            opts.on_begin(disks)
        records = []
        with ThreadPoolExecutor(opts.workers, thread_name_prefix="vmrepo-chunk") as pool:
            for disk in disks:
                base = None
                taken = "full"
                if disk.mode == "changes":
                    base = _base_manifest(repo, disk, by_id)
                    taken = "differential" if opts.wanted == "differential" else "incremental"
                writer = _DiskWriter(repo, session, pool, opts.workers, disk, base, opts)
                record = writer.run()
                record.taken, record.base = taken, disk.base_snapshot
                records.append(record)
        session.commit()
        if opts.check is not None:
            opts.check()  # the record is written only under a lock still held
        snap = Snapshot(
            id=snap_id, vm=opts.vm, time=started, host=socket.gethostname(),
            source=source.plugin, disks=records, tags=list(opts.tags),
            source_info=source.info(), program=f"vmrepo {__version__}",
        )
        if like is not None:
            _reproduce(snap, like)
        if opts.on_commit is not None:
            opts.on_commit()
        with held() as came:  # once the record is written, the source must finish too
            save_snapshot(repo.store, snap)
            committed = True
            try:
                source.finish(True)
            except SourceError as exc:
                # The snapshot is committed; what the source could not tidy up is reported.
                snap.warnings.append(str(exc))
    except BaseException:
        if not committed:
            session.abort()
            # Roll the source back, not cut short by a second Ctrl-C (a third one is obeyed);
            # its own failure must not hide the original one, nor go unsaid (what it left
            # behind, such as a bitmap, is the operator's to remove).
            with held():
                try:
                    source.finish(False)
                except Exception as exc:  # noqa: BLE001 - reported, the first error raised
                    log.warning("%s", exc if isinstance(exc, SourceError)
                                else f"rolling the source back failed: {exc}")
        raise
    if came:
        snap.interrupted = came[0]
        snap.warnings.append(came_while_committing(came[0]))
    return snap
