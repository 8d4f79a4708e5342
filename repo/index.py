"""The index: blob id -> (pack, offset, length), kept as immutable segments.

Each segment is a record under ``index/<id>`` naming some packs and the blobs
in them; the id is the keyed hash of the segment's bytes. Segments are only
ever added (and, by maintenance, replaced by a merged one), never changed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from vmrepo.storage.base import Backend

from .errors import IntegrityError
from .format import BlobType, Hasher, decode_record, encode_record, index_key
from .pack import BlobEntry


@dataclass(frozen=True)
class Location:
    """Where a blob is stored."""

    pack_id: bytes
    type: BlobType
    offset: int
    length: int
    raw_length: int


class Index:
    """In-memory map of every indexed blob; thread-safe for lookups and additions."""

    def __init__(self) -> None:
        self._map: dict[bytes, Location] = {}
        self._lock = threading.Lock()
        self.segments: set[bytes] = set()

    def __contains__(self, blob_id: bytes) -> bool:
        return blob_id in self._map

    def __len__(self) -> int:
        return len(self._map)

    def get(self, blob_id: bytes) -> Location | None:
        return self._map.get(blob_id)

    def items(self) -> Iterator[tuple[bytes, Location]]:
        return iter(list(self._map.items()))

    def add_pack(self, pack_id: bytes, entries: Iterable[BlobEntry]) -> None:
        with self._lock:
            for e in entries:
                self._map.setdefault(
                    e.id, Location(pack_id, e.type, e.offset, e.length, e.raw_length)
                )

    def load(self, backend: Backend, hasher: Hasher) -> None:
        """Read every segment not loaded yet, checking each against its id."""
        for info in backend.list("index/"):
            key = info.key
            name = key.rpartition("/")[2]
            try:
                seg_id = bytes.fromhex(name)
            except ValueError:
                raise IntegrityError(f"{key}: not an index segment name", key=key) from None
            if seg_id in self.segments:
                continue
            raw = backend.get(key)
            if hasher.id(raw) != seg_id:
                raise IntegrityError(f"{key}: content does not match its id", key=key)
            for pack_id, entries in decode_segment(raw, key):
                self.add_pack(pack_id, entries)
            self.segments.add(seg_id)


def encode_segment(packs: list[tuple[bytes, list[BlobEntry]]], hasher: Hasher) -> tuple[str, bytes]:
    """Return ``(key, bytes)`` of a segment naming ``packs``."""
    raw = encode_record(
        {"v": 1, "packs": [[pid, [e.as_list() for e in entries]] for pid, entries in packs]}
    )
    return index_key(hasher.id(raw)), raw


def decode_segment(raw: bytes, what: str) -> list[tuple[bytes, list[BlobEntry]]]:
    rec = decode_record(raw, what)
    packs = rec.get("packs")
    if not isinstance(packs, list):
        raise IntegrityError(f"{what}: segment without packs", key=what)
    out = []
    for item in packs:
        if not isinstance(item, list) or len(item) != 2:
            raise IntegrityError(f"{what}: malformed pack entry", key=what)
        out.append((bytes(item[0]), [BlobEntry.from_list(b, what) for b in item[1]]))
    return out
