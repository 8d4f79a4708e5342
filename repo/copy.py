"""Copying snapshots to another repository, sending only what the destination lacks.

Between repositories with the same parameters (chunk size, hash key,
manifest page size: ``init --copy-params-from``) blobs move as stored bytes,
never re-encoded (each is still checked against its id on the way, so that
damage never travels to a replica):

1. Every blob the snapshots to copy reference (roots, pages, chunks) is
   looked up in the destination's index; those it lacks (or has only in a
   pack that is gone) are marked, one byte per source blob.
2. Each source pack holding marked blobs is copied whole when all of its
   blobs are wanted (its id is checked against its bytes on the way) and
   its header opens in the destination (not encrypted: a sealed header
   names its repository), else
   the wanted blobs are read in coalesced ranges (the read planner, stored
   bytes as they are, checked) and packed anew.
3. The destination's write session indexes what it stored as it goes, so an
   interrupted copy re-run sends only the rest; the snapshot records come
   last, once everything they name is durable.

Between repositories with other parameters the snapshots are rebuilt:
each disk is read from the source through the read planner and snapshotted
into the destination like any source's disk (re-chunked, re-hashed,
re-compressed), keeping the snapshot's id, time, host and tags.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from vmrepo.sources.base import BackupContext, DiskStream, Extent, Source
from vmrepo.storage.errors import StorageError

from .backup import SnapshotOptions, take_snapshot
from .errors import IntegrityError
from .format import ZERO_ID, BlobType, pack_key
from .index import Ordinals
from .manifest import Manifest, iter_chunks
from .pack import BlobEntry
from .planner import ReadPlanner
from .references import blobs_of
from .repository import Repository
from .session import WriteSession
from .snapshots import DiskRecord, Snapshot, save_snapshot

Check = Callable[[], None] | None
#: A source pack is copied whole when at least this share of its bytes is wanted.
WHOLE_PACK = 0.9


@dataclass
class CopyStats:
    snapshots: int = 0
    already_there: int = 0
    blobs_sent: int = 0
    bytes_sent: int = 0
    packs_whole: int = 0
    transcoded: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def same_parameters(a: Repository, b: Repository) -> bool:
    """Whether blobs of ``a`` are valid, as stored, in ``b``: same chunking, same ids and
    the same encryption (algorithm and key, or none)."""
    ca, cb = a.config, b.config
    return (ca.chunk_size, a.hasher.key, ca.page_entries, ca.encryption, a.master) == \
        (cb.chunk_size, b.hasher.key, cb.page_entries, cb.encryption, b.master)


def copy_snapshots(src: Repository, dst: Repository, snaps: Sequence[Snapshot], *,
                   check_src: Check = None, check_dst: Check = None) -> CopyStats:
    """Copy the snapshots ``dst`` lacks (by id) of ``snaps``, oldest first."""
    dst.require_current_format("copying into it")
    have = {s.id for s in dst.snapshots()}
    todo = sorted((s for s in snaps if s.id not in have), key=lambda s: (s.time, s.id))
    stats = CopyStats(already_there=len(snaps) - len(todo))
    if not todo:
        return stats
    dst.only_usable_packs()
    if same_parameters(src, dst):
        _copy_blobs(src, dst, todo, stats, check_src, check_dst)
    else:
        stats.transcoded = True
        for snap in todo:
            copied = take_snapshot(dst, RepositorySource(src, snap), SnapshotOptions(
                vm=snap.vm, check=check_dst, like=snap))
            stats.bytes_sent += sum(int(d.stats.get("bytes_stored", 0)) +
                                    int(d.stats.get("bytes_manifest", 0))
                                    for d in copied.disks)
            stats.blobs_sent += sum(int(d.stats.get("chunks_new", 0)) +
                                    int(d.stats.get("pages_new", 0)) for d in copied.disks)
            stats.snapshots += 1
    return stats


def _copy_blobs(src: Repository, dst: Repository, todo: list[Snapshot], stats: CopyStats,
                check_src: Check, check_dst: Check) -> None:
    ordinals = src.index.ordinals()
    wanted = bytearray(ordinals.size)
    packs: dict[bytes, None] = {}
    for snap in todo:
        for bid in blobs_of(src, snap):
            found = ordinals.of(bid)
            if found is None:
                raise IntegrityError(f"{snap.vm}@{snap.short_id} references blob "
                                     f"{bid.hex()[:16]}, which the source index lacks "
                                     "(run `vmrepo verify` on the source)")
            n, loc = found
            if not wanted[n] and bid not in dst.index:
                wanted[n] = 1
                packs[loc.pack_id] = None
    # A sealed pack header names its repository: between two encrypted repositories (which
    # share the key but not the id) the blobs move sealed and the new packs get headers of
    # their own.
    whole_ok = not dst.config.encrypted or \
        src.config.repository_id == dst.config.repository_id
    session = dst.session(check=check_dst)
    try:
        partial: list[tuple[bytes, tuple[BlobType, int]]] = []
        for pack_id in packs:
            entries = _wanted_entries(src, ordinals, wanted, pack_id)
            header = src.store.pack_header(pack_id)
            total = sum(e.length for e in header)
            if whole_ok and len(entries) == len(header) and \
                    sum(e.length for e in entries) >= WHOLE_PACK * total and \
                    _copy_whole(src, session, pack_id, header):
                stats.packs_whole += 1
                stats.blobs_sent += len(header)
                continue
            partial += [(e.id, (e.type, e.raw_length)) for e in entries]
        if partial:
            _copy_partial(src, session, partial, stats, check_src)
        session.commit()
    except BaseException:
        session.abort()
        raise
    stats.bytes_sent += session.stats.pack_bytes
    for snap in todo:
        if check_dst is not None:
            check_dst()
        save_snapshot(dst.store, snap)
        stats.snapshots += 1


def _wanted_entries(src: Repository, ordinals: Ordinals, wanted: bytearray,
                    pack_id: bytes) -> list[BlobEntry]:
    """The blobs of ``pack_id`` that are wanted (and whose first index entry is this pack)."""
    out = []
    for e in src.store.pack_header(pack_id):
        found = ordinals.of(e.id)
        if found is not None and wanted[found[0]] and found[1].pack_id == pack_id:
            out.append(e)
    return out


def _copy_whole(src: Repository, session: WriteSession, pack_id: bytes,
                header: list[BlobEntry]) -> bool:
    """Copy a pack as it is, if its bytes match its id (else the caller copies blob by blob,
    each checked)."""
    key = pack_key(pack_id)
    try:
        data = src.store.get_range(key, 0, src.store.backend.stat(key).size)
    except StorageError:  # gone meanwhile (a prune of the source): blob by blob instead
        return False
    if src.hasher.id(data) != pack_id:
        return False
    session.add_pack(pack_id, data, header)
    return True


def _copy_partial(src: Repository, session: WriteSession,
                  blobs: list[tuple[bytes, tuple[BlobType, int]]], stats: CopyStats,
                  check: Check) -> None:
    """Wanted blobs read as stored (checked against their ids) and packed anew."""
    lock = threading.Lock()

    def make(blob_id: bytes, btype: BlobType, raw: int) -> Callable[[bytes], None]:
        def put(stored: bytes) -> None:
            src.check_blob(blob_id, stored, raw, f"blob {blob_id.hex()[:16]}")
            session.add_stored(blob_id, btype, stored, raw)
            with lock:
                stats.blobs_sent += 1
        return put

    planner: ReadPlanner[Callable[[bytes], None]] = ReadPlanner(
        src, lambda put, stored: put(stored), decode=False, check=check)
    planner.read((bid, make(bid, btype, raw)) for bid, (btype, raw) in blobs)


class _SnapshotDisk(DiskStream):
    """A disk of a snapshot in another repository, read through the read planner."""

    def __init__(self, src: Repository, rec: DiskRecord, manifest: Manifest) -> None:
        self.name, self.size = rec.name, rec.size
        self.mode, self.reason, self.base_snapshot = "full", rec.reason, None
        self.src, self.manifest = src, manifest

    def extents(self) -> Iterator[Extent]:
        m = self.manifest
        chunks: queue.Queue[tuple[int, bytes] | BaseException | None] = queue.Queue(16)

        def deliver(index: int, data: bytes) -> None:
            chunks.put((index, data))

        def wanted() -> Iterator[tuple[bytes, int]]:
            for index, cid in iter_chunks(m, lambda n: self.src.page(m, n)):
                if cid == ZERO_ID:
                    chunks.put((index, b""))
                else:
                    yield cid, index

        def read() -> None:
            try:
                ReadPlanner(self.src, deliver).read(wanted())
                chunks.put(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
                chunks.put(exc)

        reader = threading.Thread(target=read, name="vmrepo-copy-read", daemon=True)
        reader.start()
        while (item := chunks.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            index, data = item
            length = m.chunk_length(index)
            yield Extent(index * m.chunk_size, length, data if data else None)
        reader.join()


class RepositorySource(Source):
    """The disks of one snapshot of another repository, as a source (a copy across
    parameters)."""

    plugin = "copy"

    def __init__(self, src: Repository, snap: Snapshot) -> None:
        self.src, self.snap = src, snap

    @classmethod
    def from_config(cls, vm: str, settings: Any) -> RepositorySource:
        raise NotImplementedError("a copy source is made by `vmrepo copy`")

    def begin(self, context: BackupContext) -> list[DiskStream]:
        return [_SnapshotDisk(self.src, d, self.src.manifest(d.root)) for d in self.snap.disks]

    def finish(self, committed: bool) -> None:
        """Nothing to settle: the source repository is only read."""

