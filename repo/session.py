"""A write session: new blobs go into packs and become visible through durable index segments.

Thread-safe. Workers call :meth:`WriteSession.add` with plaintext blobs; a
blob the index or this session already has is dropped, a new one is encoded
(outside any lock), appended to the open pack, and the pack is sealed once
it reaches the configured size. Sealed packs are hashed and stored by two
background threads, so encoding goes on while packs are written (and one
pack's fsync or upload overlaps the next one's hashing); at most
``max_queued`` full packs wait or are being stored, which with the open one
bounds memory to ``max_queued + 1`` packs.

Visibility (docs/format.md, write ordering): a blob of this session is known
only to this session until the index segment naming its pack is durable;
then it is published to the repository's index. The uploader writes such a
segment every ``flush_packs`` packs or ``flush_seconds`` seconds, so a
snapshot killed half-way leaves its packs indexed and the next run reuses
them. :meth:`commit` stores the last pack and the last segment.
:meth:`abort` stops the uploader; packs already stored are indexed by a
last segment (best effort) but not published in this process, so a failed
session leaves the in-memory index as it found it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .format import BlobType, index_key
from .pack import BlobEntry, PackBuilder
from .segments import Segment, encode_packed, pack_entries

if TYPE_CHECKING:
    from .repository import Repository

log = logging.getLogger(__name__)


@dataclass
class SessionStats:
    """What a session added to the repository."""

    blobs_new: int = 0
    raw_bytes_new: int = 0
    stored_bytes_new: int = 0
    packs: int = 0
    pack_bytes: int = 0
    segments: int = 0


@dataclass
class _Ready:
    """A whole pack to store as it is."""

    pack_id: bytes
    data: bytes
    entries: list[BlobEntry]


class WriteSession:
    """One writer's session against a repository."""

    def __init__(self, repo: Repository, *, flush_packs: int = 8, flush_seconds: float = 30.0,
                 max_queued: int = 2, check: Callable[[], None] | None = None,
                 refresh: bool = True) -> None:
        self.repo = repo
        self.store = repo.store
        self.index = repo.index
        self.pack_size = repo.config.pack_size
        self.flush_packs = flush_packs
        self.flush_seconds = flush_seconds
        self.check = check
        #: Re-read the index after each segment, to reuse what other writers stored since.
        self.refresh = refresh
        self.stats = SessionStats()
        self.segment_keys: list[str] = []
        self._lock = threading.Lock()
        #: Blobs of this session not yet in a published segment.
        self._pending: set[bytes] = set()
        self._builder = PackBuilder()
        #: Packs stored but not yet named by a durable segment: (id, size, entries).
        self._unindexed: list[tuple[bytes, int, list[BlobEntry]]] = []
        self._last_flush = time.monotonic()
        self._queue: queue.Queue[PackBuilder | _Ready | None] = queue.Queue()
        self._room = threading.BoundedSemaphore(max_queued)
        #: Packs sealed and stored at once: hashing a pack and waiting for its write (an
        #: fsync, or a remote request) overlap with the next one's.
        self.uploads = max(1, min(2, max_queued, repo.backend.concurrency))
        self._flush_lock = threading.Lock()
        self._error: BaseException | None = None
        self._uploaders: list[threading.Thread] = []
        self._closed = False
        #: Pack ids a prune condemned: a new pack must not take one (docs/format.md §13).
        self.avoid = repo.condemned

    def known(self, blob_id: bytes) -> bool:
        """Whether the blob is usable in the index or already on its way into a pack."""
        with self._lock:
            if blob_id in self._pending:
                return True
        return blob_id in self.index

    def add(self, blob_id: bytes, btype: BlobType, data: bytes | bytearray | memoryview) -> int:
        """Store ``data`` unless known; return the stored bytes it added (0 if deduplicated)."""
        if not self._claim(blob_id):
            return 0
        stored = self.store.codec.encode_blob(blob_id, data)
        self._append(blob_id, btype, stored, len(data))
        return len(stored)

    def add_stored(self, blob_id: bytes, btype: BlobType, stored: bytes, raw_length: int) -> int:
        """Store a blob already in stored form (from a repository with the same keys),
        unless known; return the stored bytes it added."""
        if not self._claim(blob_id):
            return 0
        self._append(blob_id, btype, stored, raw_length)
        return len(stored)

    def add_pack(self, pack_id: bytes, data: bytes, entries: list[BlobEntry]) -> None:
        """Store a whole pack as it is (its id is the keyed hash of ``data``); its blobs become
        known like any others once the segment naming it is durable. A pack a prune condemned
        is not stored under its id again: its blobs go into new packs."""
        if pack_id in self.avoid:
            for e in entries:
                self.add_stored(e.id, e.type, data[e.offset:e.offset + e.length], e.raw_length)
            return
        self._raise_upload_error()
        with self._lock:
            self._pending.update(e.id for e in entries)
            self.stats.blobs_new += len(entries)
            self.stats.raw_bytes_new += sum(e.raw_length for e in entries)
            self.stats.stored_bytes_new += sum(e.length for e in entries)
        self._enqueue(_Ready(pack_id, data, entries))

    def _claim(self, blob_id: bytes) -> bool:
        """Whether this session must store the blob (it is neither indexed nor pending)."""
        self._raise_upload_error()
        if self.check is not None:
            self.check()
        if self.known(blob_id):
            return False
        with self._lock:
            if blob_id in self._pending:
                return False
            self._pending.add(blob_id)
        return True

    def _append(self, blob_id: bytes, btype: BlobType, stored: bytes | bytearray,
                raw_length: int) -> None:
        full: PackBuilder | None = None
        with self._lock:
            self._builder.add(blob_id, btype, stored, raw_length)
            self.stats.blobs_new += 1
            self.stats.raw_bytes_new += raw_length
            self.stats.stored_bytes_new += len(stored)
            if self._builder.size >= self.pack_size:
                full, self._builder = self._builder, PackBuilder()
        if full is not None:
            self._enqueue(full)

    # -- the uploader --------------------------------------------------------

    def _raise_upload_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _enqueue(self, builder: PackBuilder | _Ready) -> None:
        with self._lock:
            while len(self._uploaders) < self.uploads:
                t = threading.Thread(target=self._upload_loop, name="vmrepo-packs", daemon=True)
                t.start()
                self._uploaders.append(t)
        while not self._room.acquire(timeout=0.5):
            self._raise_upload_error()
        self._raise_upload_error()
        self._queue.put(builder)

    def _upload_loop(self) -> None:
        while (builder := self._queue.get()) is not None:
            try:
                if self._error is None:
                    self._store(builder)
                    if (len(self._unindexed) >= self.flush_packs
                            or time.monotonic() - self._last_flush >= self.flush_seconds):
                        self._flush(publish=True, refresh=True)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                self._error = exc
            finally:
                del builder  # its memory is free before room for another is made
                self._room.release()

    def _store(self, builder: PackBuilder | _Ready) -> None:
        parts: Sequence[bytes | bytearray | memoryview]
        if isinstance(builder, _Ready):
            pack_id, parts, entries = builder.pack_id, [builder.data], builder.entries
        else:
            entries = list(builder.entries)
            pack_id, parts = builder.seal(self.store.hasher, self.store.codec, self.avoid)
        self.store.put_pack(pack_id, parts)
        size = sum(len(p) for p in parts)
        self.repo.note_pack(pack_id, size)
        with self._lock:
            self._unindexed.append((pack_id, size, entries))
            self.stats.packs += 1
            self.stats.pack_bytes += size

    def _flush(self, publish: bool, refresh: bool = False) -> None:
        """Write a segment naming the stored packs; publish it to the index if asked (and
        then, with ``refresh``, pick up what other writers indexed meanwhile)."""
        with self._flush_lock:
            self._flush_locked(publish, refresh)

    def _flush_locked(self, publish: bool, refresh: bool) -> None:
        with self._lock:
            packs, self._unindexed = self._unindexed, []
        self._last_flush = time.monotonic()
        if not packs:
            return
        ids, sizes, entries = pack_entries(packs)
        key, raw = encode_packed(self.store.codec, self.store.hasher, ids, sizes, entries)
        self.store.put_segment(key, raw)
        self.segment_keys.append(key)
        self.stats.segments += 1
        if publish:
            seg_id = bytes.fromhex(key[len(index_key(b"")):])
            self.index.publish(seg_id, Segment(ids, list(sizes), entries))
            with self._lock:
                self._pending.difference_update(e.id for _, _, es in packs for e in es)
            if refresh and self.refresh:
                self.index.sync(self.store)

    def _stop_uploaders(self) -> None:
        for _ in self._uploaders:
            self._queue.put(None)
        for t in self._uploaders:
            t.join()
        self._uploaders = []

    # -- ending --------------------------------------------------------------

    def commit(self) -> list[str]:
        """Store the open pack and a segment for what is left; return every segment key."""
        with self._lock:
            last, self._builder = self._builder, PackBuilder()
        if len(last):
            self._enqueue(last)
        self._stop_uploaders()
        self._raise_upload_error()
        self._flush(publish=True)
        self._closed = True
        log.info("session stored %d new blobs in %d packs (%d bytes), %d index segments",
                 self.stats.blobs_new, self.stats.packs, self.stats.pack_bytes,
                 self.stats.segments)
        return list(self.segment_keys)

    def abort(self) -> None:
        """Stop after a failure: index what was stored (durably, best effort), publish nothing."""
        if self._closed:
            return
        self._closed = True
        if self._uploaders:
            self._error = self._error or RuntimeError("session aborted")
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._stop_uploaders()
        try:
            self._flush(publish=False)
        except Exception as exc:  # noqa: BLE001 - the session failed already; keep its error
            log.debug("could not index the packs of the failed session: %s", exc)
