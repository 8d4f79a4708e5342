"""Instant restore: the disks of a snapshot as NBD exports, read straight from the repository.

A :class:`DiskExport` maps a byte range to chunks through the disk's manifest
(pages loaded when first needed, a bounded number kept), answers all-zero
chunks as holes without reading anything, and gets every other chunk from
the :class:`ChunkCache` that the exports of one snapshot share: an LRU
cache of chunk plaintexts bounded in bytes, filled through the read planner
in batches (grouped by pack, coalesced, checked against their ids) by a few
fetch threads. A chunk wanted by several requests at once is fetched once.

Read-ahead: a read that continues where an earlier one ended starts a window
of the chunks that follow (``read_ahead`` bytes); a marker half-way through
it starts the next window when reading reaches it, so a sequential reader
finds its chunks fetched ahead. Random reads fetch only what they need.

``base:allocation``: zero chunks are holes that read as zeros, other chunks
of the snapshot are data; chunks the guest wrote are described by the
overlay file's own holes.

Writes (only with an :class:`~vmrepo.overlay.Overlay`) never reach the
repository: the overlay takes a chunk over on the first write into it, and
from then on alone answers for it.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vmrepo.sources.nbd import protocol as p
from vmrepo.sources.nbd.server import Export, ExportError, Piece

from .errors import VmrepoError
from .format import ZERO_ID
from .manifest import Manifest, split_page
from .overlay import Overlay, prepare_directory
from .planner import ReadPlanner
from .repository import Repository
from .snapshots import DiskRecord, Snapshot

log = logging.getLogger(__name__)

#: Manifest pages each disk keeps decoded (512 chunk ids each by default).
PAGES_KEPT = 256
#: Chunks of one planner batch, in bytes (the planner coalesces within a batch).
BATCH_BYTES = 8 << 20
#: Most chunks described by one block status reply.
STATUS_CHUNKS = 1 << 16
_RECENT = 64
_TRIGGERS = 256


@dataclass
class ServeStats:
    reads: int = 0
    bytes_read: int = 0
    writes: int = 0
    bytes_written: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    read_ahead: int = 0
    chunks_fetched: int = 0
    storage_requests: int = 0


class _Pending:
    """A chunk being fetched: its bytes, or why it could not be read."""

    __slots__ = ("data", "error", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.data: bytes | None = None
        self.error: str | None = None


class ChunkCache:
    """Chunk plaintexts by id: an LRU cache of at most ``capacity`` bytes, filled through
    the read planner by ``fetchers`` threads; at most a quarter of it is read ahead at
    once."""

    def __init__(self, repo: Repository, capacity: int, *, fetchers: int = 4,
                 workers: int = 2) -> None:
        self.repo = repo
        self.capacity = capacity
        self.stats = ServeStats()
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[bytes, _Pending] = {}
        self._lock = threading.Lock()
        self._batch = max(1, BATCH_BYTES // repo.config.chunk_size)
        self._ahead_limit = capacity // 4 // repo.config.chunk_size
        self._workers = workers
        self._pool = ThreadPoolExecutor(fetchers, thread_name_prefix="vmrepo-serve-fetch")
        self._closed = False

    def get(self, wanted: Sequence[bytes], ahead: Sequence[bytes] = ()
            ) -> list[bytes | _Pending]:
        """For each wanted id its bytes or a pending fetch (see :meth:`wait`); ids missing
        from the cache, and those of ``ahead`` neither cached nor coming, are fetched."""
        out: list[bytes | _Pending] = []
        batch: list[bytes] = []
        with self._lock:
            if self._closed:
                raise ExportError(p.ESHUTDOWN, "the server is stopping")
            for cid in wanted:
                data = self._cache.get(cid)
                if data is not None:
                    self._cache.move_to_end(cid)
                    self.stats.cache_hits += 1
                    out.append(data)
                    continue
                pending = self._inflight.get(cid)
                if pending is None:
                    pending = self._inflight[cid] = _Pending()
                    batch.append(cid)
                    self.stats.cache_misses += 1
                out.append(pending)
            for cid in ahead:
                if len(self._inflight) >= self._ahead_limit:
                    break  # read-ahead in flight is bounded: it must not flush the cache
                if cid not in self._cache and cid not in self._inflight:
                    self._inflight[cid] = _Pending()
                    batch.append(cid)
                    self.stats.read_ahead += 1
            for i in range(0, len(batch), self._batch):
                self._pool.submit(self._fetch, batch[i : i + self._batch])
        return out

    @staticmethod
    def wait(item: bytes | _Pending) -> bytes:
        """The bytes of an item :meth:`get` returned; ExportError(EIO) if unreadable."""
        if isinstance(item, bytes):
            return item
        item.event.wait()
        if item.data is None:
            raise ExportError(p.EIO, item.error or "the chunk could not be read")
        return item.data

    def _fetch(self, ids: list[bytes]) -> None:
        why = "the chunk was not delivered"
        planner: ReadPlanner[bytes] = ReadPlanner(self.repo, self._deliver,
                                                  damaged=self._damaged, workers=self._workers)
        try:
            stats = planner.read((cid, cid) for cid in ids)
            with self._lock:
                self.stats.storage_requests += stats.requests
                self.stats.chunks_fetched += stats.blobs
        except Exception as exc:  # noqa: BLE001 - every waiter must hear why
            why = str(exc) or type(exc).__name__
            log.warning("reading %d chunks failed: %s", len(ids), why)
        finally:
            for cid in ids:
                self._resolve(cid, None, why)

    def _deliver(self, cid: bytes, data: bytes) -> None:
        with self._lock:
            old = self._cache.pop(cid, None)
            self._bytes += len(data) - (len(old) if old is not None else 0)
            self._cache[cid] = data
            while self._bytes > self.capacity and self._cache:
                _, gone = self._cache.popitem(last=False)
                self._bytes -= len(gone)
        self._resolve(cid, data, None)

    def _damaged(self, cid: bytes, blob_id: bytes, why: str) -> None:
        self._resolve(cid, None, why)

    def _resolve(self, cid: bytes, data: bytes | None, why: str | None) -> None:
        with self._lock:
            pending = self._inflight.pop(cid, None)
        if pending is not None:
            pending.data, pending.error = data, why
            pending.event.set()

    def close(self) -> None:
        """Stop fetching; every waiter is answered."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            left = list(self._inflight)
        for cid in left:
            self._resolve(cid, None, "the server is stopping")


class DiskExport(Export):
    """One disk of a snapshot as an NBD export (writable with an overlay)."""

    concurrent = True
    multi_conn = True
    can_block_status = True

    def __init__(self, repo: Repository, disk: DiskRecord, manifest: Manifest,
                 chunks: ChunkCache, overlay: Overlay | None = None,
                 read_ahead: int = 16 << 20) -> None:
        self.repo, self.manifest, self.chunks, self.overlay = repo, manifest, chunks, overlay
        self.name = disk.name
        self.size = manifest.size
        self.writable = self.can_trim = overlay is not None
        self.cs = manifest.chunk_size
        self.stats = chunks.stats
        self._ra = read_ahead // self.cs if read_ahead > 0 else 0
        if read_ahead > 0:
            self._ra = max(2, self._ra)
        self._pages: OrderedDict[int, list[bytes]] = OrderedDict()
        self._page_lock = threading.Lock()
        self._ra_lock = threading.Lock()
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._triggers: OrderedDict[int, int] = OrderedDict()
        self._stats_lock = threading.Lock()
        self._reported: set[int] = set()

    # -- chunk ids -----------------------------------------------------------

    def _page(self, page_no: int) -> list[bytes]:
        with self._page_lock:
            ids = self._pages.get(page_no)
            if ids is not None:
                self._pages.move_to_end(page_no)
                return ids
            try:
                raw = self.repo.page(self.manifest, page_no)
                ids = split_page(raw, self.manifest.page_span(page_no)[1],
                                 f"page {page_no} of disk {self.name}")
            except VmrepoError as exc:
                log.warning("disk %s: manifest page %d cannot be read: %s", self.name,
                            page_no, exc)
                raise ExportError(p.EIO, str(exc)) from None
            self._pages[page_no] = ids
            if len(self._pages) > PAGES_KEPT:
                self._pages.popitem(last=False)
            return ids

    def _ids(self, first: int, end: int) -> list[bytes]:
        """Chunk ids of chunks ``first`` to ``end - 1``."""
        per = self.manifest.page_entries
        out: list[bytes] = []
        for page_no in range(first // per, (end - 1) // per + 1):
            base = page_no * per
            out += self._page(page_no)[max(first, base) - base : min(end, base + per) - base]
        return out

    def _mapped(self, index: int) -> bool:
        return self.overlay is not None and self.overlay.is_mapped(index)

    def _chunk_len(self, index: int) -> int:
        return min(self.cs, self.size - index * self.cs)

    # -- reading -------------------------------------------------------------

    def _windows(self, first: int, last: int) -> list[tuple[int, int]]:
        """Read-ahead windows (chunk ranges) that a read of chunks first..last starts."""
        if not self._ra:
            return []
        total = self.manifest.chunks
        half = self._ra // 2
        out = []
        with self._ra_lock:
            sequential = first in self._recent or first - 1 in self._recent
            self._recent[last] = None
            self._recent.move_to_end(last)
            if len(self._recent) > _RECENT:
                self._recent.popitem(last=False)
            start: int | None = None
            for c in range(first, last + 1):
                if c in self._triggers:
                    start = self._triggers.pop(c)
                    break
            if start is None and sequential and not any(
                    last < t <= last + self._ra for t in self._triggers):
                start = last + 1
            if start is not None and start < total:
                end = min(total, start + self._ra)
                out.append((start, end))
                if end < total:
                    self._triggers[min(start + half, end - 1)] = end
                    if len(self._triggers) > _TRIGGERS:
                        self._triggers.popitem(last=False)
        return out

    def read(self, offset: int, length: int) -> list[Piece]:
        first, last = offset // self.cs, (offset + length - 1) // self.cs
        ids = self._ids(first, last + 1)
        ahead = []
        for start, end in self._windows(first, last):
            ahead += [cid for i, cid in zip(range(start, end), self._ids(start, end),
                                            strict=True)
                      if cid != ZERO_ID and not self._mapped(i)]
        wanted = [i for i in range(first, last + 1)
                  if ids[i - first] != ZERO_ID and not self._mapped(i)]
        got = dict(zip(wanted, self.chunks.get([ids[i - first] for i in wanted], ahead),
                       strict=True))
        pieces: list[Piece] = []
        end = offset + length
        for i in range(first, last + 1):
            start = i * self.cs
            lo, hi = max(offset, start) - start, min(end, start + self._chunk_len(i)) - start
            if self.overlay is not None and self.overlay.is_mapped(i):
                pieces.append((hi - lo, self.overlay.pread(start + lo, hi - lo)))
            elif ids[i - first] == ZERO_ID:
                pieces.append((hi - lo, None))
            else:
                data = self._chunk(i, ids[i - first], got[i])
                pieces.append((hi - lo, data if hi - lo == len(data) else
                               memoryview(data)[lo:hi]))
        with self._stats_lock:
            self.stats.reads += 1
            self.stats.bytes_read += length
        return pieces

    def _chunk(self, index: int, cid: bytes, item: bytes | _Pending) -> bytes:
        try:
            data = self.chunks.wait(item)
            if len(data) != self._chunk_len(index):
                raise ExportError(p.EIO, f"chunk {cid.hex()[:16]} is {len(data)} bytes, "
                                         f"expected {self._chunk_len(index)}")
        except ExportError as exc:
            if exc.errno == p.EIO and index not in self._reported:
                self._reported.add(index)
                start = index * self.cs
                log.warning("disk %s: bytes %d-%d cannot be read (chunk %s): %s", self.name,
                            start, start + self._chunk_len(index) - 1, cid.hex()[:16], exc)
            raise
        return data

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        first = offset // self.cs
        last = min((offset + length - 1) // self.cs, first + STATUS_CHUNKS - 1)
        ids = self._ids(first, last + 1)
        out: list[tuple[int, int]] = []

        def add(n: int, flags: int) -> None:
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + n, flags)
            else:
                out.append((n, flags))

        zero = p.STATE_HOLE | p.STATE_ZERO
        for i in range(first, last + 1):
            start = i * self.cs
            lo = max(offset, start)
            hi = start + self._chunk_len(i)
            if self.overlay is not None and self.overlay.is_mapped(i):
                for n, hole in self.overlay.holes(lo, hi - lo):
                    add(n, zero if hole else 0)
            else:
                add(hi - lo, zero if ids[i - first] == ZERO_ID else 0)
        return out

    # -- writing -------------------------------------------------------------

    def _base(self, index: int) -> bytes | None:
        """The snapshot's bytes of chunk ``index`` (None: all zeros), for a copy-on-write."""
        cid = self._ids(index, index + 1)[0]
        return None if cid == ZERO_ID else self._chunk(index, cid, self.chunks.get([cid])[0])

    def _writing(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except OSError as exc:
            code = p.ENOSPC if exc.errno in (errno.ENOSPC, errno.EDQUOT) else p.EIO
            log.warning("disk %s: %s failed in the overlay: %s", self.name, what,
                        exc.strerror or exc)
            raise ExportError(code, str(exc)) from None

    def pwrite(self, offset: int, data: bytes) -> None:
        ov = self.overlay
        assert ov is not None
        self._writing("a write", lambda: ov.write(offset, len(data), memoryview(data),
                                                  self._base))
        with self._stats_lock:
            self.stats.writes += 1
            self.stats.bytes_written += len(data)

    def write_zeroes(self, offset: int, length: int) -> None:
        ov = self.overlay
        assert ov is not None
        self._writing("writing zeros", lambda: ov.write(offset, length, None, self._base))

    def trim(self, offset: int, length: int) -> None:
        """Trimmed ranges read as zeros (and are holes in the overlay)."""
        self.write_zeroes(offset, length)

    def flush(self) -> None:
        if self.overlay is not None:
            self._writing("a flush", self.overlay.flush)


class SnapshotExports:
    """The exports of a snapshot's disks, sharing one chunk cache; :meth:`close` flushes
    and closes the overlays."""

    def __init__(self, repo: Repository, snap: Snapshot, disks: Sequence[DiskRecord], *,
                 cache_size: int = 256 << 20, read_ahead: int = 16 << 20,
                 overlay_dir: Path | None = None) -> None:
        self.snapshot = snap
        self.chunks = ChunkCache(repo, cache_size)
        self.exports: dict[str, DiskExport] = {}
        identity = {"repository": repo.config.repository_id, "snapshot": snap.id,
                    "vm": snap.vm}
        try:
            if overlay_dir is not None:
                prepare_directory(overlay_dir)
            for d in disks:
                manifest = repo.manifest(d.root)
                overlay = Overlay(overlay_dir, d.name, manifest.size, manifest.chunk_size,
                                  identity) if overlay_dir is not None else None
                self.exports[d.name] = DiskExport(repo, d, manifest, self.chunks, overlay,
                                                  read_ahead)
        except BaseException:
            self.close()
            raise

    @property
    def stats(self) -> ServeStats:
        return self.chunks.stats

    def close(self) -> None:
        self.chunks.close()
        for export in self.exports.values():
            if export.overlay is not None:
                export.overlay.close()
