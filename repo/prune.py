"""Prune: delete what no snapshot needs, in two phases, while snapshots go on (docs/format.md §13).

A prune run first *sweeps*, then *marks*:

* **Sweep.** A mark (:mod:`vmrepo.marks`) is *due* when it is armed, older
  than the grace period, and none of the locks alive when it was armed is
  alive now. For the due marks' packs the sweep lists the packs, syncs the
  index and reads every snapshot *again*, spares any pack holding the only
  good copy of a blob some snapshot references (a session that could not have
  seen the mark may have used it), writes index segments without the doomed
  packs (superseding the segments it replaces), deletes those segments, then
  the packs, then the marks.
* **Mark.** With the references of every snapshot counted over the index,
  each pack not yet condemned is judged: *orphaned* (no segment names it: a
  killed session's), *unused* (no referenced blob has its good copy there),
  *mostly unused* (more than ``max_unused`` of its bytes: its referenced blobs
  are rewritten into new packs, a *repack*), or kept. The condemned packs go
  into a new mark, written unarmed, then armed with the locks alive after it
  was written.

Writers read the marks after taking their lock and never use a condemned pack
(they store what they need again), so a pack is deleted only when no session
alive at arming time remains and the sweep's own check finds no snapshot that
needs it. Prune holds an exclusive lock of scope ``prune``: it excludes other
prunes, not snapshots. With a zero grace period and no other session alive,
the mark a run writes is swept by the same run.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from . import marks as marking
from .compaction import drop_packs
from .errors import IntegrityError
from .format import INDEX_PREFIX, BlobType, pack_key
from .immutability import extend_retention
from .index import Location, Ordinals
from .locks import alive_ids
from .marks import Mark
from .planner import ReadPlanner
from .references import mark_referenced
from .repository import Repository
from .snapshots import Snapshot

log = logging.getLogger(__name__)

#: Default share of a pack's bytes that may be unused before it is repacked.
MAX_UNUSED = 0.3
#: Default time a mark waits before its packs may be deleted.
GRACE = timedelta(days=1)

Clock = Callable[[], datetime]


class PruneRefused(IntegrityError):
    """The repository has damage that would make prune misjudge what is needed."""


@dataclass
class PendingMark:
    """A mark not swept yet, and what it waits for."""

    id: str
    time: datetime
    packs: int
    bytes: int
    due: datetime
    waiting_for: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time.isoformat(), "packs": self.packs,
                "bytes": self.bytes, "due": self.due.isoformat(),
                "waiting_for": self.waiting_for}


@dataclass
class PruneReport:
    """What a prune run did (or, dry, would do)."""

    dry_run: bool = False
    # sweep
    marks_swept: int = 0
    packs_deleted: int = 0
    bytes_deleted: int = 0
    packs_spared: int = 0
    segments_replaced: int = 0
    segments_written: int = 0
    # mark
    packs_orphaned: int = 0
    bytes_orphaned: int = 0
    packs_unused: int = 0
    bytes_unused: int = 0
    packs_repacked: int = 0
    bytes_repacked: int = 0
    blobs_rewritten: int = 0
    bytes_rewritten: int = 0
    mark: str | None = None
    #: Unused bytes left in packs below the repack threshold.
    bytes_unused_kept: int = 0
    packs_total: int = 0
    bytes_total: int = 0
    pending: list[PendingMark] = field(default_factory=list)
    # object lock
    packs_retained: int = 0
    bytes_retained: int = 0
    retained_until: datetime | None = None
    versions_purged: int = 0
    bytes_purged: int = 0
    bytes_awaiting_release: int = 0
    next_release: datetime | None = None
    objects_extended: int = 0
    retention_until: datetime | None = None
    #: Marks kept because an object lock retains their packs, and until when.
    held_until: dict[str, datetime] = field(default_factory=dict)

    @property
    def bytes_condemned(self) -> int:
        return self.bytes_orphaned + self.bytes_unused + self.bytes_repacked

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("pending", "held_until")}
        out["bytes_condemned"] = self.bytes_condemned
        out["pending"] = [p.as_dict() for p in self.pending]
        for k in ("retained_until", "next_release", "retention_until"):
            out[k] = None if out[k] is None else out[k].isoformat()
        return out


@dataclass
class PruneOptions:
    max_unused: float = MAX_UNUSED
    grace: timedelta = GRACE
    dry_run: bool = False
    #: Snapshots to count as forgotten (a dry run of ``forget --prune``).
    forgotten: frozenset[str] = frozenset()
    #: The prune's own lock (not waited for).
    lock_id: str | None = None
    #: Raises to stop (the lock was lost).
    check: Callable[[], None] | None = None
    clock: Clock = field(default=lambda: datetime.now().astimezone())


def prune(repo: Repository, opts: PruneOptions) -> PruneReport:
    """Sweep the due marks, then mark what no snapshot needs (docs/format.md §13)."""
    repo.require_current_format("prune")
    report = PruneReport(dry_run=opts.dry_run)
    marks = _arm_leftovers(repo, marking.load_marks(repo.store), opts)
    marks = _sweep_due(repo, marks, opts, report)
    new = _mark(repo, marks, opts, report)
    if new is not None:
        marks.append(new)
        marks = _sweep_due(repo, marks, opts, report)
    _pending(repo, marks, opts, report)
    if repo.object_lock is not None and not opts.dry_run:
        _keep_immutable(repo, opts, report)
    return report


def _keep_immutable(repo: Repository, opts: PruneOptions, report: PruneReport) -> None:
    """Free the hidden versions whose retention passed; extend what is still held."""
    assert repo.object_lock is not None
    now = opts.clock()
    purged = repo.object_lock.purge("", now)
    report.versions_purged = purged.versions_deleted
    report.bytes_purged = purged.bytes_deleted
    report.bytes_awaiting_release = purged.bytes_retained
    report.next_release = purged.next_release
    condemned = marking.condemned(marking.load_marks(repo.store))
    extended = extend_retention(repo.backend, repo.config, repo.cache.root, now,
                                frozenset(pack_key(p) for p in condemned))
    report.objects_extended = extended.extended
    report.retention_until = extended.until


# -- what is alive ----------------------------------------------------------


def _alive(repo: Repository, now: datetime, own: str | None) -> set[str]:
    """Ids of the locks that may still be held (:func:`vmrepo.locks.alive_ids`)."""
    return alive_ids(repo.store, own, now)


def _arm_leftovers(repo: Repository, marks: list[Mark], opts: PruneOptions) -> list[Mark]:
    """Arm the marks an interrupted prune left unarmed. Prunes exclude each other, so an
    unarmed mark seen under the prune lock is such a leftover; writers have avoided its
    packs since it was written, so arming it now, with the locks alive now, is what its
    prune would have done."""
    if opts.dry_run or all(m.armed for m in marks):
        return marks
    alive = sorted(_alive(repo, opts.clock(), opts.lock_id))
    return [m if m.armed else marking.arm(repo.store, m, alive) for m in marks]


def _is_due(mark: Mark, now: datetime, grace: timedelta, alive: set[str]) -> bool:
    return mark.sessions is not None and now - mark.time >= grace and \
        not alive.intersection(mark.sessions)


def _pending(repo: Repository, marks: list[Mark], opts: PruneOptions,
             report: PruneReport) -> None:
    if not marks:
        return
    now = opts.clock()
    alive = _alive(repo, now, opts.lock_id)
    sizes = repo.existing_packs()
    for m in marks:
        waiting = sorted(alive.intersection(m.sessions or ()))
        due = max(m.time + opts.grace, report.held_until.get(m.id, m.time))
        report.pending.append(PendingMark(
            m.id, m.time, len(m.packs), sum(sizes.get(p, 0) for p in m.packs),
            due, waiting if m.sessions is not None else ["arming"]))


# -- references -------------------------------------------------------------


def _snapshots_and_index(repo: Repository, forgotten: frozenset[str] = frozenset()
                         ) -> tuple[list[Snapshot], Ordinals]:
    """Every snapshot and the index, read in this order (after listing the packs): a
    snapshot record is written after the segments naming its blobs, so the index read
    after it names them all. Refuse when damage would hide a reference."""
    repo.forget_pack_listing()
    repo.existing_packs()
    snaps = [s for s in repo.snapshots() if s.id not in forgotten]
    repo.index.sync(repo.store)
    damaged = [p for p in repo.store.problems if p.kind == "damaged"
               and p.key.startswith(("snapshots/", INDEX_PREFIX))]
    if damaged:
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise PruneRefused(f"prune refused: {damaged[0]}{more}; what it references cannot "
                           "be known: run `vmrepo verify`", key=damaged[0].key)
    return snaps, repo.index.ordinals()


def _referenced(repo: Repository, snaps: list[Snapshot], ordinals: Ordinals) -> bytearray:
    missing: list[tuple[Snapshot, bytes]] = []
    referenced = mark_referenced(repo, snaps, ordinals,
                                 lambda snap, bid: missing.append((snap, bid)))
    if missing:
        snap, bid = missing[0]
        raise PruneRefused(f"prune refused: {snap.vm}@{snap.short_id} references blob "
                           f"{bid.hex()[:16]}, which no index segment names ({len(missing)} "
                           "such references): run `vmrepo verify`", key=f"blob {bid.hex()}")
    return referenced


# -- sweep ------------------------------------------------------------------


def _sweep_due(repo: Repository, marks: list[Mark], opts: PruneOptions,
               report: PruneReport) -> list[Mark]:
    """Sweep the marks that are due; return the others."""
    now = opts.clock()
    alive = _alive(repo, now, opts.lock_id)
    due = [m for m in marks if _is_due(m, now, opts.grace, alive)]
    kept = _sweep(repo, due, opts, report) if due else []
    if opts.dry_run:  # nothing was deleted: the marks still condemn their packs
        return marks
    return [m for m in marks if m not in due] + kept


def _sweep(repo: Repository, due: list[Mark], opts: PruneOptions,
           report: PruneReport) -> list[Mark]:
    """Delete what the due marks condemn and no snapshot needs; return the marks kept for
    packs an object lock still retains."""
    doomed = marking.condemned(due)
    snaps, ordinals = _snapshots_and_index(repo)
    existing = repo.existing_packs()
    referenced = _referenced(repo, snaps, ordinals)
    spare: set[bytes] = set()
    for n, _bid, locs in ordinals.groups():
        if not referenced[n]:
            continue
        if any(loc.pack_id in existing and loc.pack_id not in doomed for loc in locs):
            continue
        holders = [loc.pack_id for loc in locs if loc.pack_id in doomed and
                   loc.pack_id in existing]
        if holders:
            spare.add(holders[0])
    if spare:
        log.info("%d condemned packs are needed again (by snapshots taken meanwhile): kept",
                 len(spare))
    delete = doomed - spare
    retained = _retained(repo, delete, existing, opts.clock(), report)
    delete -= set(retained)
    report.packs_spared += len(spare)
    report.marks_swept += len(due)
    if opts.dry_run:
        report.packs_deleted += sum(1 for p in delete if p in existing)
        report.bytes_deleted += sum(existing.get(p, 0) for p in delete)
        return []
    replaced, written = drop_packs(repo.store, delete, opts.check)
    report.segments_replaced += replaced
    report.segments_written += written
    for pid in sorted(delete):
        if opts.check is not None:
            opts.check()
        repo.store.delete(pack_key(pid))
        if pid in existing:
            report.packs_deleted += 1
            report.bytes_deleted += existing[pid]
    kept = []
    for m in due:
        left = tuple(p for p in m.packs if p in retained)
        if left:  # condemned still, deleted by a prune once their retention passed
            kept.append(replace(m, packs=left))
            marking.save(repo.store, kept[-1])
            report.held_until[m.id] = max(retained[p] for p in left)
        else:
            marking.delete(repo.store, m)
    repo.forget_pack_listing()
    repo.index.sync(repo.store)
    return kept


def _retained(repo: Repository, packs: set[bytes], existing: dict[bytes, int],
              now: datetime, report: PruneReport) -> dict[bytes, datetime]:
    """The packs of ``packs`` an object lock still retains, with their dates."""
    if repo.object_lock is None:
        return {}
    out = {}
    for pid in sorted(packs):
        if pid in existing:
            until = repo.object_lock.retained_until(pack_key(pid))
            if until is not None and until > now:
                out[pid] = until
    if out:
        report.packs_retained += len(out)
        report.bytes_retained += sum(existing[p] for p in out)
        latest = max(out.values())
        report.retained_until = max(latest, report.retained_until or latest)
    return out


# -- mark -------------------------------------------------------------------


def _mark(repo: Repository, marks: list[Mark], opts: PruneOptions,
          report: PruneReport) -> Mark | None:
    """Condemn what no snapshot needs into a new mark (armed), repacking mostly unused
    packs first; return the mark (None if nothing was condemned or in a dry run)."""
    snaps, ordinals = _snapshots_and_index(repo, opts.forgotten)
    existing = dict(repo.existing_packs())
    already = marking.condemned(marks)
    referenced = _referenced(repo, snaps, ordinals)
    used: dict[bytes, int] = defaultdict(int)
    held: dict[bytes, int] = defaultdict(int)  # blob bytes the index places in each pack
    for n, _bid, locs in ordinals.groups():
        for loc in locs:
            held[loc.pack_id] += loc.length
        if referenced[n]:
            good = next((loc for loc in locs if loc.pack_id in existing and
                         loc.pack_id not in already), None)
            if good is not None:
                used[good.pack_id] += good.length
    orphaned, unused, repack = [], [], []
    for pid, size in existing.items():
        if pid in already:
            continue
        report.packs_total += 1
        report.bytes_total += size
        if pid not in held:
            orphaned.append(pid)
            report.packs_orphaned += 1
            report.bytes_orphaned += size
        elif not used[pid]:
            unused.append(pid)
            report.packs_unused += 1
            report.bytes_unused += size
        elif (held[pid] - used[pid]) / size > opts.max_unused:
            repack.append(pid)
            report.packs_repacked += 1
            report.bytes_repacked += size
        else:
            report.bytes_unused_kept += held[pid] - used[pid]
    if not (orphaned or unused or repack):
        return None
    if opts.dry_run:
        if not opts.grace and not _alive(repo, opts.clock(), opts.lock_id):
            # A real run would sweep its new mark at once (step 4).
            report.marks_swept += 1
            report.packs_deleted += len(orphaned) + len(unused) + len(repack)
            report.bytes_deleted += report.bytes_condemned
        return None
    if repack:
        _repack(repo, repack, set(already) | set(orphaned) | set(unused), ordinals,
                referenced, opts, report)
    mark = marking.new_mark(sorted(orphaned + unused + repack), opts.clock())
    marking.save(repo.store, mark)
    mark = marking.arm(repo.store, mark, sorted(_alive(repo, opts.clock(), opts.lock_id)))
    report.mark = mark.id
    log.info("marked %d packs (%d bytes) as unused: mark %s", len(mark.packs),
             report.bytes_condemned, mark.id)
    return mark


def _repack(repo: Repository, packs: list[bytes], condemned: set[bytes], ordinals: Ordinals,
            referenced: bytearray, opts: PruneOptions, report: PruneReport) -> None:
    """Store again, in new packs, the referenced blobs of ``packs`` that have no good copy
    elsewhere (read as stored, checked against their ids)."""
    leaving = condemned | set(packs)
    existing = repo.existing_packs()
    repo.index.set_pack_filter(lambda pid: pid in existing and pid not in leaving)
    repo.condemned = frozenset(leaving)
    where: dict[bytes, tuple[Location, BlobType]] = {}
    session = repo.session(check=opts.check, refresh=False)
    try:
        for pid in packs:
            for e in repo.store.pack_header(pid, existing[pid]):
                found = ordinals.of(e.id)
                if found is not None and referenced[found[0]] and e.id not in where and \
                        not session.known(e.id):
                    where[e.id] = (Location(pid, e.type, e.offset, e.length, e.raw_length),
                                   e.type)

        def put(bid: bytes, stored: bytes) -> None:
            loc, btype = where[bid]
            repo.check_blob(bid, stored, loc.raw_length, f"blob {bid.hex()[:16]}")
            session.add_stored(bid, btype, stored, loc.raw_length)

        planner: ReadPlanner[bytes] = ReadPlanner(
            repo, put, decode=False, check=opts.check,
            locate=lambda bid: where[bid][0] if bid in where else None)
        planner.read((bid, bid) for bid in list(where))
        session.commit()
    except BaseException:
        session.abort()
        raise
    finally:
        repo.index.set_pack_filter(None)
    report.blobs_rewritten = session.stats.blobs_new
    report.bytes_rewritten = session.stats.stored_bytes_new
