"""Verifying a repository: its structure, with ``read_data`` every stored byte, and what any
damage affects (docs/format.md §14).

The structure check reads no chunk data: every snapshot record decodes; the index
segments decode; every pack the index names exists with the size the index gives; every
pack's header agrees with the index; the manifests of every snapshot are read, and every
page and chunk they reference is in the index with a usable copy. ``read_data`` then
reads, decompresses and re-hashes every blob of the packs chosen (all of them, or one
part of ``parts`` in turn, remembered in the cache directory, stopping at a deadline and
resuming there next time).

Damage is reported per object (``Finding``) and, for each snapshot, as the byte ranges
of each disk it makes unreadable (``Affected``); snapshots without such ranges are
*intact*. Unreferenced data is reported as reclaimable, not as damage. What was found
unusable is recorded in the repository (:mod:`vmrepo.damage`) so that later snapshots
store those blobs again instead of building on them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from vmrepo.storage.errors import StorageError

from . import damage as damage_records
from . import marks
from .damage import Damage
from .errors import IntegrityError
from .format import INDEX_PREFIX, SNAPSHOT_PREFIX, ZERO_ID, BlobType, pack_key
from .index import Location, Ordinals
from .manifest import Manifest, split_page
from .pack import BlobEntry
from .planner import default_workers
from .repository import Repository
from .snapshots import Snapshot

log = logging.getLogger(__name__)

#: Bytes read at once from a pack by ``read_data`` (blobs are checked as each arrives).
READ_RANGE = 8 << 20
STATE_VERSION = 1

Progress = Callable[[int], None]


@dataclass
class Finding:
    """An object that is missing, damaged, or disagrees with another."""

    key: str
    problem: str

    def as_dict(self) -> dict[str, str]:
        return {"key": self.key, "problem": self.problem}


@dataclass
class Affected:
    """The byte ranges of one disk of one snapshot that damage makes unreadable."""

    snapshot: Snapshot
    disk: str
    ranges: list[tuple[int, int]]

    @property
    def bytes(self) -> int:
        return sum(end - start for start, end in self.ranges)

    def as_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot.id, "vm": self.snapshot.vm, "disk": self.disk,
                "bytes": self.bytes, "ranges": [list(r) for r in self.ranges]}


@dataclass
class ReadData:
    part: int
    parts: int
    packs: int = 0
    packs_in_part: int = 0
    bytes: int = 0
    blobs: int = 0
    complete: bool = True
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    findings: list[Finding] = field(default_factory=list)
    affected: list[Affected] = field(default_factory=list)
    intact: list[Snapshot] = field(default_factory=list)
    snapshots: int = 0
    packs: int = 0
    pack_bytes: int = 0
    blobs: int = 0
    reclaimable_bytes: int = 0
    read: ReadData | None = None
    #: Referenced blobs without a usable copy, with their type where known.
    lost: dict[bytes, BlobType | None] = field(default_factory=dict)
    #: What was found unusable (recorded for writers, dropped by repair).
    damage: Damage = field(default_factory=Damage)
    #: Packs whose header is damaged or disagrees with the index (repair rewrites them).
    bad_headers: set[bytes] = field(default_factory=set)
    #: Packs no segment names, holding blobs no segment names: an interrupted or running
    #: session's, not damage by themselves (`repair index` indexes them, `prune` removes
    #: them); blobs snapshots reference found only there are damage.
    unindexed: set[bytes] = field(default_factory=set)
    #: Blobs snapshots reference that no segment names (damage).
    unindexed_needed: int = 0
    #: Packs no segment names that an unfinished prune condemned: not damage, garbage the
    #: next prune deletes.
    condemned: set[bytes] = field(default_factory=set)

    @property
    def clean(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean, "snapshots": self.snapshots, "packs": self.packs,
            "pack_bytes": self.pack_bytes, "blobs": self.blobs,
            "reclaimable_bytes": self.reclaimable_bytes,
            "condemned_packs": len(self.condemned),
            "unindexed_packs": len(self.unindexed),
            "findings": [f.as_dict() for f in self.findings],
            "affected": [a.as_dict() for a in self.affected],
            "intact": [s.id for s in self.intact],
            "read_data": self.read.as_dict() if self.read else None,
        }


@dataclass
class VerifyOptions:
    read_data: bool = False
    #: Check part ``k`` of ``parts`` (in turn, remembered); None: every pack.
    parts: int | None = None
    max_seconds: float | None = None
    workers: int | None = None
    progress: Progress | None = None
    check: Callable[[], None] | None = None
    #: Record what was found unusable in the repository, for writers.
    record: bool = True


class _Checker:
    """One verify run."""

    def __init__(self, repo: Repository, opts: VerifyOptions) -> None:
        self.repo = repo
        self.opts = opts
        self.report = VerifyReport()
        self.bad = Damage()
        self.lock = threading.Lock()
        #: Stored bytes of referenced blobs per pack (what is not reclaimable).
        self.used: dict[bytes, int] = {}
        #: Packs read_data read in this run.
        self.read_packs: set[bytes] = set()
        #: Manifest blobs found unreadable (reported once, however many disks share them).
        self.unreadable: set[bytes] = set()

    def find(self, key: str, problem: str) -> None:
        with self.lock:
            self.report.findings.append(Finding(key, problem))

    # -- structure ---------------------------------------------------------------

    def run(self) -> VerifyReport:
        repo, rep = self.repo, self.report
        # Read in the reverse of a writer's order (packs, then the segment naming them,
        # then the snapshot record): what a record or segment read here names was stored
        # before the listing, though snapshots run meanwhile.
        snaps = repo.snapshots()
        repo.index.sync(repo.store)
        repo.forget_pack_listing()
        existing = repo.existing_packs()
        for p in repo.store.problems:
            if p.kind == "damaged" and p.key.startswith((SNAPSHOT_PREFIX, INDEX_PREFIX)):
                what = "snapshot record" if p.key.startswith(SNAPSHOT_PREFIX) else \
                    "index segment (`vmrepo repair index` indexes its packs again)"
                self.find(p.key, f"damaged {what}: {p.message}")
        rep.snapshots = len(snaps)
        rep.packs, rep.pack_bytes = len(existing), sum(existing.values())
        sizes = repo.index.packs()
        for pid, size in sizes.items():
            if pid not in existing:
                self.bad.packs.add(pid)
                self.find(pack_key(pid), "missing (the index names it)")
            elif size is not None and size != existing[pid]:
                # What lies past its end is lost (bad copies, below); the rest is readable.
                self.find(pack_key(pid), f"is {existing[pid]} bytes, the index says {size} "
                                         "(truncated or replaced)")
        ordinals = repo.index.ordinals()
        per_pack, entries_of = self._walk_index(ordinals, existing)
        held = {p: sum(e.length for e in es) for p, es in entries_of.items()}
        condemned = marks.condemned(marks.load_marks(repo.store))
        headers = self._headers(existing, sizes, per_pack, entries_of, ordinals, condemned)
        if self.opts.read_data:
            rep.read = self._read_data(existing, headers, entries_of)
        self._manifests(snaps, ordinals)
        rep.reclaimable_bytes = sum(
            size if not self.used.get(p) else max(0, held.get(p, 0) - self.used[p])
            for p, size in existing.items())
        rep.unindexed_needed = sum(1 for bid in rep.lost if ordinals.of(bid) is None)
        if rep.unindexed_needed:
            self.find("index", f"{rep.unindexed_needed} blobs snapshots reference are in no "
                               "index segment"
                               + (" (`vmrepo repair index` indexes the packs that hold them)"
                                  if rep.unindexed else ""))
        rep.damage = self.bad
        if self.opts.record:
            self._record(existing)
        return rep

    def _walk_index(self, ordinals: Ordinals, existing: dict[bytes, int]
                    ) -> tuple[dict[bytes, int], dict[bytes, list[BlobEntry]]]:
        """Entries per pack; entries lying outside their pack are bad copies; the entries
        of every pack (for packs whose header cannot be used)."""
        per_pack: dict[bytes, int] = defaultdict(int)
        entries_of: dict[bytes, list[BlobEntry]] = defaultdict(list)
        blobs = 0
        for _n, bid, locs in ordinals.groups():
            blobs += 1
            seen: dict[bytes, Location] = {}
            for loc in locs:
                if loc.pack_id in seen:
                    other = seen[loc.pack_id]
                    if (other.offset, other.length) != (loc.offset, loc.length):
                        self.find(f"blob {bid.hex()}", f"index segments disagree on where it "
                                                       f"lies in {pack_key(loc.pack_id)}")
                    continue
                seen[loc.pack_id] = loc
                per_pack[loc.pack_id] += 1
                entries_of[loc.pack_id].append(
                    BlobEntry(bid, loc.type, loc.offset, loc.length, loc.raw_length))
                size = existing.get(loc.pack_id)
                if size is not None and loc.offset + loc.length > size:
                    self.bad.copies.add((bid, loc.pack_id))
        self.report.blobs = blobs
        return per_pack, entries_of

    def _headers(self, existing: dict[bytes, int], sizes: dict[bytes, int | None],
                 per_pack: dict[bytes, int], entries_of: dict[bytes, list[BlobEntry]],
                 ordinals: Ordinals, condemned: set[bytes]) -> dict[bytes, list[BlobEntry]]:
        """Each existing pack's header, checked against the index. A pack no segment names
        is listed (an interrupted or running session's, or condemned by a prune's mark), not
        damage, unless its header cannot be read."""
        headers: dict[bytes, list[BlobEntry]] = {}
        for pid, size in sorted(existing.items()):
            if self.opts.check is not None:
                self.opts.check()
            key = pack_key(pid)
            try:
                header = self.repo.store.pack_header(pid, size)
            except (IntegrityError, StorageError) as exc:
                if pid in per_pack and pid not in self.bad.packs:
                    self.report.bad_headers.add(pid)
                    self.find(key, f"header unreadable ({exc}); its blobs are read through the "
                                   "index (`vmrepo repair` rewrites the pack)")
                elif pid not in per_pack:
                    self.find(key, f"not indexed and its header is unreadable ({exc})")
                continue
            headers[pid] = header
            if pid not in per_pack:
                known = sum(1 for e in header if ordinals.of(e.id) is not None)
                if pid in condemned:
                    self.report.condemned.add(pid)  # a prune stopped before deleting it
                elif known < len(header):
                    # An interrupted session's, or a running one's: damage only if snapshots
                    # need its blobs, which the manifest check finds (and names this pack's
                    # repair).
                    self.report.unindexed.add(pid)
                continue
            indexed = {(e.id, e.offset, e.length, e.raw_length, e.type)
                       for e in entries_of.get(pid, ())}
            listed = {(e.id, e.offset, e.length, e.raw_length, e.type) for e in header}
            if indexed != listed:
                self.report.bad_headers.add(pid)
                self.find(key, f"header and index disagree ({len(listed - indexed)} entries "
                               f"only in the header, {len(indexed - listed)} only in the index)")
        return headers

    # -- reading every byte ----------------------------------------------------------

    def _read_data(self, existing: dict[bytes, int], headers: dict[bytes, list[BlobEntry]],
                   entries_of: dict[bytes, list[BlobEntry]]) -> ReadData:
        state = _State(self.repo.cache.root / "verify-state")
        parts = self.opts.parts or 1
        part, after = state.start(parts)
        chosen = sorted(p for p in existing if _part_of(p, parts) == part)
        read = ReadData(part + 1, parts, packs_in_part=len(chosen))
        todo = [p for p in chosen if after is None or p.hex() > after]
        started = time.monotonic()
        deadline = None if self.opts.max_seconds is None else started + self.opts.max_seconds
        workers = self.opts.workers or default_workers(self.repo.backend.concurrency)
        last: bytes | None = None
        with ThreadPoolExecutor(workers, thread_name_prefix="vmrepo-verify") as pool:
            inflight: list[Future[tuple[int, int]]] = []
            for pid in todo:  # at least one pack per run, so that runs always progress
                if deadline is not None and last is not None and time.monotonic() >= deadline:
                    read.complete = False
                    break
                if self.opts.check is not None:
                    self.opts.check()
                # The index places blobs (its segments are checksummed); a pack no segment
                # names is read as its header lists it.
                entries = entries_of.get(pid) or headers.get(pid, [])
                inflight.append(pool.submit(self._check_pack, pid, existing[pid], entries))
                self.read_packs.add(pid)
                last = pid
                while len(inflight) >= workers * 2:
                    self._collect(inflight.pop(0), read)
            for fut in inflight:
                self._collect(fut, read)
        read.seconds = round(time.monotonic() - started, 3)
        state.finish(parts, part, None if read.complete else (last.hex() if last else after))
        return read

    def _collect(self, fut: Future[tuple[int, int]], read: ReadData) -> None:
        nbytes, nblobs = fut.result()
        read.packs += 1
        read.bytes += nbytes
        read.blobs += nblobs

    def _check_pack(self, pid: bytes, size: int, entries: list[BlobEntry]) -> tuple[int, int]:
        """Read a pack in ranges and check every blob, and, where the blobs cover it
        without gaps, the whole pack against its id (magic, header and trailer too);
        return bytes and blobs read."""
        key = pack_key(pid)
        store, nbytes, bad = self.repo.store, 0, False
        ranges = list(_ranges(entries, size))
        whole = bool(ranges) and all(ranges[i][1] == ranges[i + 1][0]
                                     for i in range(len(ranges) - 1))
        if whole:
            ranges[0] = (0, *ranges[0][1:])
            ranges[-1] = (ranges[-1][0], size, ranges[-1][2])
        digest = self.repo.hasher.stream() if whole else None
        for start, end, group in ranges:
            try:
                data = memoryview(store.get_range(key, start, end - start))
            except StorageError as exc:
                for e in group:
                    self._bad_copy(e.id, pid, f"cannot read it: {exc}")
                digest, bad = None, True
                continue
            nbytes += len(data)
            if digest is not None:
                digest.update(data)
            for e in group:
                stored = data[e.offset - start:e.offset - start + e.length]
                try:
                    self.repo.check_blob(e.id, stored, e.raw_length,
                                         f"blob {e.id.hex()[:16]} in {key}")
                except IntegrityError as exc:
                    self._bad_copy(e.id, pid, str(exc))
                    bad = True
            if self.opts.progress is not None:
                self.opts.progress(len(data))
        for e in entries:
            if e.offset + e.length > size:
                self._bad_copy(e.id, pid, f"lies past the end of {key} ({size} bytes)")
        if digest is not None and not bad and digest.digest() != pid:
            with self.lock:
                self.report.bad_headers.add(pid)
            self.find(key, "does not match its id, though every blob in it does: its "
                           "magic, header or trailer is damaged (`vmrepo repair` rewrites it)")
        return nbytes, len(entries)

    def _bad_copy(self, bid: bytes, pid: bytes, why: str) -> None:
        with self.lock:
            if (bid, pid) in self.bad.copies and "past the end" in why:
                return
            self.bad.copies.add((bid, pid))
        self.find(f"blob {bid.hex()}", why)

    # -- what the damage affects --------------------------------------------------------

    def _usable(self, bid: bytes) -> bool:
        return any(not self.bad.bad(bid, loc.pack_id)
                   for loc in self.repo.index.locations(bid)
                   if loc.pack_id in self.repo.existing_packs())

    def _manifests(self, snaps: list[Snapshot], ordinals: Ordinals) -> None:
        referenced = bytearray(ordinals.size)
        for snap in snaps:
            ranges_of: list[Affected] = []
            for disk in snap.disks:
                ranges = list(self._disk_ranges(disk.root, disk.size, ordinals, referenced))
                if ranges:
                    ranges_of.append(Affected(snap, disk.name, _merge(ranges)))
            if ranges_of:
                self.report.affected += ranges_of
            else:
                self.report.intact.append(snap)

    def _use(self, bid: bytes, ordinals: Ordinals, referenced: bytearray,
             btype: BlobType) -> bool:
        """Whether a referenced blob is usable; counts its stored bytes once."""
        found = ordinals.of(bid)
        if found is None:
            self.report.lost.setdefault(bid, btype)
            return False
        n, loc = found
        if not referenced[n]:
            referenced[n] = 1
            self.used[loc.pack_id] = self.used.get(loc.pack_id, 0) + loc.length
        if bid in self.unreadable:
            return False
        if not self._usable(bid):
            self.report.lost.setdefault(bid, btype)
            return False
        return True

    def _unreadable(self, bid: bytes, what: str, exc: IntegrityError) -> None:
        self.unreadable.add(bid)
        self.find(f"blob {bid.hex()}", f"{what}: {exc}")

    def _disk_ranges(self, root: bytes, size: int, ordinals: Ordinals,
                     referenced: bytearray) -> Iterator[tuple[int, int]]:
        repo = self.repo
        manifest: Manifest | None = None
        if self._use(root, ordinals, referenced, BlobType.ROOT):
            try:
                manifest = repo.manifest(root)
            except IntegrityError as exc:
                self._unreadable(root, "manifest root", exc)
        if manifest is None:
            yield 0, size
            return
        for page_no, pid in enumerate(manifest.page_ids):
            first, count = manifest.page_span(page_no)
            span = (first * manifest.chunk_size,
                    min(size, (first + count) * manifest.chunk_size))
            if not self._use(pid, ordinals, referenced, BlobType.PAGE):
                yield span
                continue
            try:
                ids = split_page(repo.read_blob(pid, cache=True), count,
                                 f"page {pid.hex()[:16]}")
            except IntegrityError as exc:
                self._unreadable(pid, "manifest page", exc)
                yield span
                continue
            for i, cid in enumerate(ids):
                if cid != ZERO_ID and not self._use(cid, ordinals, referenced, BlobType.CHUNK):
                    index = first + i
                    yield index * manifest.chunk_size, \
                        index * manifest.chunk_size + manifest.chunk_length(index)

    # -- recording ---------------------------------------------------------------------

    def _record(self, existing: dict[bytes, int]) -> None:
        """Replace the damage records: what this run found, plus earlier findings about
        packs it did not read (a partial read) that still exist."""
        store = self.repo.store
        before = damage_records.load(store)
        read_packs = self.read_packs
        merged = Damage(set(self.bad.packs), set(self.bad.copies))
        for b, p in before.copies:
            if p in existing and p not in read_packs:
                merged.copies.add((b, p))
        damage_records.replace(store, merged, before.records)
        self.report.damage = merged


def verify(repo: Repository, opts: VerifyOptions) -> VerifyReport:
    """Verify ``repo`` (see the module docstring)."""
    return _Checker(repo, opts).run()


def _part_of(pack_id: bytes, parts: int) -> int:
    return int.from_bytes(pack_id[:4], "big") % parts


def _ranges(entries: list[BlobEntry], size: int
            ) -> Iterator[tuple[int, int, list[BlobEntry]]]:
    """Byte ranges of at most READ_RANGE (or one blob) covering the entries inside the
    pack, with the entries each covers."""
    inside = sorted((e for e in entries if e.offset + e.length <= size),
                    key=lambda e: e.offset)
    group: list[BlobEntry] = []
    start = end = 0
    for e in inside:
        if group and e.offset + e.length - start > READ_RANGE:
            yield start, end, group
            group = []
        if not group:
            start = e.offset
        group.append(e)
        end = max(end, e.offset + e.length) if len(group) > 1 else e.offset + e.length
    if group:
        yield start, end, group


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


class _State:
    """Where ``read_data`` got to: the part in turn and the last pack read of it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            doc = msgpack.unpackb(path.read_bytes())
            self.doc: dict[str, Any] = doc if doc.get("v") == STATE_VERSION else {}
        except (OSError, ValueError, TypeError, AttributeError, msgpack.ExtraData):
            self.doc = {}

    def start(self, parts: int) -> tuple[int, str | None]:
        if self.doc.get("parts") != parts:
            return 0, None
        return int(self.doc.get("part", 0)) % parts, self.doc.get("after")

    def finish(self, parts: int, part: int, after: str | None) -> None:
        doc = {"v": STATE_VERSION, "parts": parts,
               "part": part if after is not None else (part + 1) % parts, "after": after}
        try:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_bytes(msgpack.packb(doc))
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("cannot remember where verify got to (%s): %s", self.path, exc)
