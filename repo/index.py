"""The index: blob id -> where the blob is stored, without holding the index in memory.

The repository's index is the union of its segments (:mod:`vmrepo.segments`)
minus those another segment supersedes. Locally it is kept as a few sorted
*runs* in the cache directory (:mod:`vmrepo.runs`), shared by every vmrepo
process of the user, plus a small in-memory part for segments too small to
be worth a run and for what this process's sessions have just written.

:meth:`Index.sync` brings the local runs up to date with the repository's
segment listing: new segments are added; if a segment the runs include has
gone or is superseded (a merge), the runs are rebuilt. Memory stays bounded
whatever the size of the repository: lookups search the mapped run files,
the in-memory part is spilled into a run beyond :data:`SPILL_ENTRIES`.

Several entries may name one blob (stored twice, e.g. by concurrent writers
or to replace a damaged copy); :meth:`Index.locations` returns them all, and
:meth:`Index.get` the first in a pack the *pack filter* accepts (packs that
exist, are not marked for deletion, are not known to be damaged).
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import msgpack
from vmrepo.storage.base import ObjectInfo
from vmrepo.storage.errors import ObjectNotFound

from .errors import IntegrityError
from .format import BLOB_TYPES, INDEX_PREFIX, BlobType, index_key, parse_hex_name
from .runs import Record, Run, RunPack, Source, write_run
from .segments import Segment, check_records
from .store import RepoStore

log = logging.getLogger(__name__)

#: Entries kept in memory before they are written into a run.
SPILL_ENTRIES = 50_000
#: More runs than this are merged regardless of their sizes.
MAX_RUNS = 10
#: Segment bytes loaded at once while rebuilding (bounds memory).
GROUP_BYTES = 32 << 20
STATE_VERSION = 1
#: Times a sync starts over when segments vanish while it reads them.
SYNC_ATTEMPTS = 4


class Location(NamedTuple):
    """Where a blob is stored (a tuple: one is made per lookup and per entry read)."""

    pack_id: bytes
    type: BlobType
    offset: int
    length: int
    raw_length: int


@dataclass
class _RunState:
    file: str
    segments: set[bytes]
    n: int


@dataclass
class _State:
    runs: list[_RunState] = field(default_factory=list)
    superseded: set[bytes] = field(default_factory=set)

    @property
    def covered(self) -> set[bytes]:
        out: set[bytes] = set()
        for r in self.runs:
            out |= r.segments
        return out


PackFilter = Callable[[bytes], bool]


class Index:
    """The repository's index as local runs plus an in-memory part; thread-safe."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._runs: list[Run] = []
        self._mem: dict[bytes, list[Location]] = {}
        self._mem_count = 0
        self._mem_segments: set[bytes] = set()
        self._mem_pack_sizes: dict[bytes, int | None] = {}
        self._covered: set[bytes] = set()
        #: Runs replaced by newer ones; other threads may still be searching them.
        self._retired: list[Run] = []
        self._lock = threading.RLock()
        self._filter: PackFilter | None = None
        self._bad: frozenset[tuple[bytes, bytes]] = frozenset()
        self._run_ok: dict[int, bytearray] = {}
        self.synced = False
        self._vanished = False

    # -- lookups -------------------------------------------------------------

    def set_pack_filter(self, accept: PackFilter | None,
                        bad_copies: frozenset[tuple[bytes, bytes]] = frozenset()) -> None:
        """Use only entries in packs ``accept`` approves (None: every pack), and none of the
        ``(blob id, pack id)`` copies in ``bad_copies`` (damage verify found)."""
        with self._lock:
            self._filter = accept
            self._bad = bad_copies
            self._run_ok.clear()

    def _ok(self, run: Run, ref: int) -> bool:
        if self._filter is None:
            return True
        flags = self._run_ok.get(id(run))
        if flags is None:
            flags = bytearray(self._filter(run.pack_id(i)) for i in range(run.npacks))
            self._run_ok[id(run)] = flags
        return bool(flags[ref])

    def locations(self, blob_id: bytes) -> list[Location]:
        """Every entry of the blob, usable or not."""
        with self._lock:
            out = list(self._mem.get(blob_id, ()))
            runs = list(self._runs)
        for run in runs:
            for _, ref, off, length, raw, btype in run.find(blob_id):
                out.append(Location(run.pack_id(ref), BLOB_TYPES[btype], off, length, raw))
        return out

    def get(self, blob_id: bytes) -> Location | None:
        """The first entry of the blob in a pack the filter accepts."""
        with self._lock:
            bad = self._bad
            for loc in self._mem.get(blob_id, ()):
                if (self._filter is None or self._filter(loc.pack_id)) and \
                        (not bad or (blob_id, loc.pack_id) not in bad):
                    return loc
            runs = list(self._runs)
        for run in runs:
            for _, ref, off, length, raw, btype in run.find(blob_id):
                if self._ok(run, ref) and (not bad or (blob_id, run.pack_id(ref)) not in bad):
                    return Location(run.pack_id(ref), BLOB_TYPES[btype], off, length, raw)
        return None

    def __contains__(self, blob_id: bytes) -> bool:
        return self.get(blob_id) is not None

    def __len__(self) -> int:
        """Entries (duplicates included)."""
        with self._lock:
            return self._mem_count + sum(r.n for r in self._runs)

    def entries(self) -> Iterator[tuple[bytes, Location]]:
        """Every entry, run by run (no global order; duplicates included)."""
        with self._lock:
            runs = list(self._runs)
            mem = [(bid, loc) for bid, locs in self._mem.items() for loc in locs]
        for run in runs:
            for bid, ref, off, length, raw, btype in run.records():
                yield bid, Location(run.pack_id(ref), BLOB_TYPES[btype], off, length, raw)
        yield from mem

    def packs(self) -> dict[bytes, int | None]:
        """Every pack the index names, with its size where a segment recorded it."""
        out: dict[bytes, int | None] = {}
        with self._lock:
            for run in self._runs:
                for p in run.packs():
                    if out.get(p.pack_id) is None:
                        out[p.pack_id] = p.size
            for locs in self._mem.values():
                for loc in locs:
                    out.setdefault(loc.pack_id, None)
            sizes = dict(self._mem_pack_sizes)
        out.update({k: v for k, v in sizes.items() if v is not None})
        return out

    def ordinals(self) -> Ordinals:
        """Numbers for the blobs this index holds, fixed while it is not changed."""
        with self._lock:
            return Ordinals(list(self._runs), {bid: list(locs) for bid, locs in self._mem.items()})

    @property
    def covered(self) -> frozenset[bytes]:
        """The segments whose entries this index holds."""
        with self._lock:
            return frozenset(self._covered)

    # -- adding --------------------------------------------------------------

    def publish(self, segment_id: bytes, segment: Segment) -> None:
        """Make a durable segment's entries visible (a session's own, or a small new one);
        IntegrityError, leaving the index as it was, if an entry is malformed."""
        records = list(check_records(segment, index_key(segment_id)))
        with self._lock:
            if segment_id in self._covered:
                return
            for pid, size in zip(segment.packs, segment.pack_sizes, strict=True):
                self._mem_pack_sizes[pid] = size
            packs, mem = segment.packs, self._mem
            for bid, ref, off, length, raw, btype in records:
                mem.setdefault(bid, []).append(
                    Location(packs[ref], BLOB_TYPES[btype], off, length, raw))
            self._mem_count += len(segment)
            self._mem_segments.add(segment_id)
            self._covered.add(segment_id)
            if self._mem_count >= SPILL_ENTRIES:
                self._spill()

    def _spill(self) -> None:
        """Write the in-memory entries into a run and register it (lock held)."""
        packs: dict[bytes, int] = {}
        recs: list[Record] = []
        for bid, locs in self._mem.items():
            for loc in locs:
                ref = packs.setdefault(loc.pack_id, len(packs))
                recs.append((bid, ref, loc.offset, loc.length, loc.raw_length, int(loc.type)))
        recs.sort()
        table = [RunPack(pid, self._mem_pack_sizes.get(pid)) for pid in packs]
        source = Source(table, lambda: iter(recs), len(recs))
        with self._flock():
            state = self._read_state()
            run = write_run(self._new_run_path(), [source])
            state.runs.append(_RunState(run.path.name, set(self._mem_segments), run.n))
            state = self._compact(state)
            self._write_state(state)
            self._open_runs(state)
        self._mem.clear()
        self._mem_count = 0
        self._mem_segments.clear()
        self._mem_pack_sizes = {}

    # -- keeping up with the repository --------------------------------------

    def sync(self, store: RepoStore) -> None:
        """Bring the index up to date with the repository's segments.

        Lookups go on while it runs (it may be called during a session, to see what other
        writers have indexed since); the new runs replace the old at once. A segment that
        vanishes while it is read was merged into another by a prune: the sync starts over
        (a few times), so that the merged segment is read instead.
        """
        for _ in range(SYNC_ATTEMPTS):
            self._vanished = False
            self._sync(store)
            if not self._vanished:
                return
            log.info("an index segment vanished while it was read (a prune merged it): "
                     "reading the index again")
        log.warning("index segments kept vanishing while the index was read (merges in "
                    "progress): some blobs may look unindexed to this run")

    def _sync(self, store: RepoStore) -> None:
        listing = store.listing(INDEX_PREFIX, lambda k: parse_hex_name(k, INDEX_PREFIX) is not None)
        present = {bytes.fromhex(i.key[len(INDEX_PREFIX):]) for i in listing}
        store.forget_cached(INDEX_PREFIX, (index_key(s) for s in present))
        with self._lock:
            held = set(self._mem_segments)
        with self._flock():
            state = self._read_state()
            covered = state.covered
            fresh: dict[bytes, Segment] = {}
            superseded = set(state.superseded)
            for sid in sorted(present - covered - superseded - held):
                seg = self._load(store, sid)
                if seg is not None:
                    fresh[sid] = seg
                    superseded |= set(seg.supersedes)
            rebuilt = bool((covered - present) or (covered & superseded)
                           or not self._runs_exist(state))
            if rebuilt:
                log.info("rebuilding the local index (%d segments)", len(present))
                state = self._rebuild(store, listing)
                fresh = {}
            else:
                state.superseded = superseded & present
                small = {sid: seg for sid, seg in fresh.items() if sid not in superseded}
                if sum(len(s) for s in small.values()) >= SPILL_ENTRIES:
                    run = write_run(self._new_run_path(), [_source(s, sid) for sid, s in
                                                           sorted(small.items())])
                    state.runs.append(_RunState(run.path.name, set(small), run.n))
                    run.close()
                    small = {}
                state = self._compact(state)
                fresh = small
            self._write_state(state)
            with self._lock:
                current = {run.path.name: run for run in self._runs}
            runs = [current.get(r.file) or Run(self.directory / r.file) for r in state.runs]
        keep = held & present - state.covered - state.superseded
        reload = rebuilt or keep != held
        with self._lock:
            if [r.path.name for r in runs] != [r.path.name for r in self._runs]:
                self._retired += [r for r in self._runs if r not in runs]
                self._runs = runs
                self._run_ok.clear()
            self._covered = set(state.covered) | (set() if reload else keep)
            if reload:
                self._mem.clear()
                self._mem_count = 0
                self._mem_segments.clear()
                self._mem_pack_sizes = {}
        if reload:  # what this process held in memory and the runs do not cover yet
            for sid in sorted(keep):
                seg = self._load(store, sid)
                if seg is not None:
                    fresh[sid] = seg
        for sid, seg in sorted(fresh.items()):
            self.publish(sid, seg)
        self.synced = True
        log.info("index: %d entries from %d segments (%d runs on disk, %d entries in memory)",
                 len(self), len(self._covered), len(self._runs), self._mem_count)

    def _load(self, store: RepoStore, sid: bytes) -> Segment | None:
        key = index_key(sid)
        try:
            return store.load_segment(sid)
        except IntegrityError as exc:
            store.damaged(exc, key)
        except ObjectNotFound:
            log.debug("%s vanished while the index was read", key)
            self._vanished = True
        return None

    def _rebuild(self, store: RepoStore, listing: list[ObjectInfo]) -> _State:
        """New runs from every current segment, loaded a bounded group at a time."""
        superseded: set[bytes] = set()
        state = _State()
        group: list[tuple[bytes, Segment]] = []
        size = 0

        def flush() -> None:
            nonlocal size
            if group:
                run = write_run(self._new_run_path(), [_source(seg, sid) for sid, seg in group])
                state.runs.append(_RunState(run.path.name, {sid for sid, _ in group}, run.n))
                run.close()
                group.clear()
                size = 0

        for info in sorted(listing, key=lambda i: i.key):
            sid = bytes.fromhex(info.key[len(INDEX_PREFIX):])
            seg = self._load(store, sid)
            if seg is None:
                continue
            superseded |= set(seg.supersedes)
            if group and size + info.size > GROUP_BYTES:
                flush()
            group.append((sid, seg))
            size += info.size
        flush()
        present = {bytes.fromhex(i.key[len(INDEX_PREFIX):]) for i in listing}
        if state.covered & superseded:
            # A merge's leftovers were included: build again without them (rare).
            return self._rebuild(store, [i for i in listing if bytes.fromhex(
                i.key[len(INDEX_PREFIX):]) not in superseded])
        state.superseded = superseded & present
        if len(state.runs) > 1:  # one k-way merge, not a cascade of pairwise ones
            runs = [Run(self.directory / r.file) for r in state.runs]
            try:
                merged = write_run(self._new_run_path(), [_run_source(r) for r in runs])
            finally:
                for r in runs:
                    r.close()
            state.runs = [_RunState(merged.path.name, state.covered, merged.n)]
            merged.close()
        return state

    def _compact(self, state: _State) -> _State:
        """Merge the newest runs while they are comparable in size (or too many)."""
        runs = [r for r in state.runs if r.n > 0 or r.segments]
        while len(runs) >= 2 and (runs[-1].n * 2 >= runs[-2].n or len(runs) > MAX_RUNS):
            a, b = runs[-2], runs[-1]
            ra, rb = Run(self.directory / a.file), Run(self.directory / b.file)
            try:
                base, other = (ra, rb) if ra.n >= rb.n else (rb, ra)
                merged = write_run(self._new_run_path(), [_run_source(other)], base=base)
            finally:
                ra.close()
                rb.close()
            runs[-2:] = [_RunState(merged.path.name, a.segments | b.segments, merged.n)]
            merged.close()
        state.runs = runs
        return state

    # -- the state file ------------------------------------------------------

    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _new_run_path(self) -> Path:
        return self.directory / f"run-{secrets.token_hex(8)}.idx"

    def _read_state(self) -> _State:
        try:
            raw = (self.directory / "state").read_bytes()
            doc = msgpack.unpackb(raw, raw=False)
            if doc.get("v") != STATE_VERSION:
                raise ValueError("state version")
            return _State([_RunState(str(r["file"]), {bytes(s) for s in r["segments"]},
                                     int(r["n"])) for r in doc["runs"]],
                          {bytes(s) for s in doc["superseded"]})
        except FileNotFoundError:
            return _State()
        except (OSError, ValueError, KeyError, TypeError, msgpack.ExtraData) as exc:
            log.info("local index state unreadable (%s): rebuilding", exc)
            return _State(runs=[_RunState("missing", set(), 0)])

    def _runs_exist(self, state: _State) -> bool:
        return all((self.directory / r.file).is_file() for r in state.runs)

    def _write_state(self, state: _State) -> None:
        doc = {"v": STATE_VERSION, "superseded": sorted(state.superseded),
               "runs": [{"file": r.file, "segments": sorted(r.segments), "n": r.n}
                        for r in state.runs]}
        tmp = self.directory / f".state.{secrets.token_hex(4)}"
        tmp.write_bytes(msgpack.packb(doc, use_bin_type=True))
        os.replace(tmp, self.directory / "state")
        keep = {r.file for r in state.runs}
        for p in self.directory.glob("run-*.idx"):
            if p.name not in keep:
                try:
                    p.unlink()  # mapped by others: the data lives on until they close it
                except OSError as exc:
                    log.debug("cannot remove old index run %s: %s", p, exc)

    def _open_runs(self, state: _State) -> None:
        runs = [Run(self.directory / r.file) for r in state.runs]
        self._retired += self._runs
        self._runs = runs
        self._run_ok.clear()

    def close(self) -> None:
        with self._lock:
            for run in self._runs + self._retired:
                run.close()
            self._runs, self._retired = [], []


class Ordinals:
    """A dense number per indexed blob (the position of its first entry), so that per-blob
    counters fit in an array instead of a dictionary of ids. Numbers hold for the index
    state the object was made from (:meth:`Index.ordinals`)."""

    def __init__(self, runs: list[Run], mem: dict[bytes, list[Location]]) -> None:
        self._runs = runs
        self._bases = []
        base = 0
        for run in runs:
            self._bases.append(base)
            base += run.n
        self._mem_ids = sorted(mem)
        self._mem = {bid: base + i for i, bid in enumerate(self._mem_ids)}
        self._mem_locs = mem
        self.size = base + len(mem)

    def of(self, blob_id: bytes) -> tuple[int, Location] | None:
        """The blob's number and location, or None if the index does not have it."""
        n = self._mem.get(blob_id)
        if n is not None:
            return n, self._mem_locs[blob_id][0]
        for base, run in zip(self._bases, self._runs, strict=True):
            found = run.locate(blob_id)
            if found is not None:
                pos, rec = found
                return base + pos, Location(run.pack_id(rec[1]), BLOB_TYPES[rec[5]], rec[2],
                                            rec[3], rec[4])
        return None

    def groups(self) -> Iterator[tuple[int, bytes, list[Location]]]:
        """Every indexed blob once, in id order: its number, id and every entry (in-memory
        entries first, then run by run, as :meth:`of` and :meth:`Index.get` see them).
        Streams the runs: memory does not grow with the index."""
        def mem() -> Iterator[tuple[bytes, int, int, Record | None]]:
            for bid in self._mem_ids:
                yield bid, -1, 0, None

        def run_records(k: int) -> Iterator[tuple[bytes, int, int, Record | None]]:
            for pos, rec in enumerate(self._runs[k].records()):
                yield rec[0], k, pos, rec

        sources = [mem(), *(run_records(k) for k in range(len(self._runs)))]
        current: bytes | None = None
        number = 0
        locs: list[Location] = []
        # heapq.merge keeps the order of its inputs for equal keys: memory, then runs.
        for bid, k, pos, rec in heapq.merge(*sources, key=lambda item: item[0]):
            if bid != current:
                if current is not None:
                    yield number, current, locs
                current, locs = bid, []
                number = self._mem[bid] if k < 0 else self._bases[k] + pos
            if rec is None:
                locs.extend(self._mem_locs[bid])
            else:
                locs.append(Location(self._runs[k].pack_id(rec[1]), BLOB_TYPES[rec[5]], rec[2],
                                     rec[3], rec[4]))
        if current is not None:
            yield number, current, locs


def _source(seg: Segment, sid: bytes) -> Source:
    packs = [RunPack(p, s) for p, s in zip(seg.packs, seg.pack_sizes, strict=True)]
    key = index_key(sid)
    return Source(packs, lambda: check_records(seg, key), len(seg))


def _run_source(run: Run) -> Source:
    return Source(run.packs(), run.records, run.n)

