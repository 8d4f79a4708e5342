"""The packer: deduplicates new blobs and writes them into pack files.

Thread-safe. Workers call :meth:`Packer.add` with plaintext blobs; a blob
the index or this session already has is dropped, a new one is compressed
(outside any lock), appended to the open pack, and the pack is sealed and
stored once it reaches the configured size. :meth:`Packer.commit` stores
the last pack and then one index segment naming every pack of the session:
packs are durable before the index that names them.
"""

from __future__ import annotations

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
                 pack_size: int) -> None:
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

    def known(self, blob_id: bytes) -> bool:
        """Whether the blob is indexed or already on its way into a pack."""
        return blob_id in self.index or blob_id in self._pending

    def add(self, blob_id: bytes, btype: BlobType, data: bytes) -> int:
        """Store ``data`` unless known; return the stored bytes it added (0 if deduplicated)."""
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
            self._store(full)
        return len(stored)

    def _store(self, builder: PackBuilder) -> None:
        entries = list(builder.entries)
        pack_id, data = builder.seal(self.hasher)
        self.backend.put(pack_key(pack_id), data)
        self.index.add_pack(pack_id, entries)
        with self._lock:
            self._written.append((pack_id, entries))
            self.stats.packs += 1
            self.stats.pack_bytes += len(data)
            self._pending.difference_update(e.id for e in entries)

    def commit(self) -> str | None:
        """Store the open pack and an index segment for the session; return its key."""
        with self._lock:
            last, self._builder = self._builder, PackBuilder()
        if len(last):
            self._store(last)
        with self._lock:
            written, self._written = self._written, []
        if not written:
            return None
        key, raw = encode_segment(written, self.hasher)
        self.backend.put(key, raw)
        self.index.segments.add(bytes.fromhex(key.rpartition("/")[2]))
        return key
