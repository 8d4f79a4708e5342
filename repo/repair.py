"""Repair: the index rebuilt from the packs, damaged packs rewritten, lost blobs fetched from a
replica, undecodable snapshot records set aside.

Every repair runs under an exclusive repository lock (nothing else writes or reads while
packs are dropped), after a verify that says what is wrong:

* :func:`repair_index` indexes every pack again from its own header (docs/format.md §5: a
  pack can be read knowing only its key) and deletes the old segments.
* :func:`repair_data` rewrites into new packs the usable blobs of every pack verify found
  damaged (bad header, bad copies, truncated), fetches blobs no usable copy holds from a
  replica with the same parameters, indexes packs no segment names, then drops the damaged
  packs from the index and the store, and clears the damage records.
* :func:`repair_snapshots` moves records that cannot be decoded to ``quarantine/``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmrepo.storage.errors import ObjectNotFound, StorageError

from . import damage as damage_records
from .codec import RecordKind
from .compaction import drop_packs
from .copy import same_parameters
from .errors import IncompatibleRepository, IntegrityError
from .format import (
    ID_SIZE,
    INDEX_PREFIX,
    QUARANTINE_PREFIX,
    SNAPSHOT_PREFIX,
    ZERO_ID,
    BlobType,
    pack_key,
    parse_hex_name,
    parse_pack_key,
)
from .manifest import Manifest
from .pack import BlobEntry
from .repository import Repository
from .segments import MAX_SEGMENT_ENTRIES, encode_segment
from .snapshots import SNAPSHOT_VERSION, Snapshot
from .verify import VerifyReport

log = logging.getLogger(__name__)

Check = Callable[[], None] | None


@dataclass
class RepairReport:
    packs_indexed: int = 0
    segments_written: int = 0
    segments_deleted: int = 0
    packs_unreadable: list[str] = field(default_factory=list)
    packs_rewritten: int = 0
    blobs_rewritten: int = 0
    blobs_from_replica: int = 0
    packs_dropped: int = 0
    still_lost: int = 0
    quarantined: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _segments(repo: Repository, packs: list[tuple[bytes, int, list[BlobEntry]]],
              report: RepairReport) -> None:
    """Write segments naming ``packs``, at most MAX_SEGMENT_ENTRIES entries each."""
    store = repo.store
    batch: list[tuple[bytes, int | None, list[BlobEntry]]] = []
    count = 0

    def flush() -> None:
        nonlocal count
        if batch:
            key, raw = encode_segment(store.codec, store.hasher, batch)
            store.put_segment(key, raw)
            report.segments_written += 1
            batch.clear()
            count = 0

    for pid, size, entries in packs:
        if count + len(entries) > MAX_SEGMENT_ENTRIES:
            flush()
        batch.append((pid, size, entries))
        count += len(entries)
        report.packs_indexed += 1
    flush()


def repair_index(repo: Repository, check: Check = None) -> RepairReport:
    """Index every pack from its header; delete the segments that were there before."""
    report = RepairReport()
    store = repo.store
    old = [i.key for i in store.listing(INDEX_PREFIX,
                                        lambda k: parse_hex_name(k, INDEX_PREFIX) is not None)]
    packs: list[tuple[bytes, int, list[BlobEntry]]] = []
    for info in store.listing("data/", lambda k: parse_pack_key(k) is not None):
        if check is not None:
            check()
        pid = parse_pack_key(info.key)
        assert pid is not None
        try:
            packs.append((pid, info.size, store.pack_header(pid, info.size)))
        except (IntegrityError, StorageError) as exc:
            report.packs_unreadable.append(f"{info.key}: {exc}")
    _segments(repo, packs, report)
    for key in old:
        store.delete(key)
        report.segments_deleted += 1
    repo.index.sync(store)
    return report


def repair_snapshots(repo: Repository) -> RepairReport:
    """Move snapshot records that cannot be decoded to ``quarantine/snapshots/``."""
    report = RepairReport()
    store = repo.store
    for info in store.listing(SNAPSHOT_PREFIX,
                              lambda k: parse_hex_name(k, SNAPSHOT_PREFIX) is not None):
        try:
            Snapshot.from_fields(store.get_record(RecordKind.SNAPSHOT, info.key,
                                                  SNAPSHOT_VERSION), info.key)
            continue
        except ObjectNotFound:
            continue
        except (IntegrityError, IncompatibleRepository) as exc:
            log.info("%s cannot be decoded: %s", info.key, exc)
        raw = store.backend.get(info.key)
        store.put(QUARANTINE_PREFIX + info.key, raw)
        store.delete(info.key)
        report.quarantined.append(info.key)
    return report


def repair_data(repo: Repository, found: VerifyReport, replica: Repository | None = None,
                check: Check = None) -> RepairReport:
    """Heal what ``found`` (a verify of ``repo``, read_data for blob damage) reports."""
    report = RepairReport()
    if replica is not None and not same_parameters(repo, replica):
        raise IncompatibleRepository(f"{replica.backend.location} has other parameters "
                                     "(chunk size or hash key): it cannot replace blobs here")
    store = repo.store
    existing = repo.existing_packs()
    bad = found.damage
    # Damaged packs that exist are rewritten; missing ones only leave the index.
    dropping = ((found.bad_headers | {p for _, p in bad.copies}) & set(existing)) | bad.packs
    repo.index.set_pack_filter(lambda p: p in existing and p not in dropping,
                               frozenset(bad.copies))
    repo.condemned = frozenset(dropping)
    if found.unindexed:
        _segments(repo, [(p, existing[p], store.pack_header(p, existing[p]))
                         for p in sorted(found.unindexed)], report)
        repo.index.sync(store)
    session = repo.session(check=check, refresh=False)
    entries = _entries(repo, dropping & set(existing))
    try:
        for pid in sorted(dropping & set(existing)):
            report.packs_rewritten += 1
            for e in entries[pid]:
                if (e.id, pid) in bad.copies or session.known(e.id):
                    continue
                try:
                    stored = store.get_range(pack_key(pid), e.offset, e.length)
                    repo.check_blob(e.id, stored, e.raw_length, f"blob {e.id.hex()[:16]}")
                except (IntegrityError, StorageError):
                    continue  # fetched from the replica below if it is needed
                if session.add_stored(e.id, e.type, stored, e.raw_length):
                    report.blobs_rewritten += 1
        # Lost blobs, and what lost roots and pages name (verify could not read it).
        todo = list(found.lost.items())
        while todo:
            bid, btype = todo.pop()
            if session.known(bid):
                log.debug("lost blob %s (%s) has a copy again", bid.hex()[:16], btype)
                continue
            if replica is None:
                report.still_lost += 1
                continue
            try:
                data = replica.read_blob(bid)
            except IntegrityError as exc:
                log.info("the replica cannot give blob %s: %s", bid.hex()[:16], exc)
                report.still_lost += 1
                continue
            btype = btype or _type_in(replica, bid)
            session.add(bid, btype, data)
            log.debug("lost blob %s (%s) fetched from the replica", bid.hex()[:16], btype)
            report.blobs_from_replica += 1
            todo += _named_by(data, btype)
        session.commit()
    except BaseException:
        session.abort()
        raise
    finally:
        repo.index.set_pack_filter(None)
    replaced, written = drop_packs(store, dropping, check)
    report.segments_deleted += replaced
    report.segments_written += written
    for pid in sorted(dropping):
        store.delete(pack_key(pid))
        report.packs_dropped += 1
    damage_records.replace(store, damage_records.Damage(), bad.records or
                           damage_records.load(store).records)
    repo.forget_pack_listing()
    repo.index.sync(store)
    return report


def _entries(repo: Repository, packs: set[bytes]) -> dict[bytes, list[BlobEntry]]:
    """The blobs of ``packs`` as the index places them (a damaged header may place them
    wrongly), with what only their headers list where those can be read."""
    out: dict[bytes, list[BlobEntry]] = {p: [] for p in packs}
    for bid, loc in repo.index.entries():
        if loc.pack_id in out:
            out[loc.pack_id].append(
                BlobEntry(bid, loc.type, loc.offset, loc.length, loc.raw_length))
    for pid, entries in out.items():
        known = {e.id for e in entries}
        with contextlib.suppress(IntegrityError, StorageError):  # else: the index's only
            entries += [e for e in repo.store.pack_header(pid) if e.id not in known]
    return out


def _named_by(data: bytes, btype: BlobType) -> list[tuple[bytes, BlobType | None]]:
    """The blobs a manifest root or page names (to fetch them too where they are lost)."""
    if btype == BlobType.ROOT:
        return [(p, BlobType.PAGE) for p in Manifest.decode(data, "root").page_ids]
    if btype == BlobType.PAGE:
        ids = [data[i:i + ID_SIZE] for i in range(0, len(data), ID_SIZE)]
        return [(c, BlobType.CHUNK) for c in ids if c != ZERO_ID]
    return []


def _type_in(replica: Repository, bid: bytes) -> BlobType:
    loc = replica.index.get(bid)
    return loc.type if loc is not None else BlobType.CHUNK

