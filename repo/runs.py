"""Index runs: sorted, fixed-size index entries in a local file, searched in place.

The local index (:mod:`vmrepo.index`) keeps the repository's index entries
in a few *runs*. A run is written once and never changed::

    offset 0    "VMRIRUN1"                              8 bytes
    8           u64 entry count n, u32 pack count p, u8 fanout bits k   (little-endian)
    64          fanout: 2**k x u32, entries whose id's top k bits are <= bucket
    ...         n entries of 49 bytes (segments.ENTRY), sorted by blob id,
                pack numbers index the run's own pack table
    ...         p x (pack id 32 bytes, u64 size or 2**64-1 when unknown)

The fanout table is read into memory (at most 256 KiB); a lookup reads one
bucket (a few dozen entries) with ``pread`` and searches it, so memory does
not grow with the repository (a memory map would: every lookup's page fault
maps its neighbours too, and a process that searched a large run ends up
holding most of it). Runs are merged by copying the largest one in blocks
between the entries of the others, so a small run joins a large one at the
cost of a file copy.
"""

from __future__ import annotations

import array
import heapq
import logging
import os
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import IntegrityError
from .segments import ENTRY, ENTRY_SIZE

log = logging.getLogger(__name__)

MAGIC = b"VMRIRUN1"
HEADER = struct.Struct("<8sQIB")
HEADER_SIZE = 64
PACK = struct.Struct("<32sQ")
NO_SIZE = (1 << 64) - 1
#: A base run is copied in blocks when it is this many times larger than what joins it.
BLOCK_COPY_RATIO = 16
#: Entries read per block when streaming a run from its file.
READ_ENTRIES = 16384

Record = tuple[bytes, int, int, int, int, int]


def fanout_bits(n: int) -> int:
    """Buckets sized to a few dozen entries, between 2**4 and 2**16 of them."""
    k = 4
    while k < 16 and (n >> (k + 5)):
        k += 1
    return k


@dataclass(frozen=True)
class RunPack:
    pack_id: bytes
    size: int | None


class Run:
    """An opened run file; thread-safe (positional reads only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(self._fd).st_size
            head = os.pread(self._fd, HEADER.size, 0)
            if len(head) != HEADER.size:
                raise IntegrityError(f"index run {path.name} is damaged")
            magic, n, npacks, k = HEADER.unpack(head)
            self.n: int = n
            self.npacks: int = npacks
            self.k: int = k
            self._entries = HEADER_SIZE + (4 << self.k)
            self._packs_at = self._entries + self.n * ENTRY_SIZE
            if magic != MAGIC or size != self._packs_at + self.npacks * PACK.size:
                raise IntegrityError(f"index run {path.name} is damaged")
            fanout = array.array("I", os.pread(self._fd, 4 << self.k, HEADER_SIZE))
            if sys.byteorder != "little":
                fanout.byteswap()
            self._fanout = fanout
        except BaseException:
            os.close(self._fd)
            raise
        self._pack_ids: list[bytes] | None = None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- packs ---------------------------------------------------------------

    def packs(self) -> list[RunPack]:
        raw = os.pread(self._fd, self.npacks * PACK.size, self._packs_at)
        return [RunPack(pid, None if size == NO_SIZE else size)
                for pid, size in PACK.iter_unpack(raw)]

    def pack_id(self, ref: int) -> bytes:
        if self._pack_ids is None:
            self._pack_ids = [p.pack_id for p in self.packs()]
        return self._pack_ids[ref]

    # -- lookups -------------------------------------------------------------

    def _bucket(self, blob_id: bytes) -> tuple[int, int]:
        b = int.from_bytes(blob_id[:2], "big") >> (16 - self.k)
        return (self._fanout[b - 1] if b else 0), self._fanout[b]

    def find(self, blob_id: bytes) -> list[Record]:
        """Every entry of ``blob_id`` (usually one)."""
        lo, hi = self._bucket(blob_id)
        if lo == hi:
            return []
        bucket = os.pread(self._fd, (hi - lo) * ENTRY_SIZE, self._entries + lo * ENTRY_SIZE)
        i = _lower_bound(bucket, blob_id, 0, hi - lo)
        out = []
        while i < hi - lo:
            rec: Record = ENTRY.unpack_from(bucket, i * ENTRY_SIZE)
            if rec[0] != blob_id:
                break
            out.append(rec)
            i += 1
        return out

    def locate(self, blob_id: bytes) -> tuple[int, Record] | None:
        """The position and entry of the first entry of ``blob_id``, if the run has one."""
        lo, hi = self._bucket(blob_id)
        if lo == hi:
            return None
        bucket = os.pread(self._fd, (hi - lo) * ENTRY_SIZE, self._entries + lo * ENTRY_SIZE)
        i = _lower_bound(bucket, blob_id, 0, hi - lo)
        if i < hi - lo:
            rec: Record = ENTRY.unpack_from(bucket, i * ENTRY_SIZE)
            if rec[0] == blob_id:
                return lo + i, rec
        return None

    def position(self, blob_id: bytes) -> int:
        """How many entries sort before ``blob_id``."""
        lo, hi = self._bucket(blob_id)
        if lo == hi:
            return lo
        bucket = os.pread(self._fd, (hi - lo) * ENTRY_SIZE, self._entries + lo * ENTRY_SIZE)
        return lo + _lower_bound(bucket, blob_id, 0, hi - lo)

    def records(self) -> Iterator[Record]:
        """Every entry in order, read in blocks."""
        for start in range(0, self.n, READ_ENTRIES):
            yield from ENTRY.iter_unpack(self.raw_range(start, min(self.n, start +
                                                                   READ_ENTRIES)))

    def raw_range(self, start: int, end: int) -> bytes:
        """Entries ``start`` to ``end`` as stored."""
        want = (end - start) * ENTRY_SIZE
        data = os.pread(self._fd, want, self._entries + start * ENTRY_SIZE)
        if len(data) != want:
            raise IntegrityError(f"index run {self.path.name} is truncated")
        return data


def _lower_bound(data: bytes, blob_id: bytes, lo: int, hi: int) -> int:
    while lo < hi:
        mid = (lo + hi) >> 1
        at = mid * ENTRY_SIZE
        if data[at : at + 32] < blob_id:
            lo = mid + 1
        else:
            hi = mid
    return lo


class RunWriter:
    """Writes one run: entries in order, then the fanout and the pack table."""

    def __init__(self, path: Path, expected: int, packs: Sequence[RunPack]) -> None:
        self.path = path
        self.k = fanout_bits(expected)
        self.counts = [0] * (1 << self.k)
        self.n = 0
        self.packs = list(packs)
        self._tmp = path.with_name(f".tmp-{path.name}")
        self._f = open(self._tmp, "wb")  # noqa: SIM115 - closed in finish/abort
        self._f.seek(HEADER_SIZE + (4 << self.k))
        self._buf: list[bytes] = []
        self._last = b""

    def add_packed(self, data: bytes, first_id: bytes, last_id: bytes,
                   counts: Iterable[tuple[int, int]]) -> None:
        """Append entries already in run form; ``counts`` are (bucket, n) pairs."""
        if first_id < self._last:
            raise ValueError("run entries out of order")
        self._flush()
        self._f.write(data)
        self.n += len(data) // ENTRY_SIZE
        for b, c in counts:
            self.counts[b] += c
        self._last = last_id

    def add(self, rec: Record) -> None:
        if rec[0] < self._last:
            raise ValueError("run entries out of order")
        self._last = rec[0]
        self._buf.append(ENTRY.pack(*rec))
        self.counts[int.from_bytes(rec[0][:2], "big") >> (16 - self.k)] += 1
        self.n += 1
        if len(self._buf) >= 65536:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._f.write(b"".join(self._buf))
            self._buf.clear()

    def finish(self) -> Run:
        self._flush()
        for p in self.packs:
            self._f.write(PACK.pack(p.pack_id, NO_SIZE if p.size is None else p.size))
        total = 0
        fanout = []
        for c in self.counts:
            total += c
            fanout.append(total)
        self._f.seek(0)
        self._f.write(HEADER.pack(MAGIC, self.n, len(self.packs), self.k).ljust(HEADER_SIZE,
                                                                              b"\0"))
        self._f.write(struct.pack(f"<{len(fanout)}I", *fanout))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        return Run(self.path)

    def abort(self) -> None:
        self._f.close()
        try:
            os.unlink(self._tmp)
        except OSError as exc:
            log.debug("cannot remove %s: %s", self._tmp, exc)


@dataclass
class Source:
    """Sorted entries to merge: records whose pack numbers index ``packs``."""

    packs: Sequence[RunPack]
    records: Callable[[], Iterator[Record]]
    count: int


def _remapped(src: Source, refs: list[int]) -> Iterator[Record]:
    for bid, ref, off, length, raw, btype in src.records():
        yield bid, refs[ref], off, length, raw, btype


def write_run(path: Path, sources: Sequence[Source], base: Run | None = None) -> Run:
    """Merge ``sources`` (and, copied in blocks, the run ``base``) into a new run at ``path``.

    Duplicate pack ids get one number; identical entries are kept once.
    """
    table: dict[bytes, int] = {}
    packs: list[RunPack] = []

    def number(p: RunPack) -> int:
        ref = table.get(p.pack_id)
        if ref is None:
            ref = table[p.pack_id] = len(packs)
            packs.append(p)
        elif packs[ref].size is None and p.size is not None:
            packs[ref] = p
        return ref

    if base is not None and sum(s.count for s in sources) * BLOCK_COPY_RATIO > base.n:
        # Comparable sizes: a plain merge is cheaper than a lookup per inserted entry.
        sources = [*sources, Source(base.packs(), base.records, base.n)]
        base = None
    if base is not None:
        for p in base.packs():
            number(p)
    maps = [[number(p) for p in src.packs] for src in sources]
    expected = sum(s.count for s in sources) + (base.n if base is not None else 0)
    writer = RunWriter(path, expected, packs)
    try:
        merged = heapq.merge(*(_remapped(s, m) for s, m in zip(sources, maps, strict=True)))
        if base is None:
            _write_unique(writer, merged)
        else:
            _merge_into_base(writer, base, merged)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _write_unique(writer: RunWriter, records: Iterable[Record]) -> None:
    last: Record | None = None
    for rec in records:
        if rec != last:
            writer.add(rec)
            last = rec


def _merge_into_base(writer: RunWriter, base: Run, records: Iterable[Record]) -> None:
    """Copy ``base`` in blocks, inserting ``records`` where they belong."""
    pos = 0
    shift = 16 - writer.k
    last: Record | None = None
    for rec in records:
        if rec == last:
            continue
        last = rec
        at = max(pos, base.position(rec[0]))
        while at < base.n and (cur := ENTRY.unpack_from(base.raw_range(at, at + 1)))[0] == \
                rec[0] and cur < rec:
            at += 1  # keep equal ids in record order
        if at > pos:
            _copy_block(writer, base, pos, at, shift)
            pos = at
        if pos < base.n and ENTRY.unpack_from(base.raw_range(pos, pos + 1)) == rec:
            continue  # already in the base
        writer.add(rec)
    if pos < base.n:
        _copy_block(writer, base, pos, base.n, shift)


def _copy_block(writer: RunWriter, base: Run, start: int, end: int, shift: int) -> None:
    step = 1 << 16
    for s in range(start, end, step):
        e = min(end, s + step)
        data = base.raw_range(s, e)
        first = data[:32]
        last = data[(e - s - 1) * ENTRY_SIZE : (e - s - 1) * ENTRY_SIZE + 32]
        counts: dict[int, int] = {}
        # Bucket counts from the block's ids: walk bucket boundaries, not every entry.
        i = 0
        n = e - s
        while i < n:
            b = int.from_bytes(data[i * ENTRY_SIZE : i * ENTRY_SIZE + 2], "big") >> shift
            j = _bucket_end(data, i, n, b, shift)
            counts[b] = counts.get(b, 0) + (j - i)
            i = j
        writer.add_packed(data, first, last, counts.items())


def _bucket_end(data: bytes, i: int, n: int, b: int, shift: int) -> int:
    """First index at or after ``i`` whose bucket is beyond ``b`` (binary search)."""
    lo, hi = i, n
    while lo < hi:
        mid = (lo + hi) >> 1
        if int.from_bytes(data[mid * ENTRY_SIZE : mid * ENTRY_SIZE + 2], "big") >> shift <= b:
            lo = mid + 1
        else:
            hi = mid
    return lo
