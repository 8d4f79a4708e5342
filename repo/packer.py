"""The packer: deduplicates new blobs and writes them into pack files.

Thread-safe. Workers call :meth:`Packer.add` with plaintext blobs; a blob
the index or this session already has is dropped, a new one is compressed
(outside any lock), appended to the open pack, and the pack is sealed once it
reaches the configured size. Sealed packs are stored by one background
thread, so compression goes on while a pack is written and synced; at most
``max_queued`` sealed packs wait, which bounds memory. :meth:`Packer.commit`
stores the last pack, waits for every pack to be durable, then stores one
index segment naming them: packs are durable before the index that names
them. A failed store is raised from the next :meth:`add` or from
:meth:`commit`.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from vmrepo.storage.base import Backend

from .format import BlobCodec, BlobType, Hasher, pack_key
from .index import Index, encode_segment
from .pack import BlobEntry, PackBuilder


@dataclass
class PackerStats:
    """What a packer session added to the repository."""

    blobs_new: int = 0
    raw_bytes_new: int = 0
    stored_bytes_new: int = 0
    packs: int = 0
    pack_bytes: int = 0


class Packer:
    """One writing session against a repository's backend and index."""

    def __init__(self, backend: Backend, index: Index, hasher: Hasher, codec: BlobCodec,
                 pack_size: int, max_queued: int = 1) -> None:
        self.backend = backend
        self.index = index
        self.hasher = hasher
        self.codec = codec
        self.pack_size = pack_size
        self.stats = PackerStats()
        self._lock = threading.Lock()
        self._pending: set[bytes] = set()
        self._builder = PackBuilder()
        self._written: list[tuple[bytes, list[BlobEntry]]] = []
        self._queue: queue.Queue[PackBuilder | None] = queue.Queue(max_queued)
        self._error: BaseException | None = None
        self._uploader: threading.Thread | None = None

    def known(self, blob_id: bytes) -> bool:
        """Whether the blob is indexed or already on its way into a pack."""
        return blob_id in self.index or blob_id in self._pending

    def add(self, blob_id: bytes, btype: BlobType, data: bytes | bytearray) -> int:
        """Store ``data`` unless known; return the stored bytes it added (0 if deduplicated)."""
        self._raise_upload_error()
        with self._lock:
            if self.known(blob_id):
                return 0
            self._pending.add(blob_id)
        stored = self.codec.encode(data)
        full: PackBuilder | None = None
        with self._lock:
            self._builder.add(blob_id, btype, stored, len(data))
            self.stats.blobs_new += 1
            self.stats.raw_bytes_new += len(data)
            self.stats.stored_bytes_new += len(stored)
            if self._builder.size >= self.pack_size:
                full, self._builder = self._builder, PackBuilder()
        if full is not None:
            self._enqueue(full)
        return len(stored)

    def _raise_upload_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _enqueue(self, builder: PackBuilder) -> None:
        with self._lock:
            if self._uploader is None:
                self._uploader = threading.Thread(target=self._upload_loop,
                                                  name="vmrepo-packs", daemon=True)
                self._uploader.start()
        while True:
            self._raise_upload_error()
            try:
                self._queue.put(builder, timeout=0.5)
                return
            except queue.Full:
                continue

    def _upload_loop(self) -> None:
        while (builder := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._store(builder)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = exc

    def _finish_uploads(self) -> None:
        if self._uploader is not None:
            self._queue.put(None)
            self._uploader.join()
            self._uploader = None
        self._raise_upload_error()

    def close(self) -> None:
        """Stop the background thread after a failure (packs stored so far stay)."""
        if self._uploader is not None:
            self._error = self._error or RuntimeError("packer closed")
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put(None)
            self._uploader.join()
            self._uploader = None

    def _store(self, builder: PackBuilder) -> None:
        entries = list(builder.entries)
        pack_id, parts = builder.seal(self.hasher)
        self.backend.put(pack_key(pack_id), parts)
        self.index.add_pack(pack_id, entries)
        with self._lock:
            self._written.append((pack_id, entries))
            self.stats.packs += 1
            self.stats.pack_bytes += sum(len(p) for p in parts)
            self._pending.difference_update(e.id for e in entries)

    def commit(self) -> str | None:
        """Store the open pack and an index segment for the session; return its key."""
        with self._lock:
            last, self._builder = self._builder, PackBuilder()
        if len(last):
            self._enqueue(last)
        self._finish_uploads()
        with self._lock:
            written, self._written = self._written, []
        if not written:
            return None
        key, raw = encode_segment(written, self.hasher)
        self.backend.put(key, raw)
        self.index.segments.add(bytes.fromhex(key.rpartition("/")[2]))
        return key
