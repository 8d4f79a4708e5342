"""Pack files: many blobs in one object, ending with a header that lists them.

Layout (docs/format.md, section packs)::

    "VMRPACK1"                      8-byte magic
    blob 0 | blob 1 | ...           stored blobs, back to back
    header                          record {"v":1, "blobs":[[id,type,offset,length,raw],...]}
    header length                   u32 little-endian
    "VMRPKEND"                      8-byte trailer magic

A pack can be read knowing only its key, so the index can always be rebuilt
from the packs alone.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Container
from dataclasses import dataclass

from .codec import Codec, RecordKind
from .errors import IntegrityError
from .format import ID_SIZE, BlobType, Hasher

PACK_MAGIC = b"VMRPACK1"
TRAILER_MAGIC = b"VMRPKEND"
TRAILER = struct.Struct("<I8s")
MAX_HEADER = 64 << 20


@dataclass(frozen=True)
class BlobEntry:
    """Where one blob lives inside a pack."""

    id: bytes
    type: BlobType
    offset: int
    length: int
    raw_length: int

    def as_list(self) -> list[object]:
        return [self.id, int(self.type), self.offset, self.length, self.raw_length]

    @classmethod
    def from_list(cls, item: object, what: str) -> BlobEntry:
        try:
            assert isinstance(item, (list, tuple))
            bid, btype, off, length, raw = item
            entry = cls(bytes(bid), BlobType(btype), int(off), int(length), int(raw))
        except (AssertionError, ValueError, TypeError) as exc:
            raise IntegrityError(f"{what}: malformed blob entry", key=what) from exc
        if len(entry.id) != ID_SIZE or entry.offset < 0 or entry.length < 1:
            raise IntegrityError(f"{what}: malformed blob entry", key=what)
        return entry


class PackBuilder:
    """Accumulates stored blobs for one pack; not thread-safe (the packer locks)."""

    def __init__(self) -> None:
        self._parts: list[bytes | bytearray] = [PACK_MAGIC]
        self._size = len(PACK_MAGIC)
        self.entries: list[BlobEntry] = []

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, blob_id: bytes, btype: BlobType, stored: bytes | bytearray,
            raw_length: int) -> None:
        self.entries.append(BlobEntry(blob_id, btype, self._size, len(stored), raw_length))
        self._parts.append(stored)
        self._size += len(stored)

    def seal(self, hasher: Hasher, codec: Codec, avoid: Container[bytes] = ()
             ) -> tuple[bytes, list[bytes | bytearray]]:
        """Return ``(pack_id, parts)``: the pack is the parts concatenated, its id their
        keyed hash (computed without joining them). A pack whose id is in ``avoid`` (a pack
        a prune condemned, docs/format.md §13) gets a random ``salt`` in its header, and so
        another id."""
        header: dict[str, object] = {"v": 1, "blobs": [e.as_list() for e in self.entries]}
        parts, self._parts = self._parts, []
        while True:
            raw = codec.encode_record(RecordKind.PACK_HEADER, header)
            sealed = [*parts, raw, TRAILER.pack(len(raw), TRAILER_MAGIC)]
            pack_id = hasher.id_of_parts(sealed)
            if pack_id not in avoid:
                return pack_id, sealed
            header["salt"] = secrets.token_bytes(16)


def parse_trailer(tail: bytes, pack_size: int, what: str) -> tuple[int, int]:
    """From the last 12 bytes of a pack return ``(header_offset, header_length)``."""
    if len(tail) != TRAILER.size:
        raise IntegrityError(f"{what}: pack too short", key=what)
    hlen, magic = TRAILER.unpack(tail)
    if magic != TRAILER_MAGIC or hlen > MAX_HEADER or hlen + TRAILER.size + 8 > pack_size:
        raise IntegrityError(f"{what}: bad pack trailer", key=what)
    return pack_size - TRAILER.size - hlen, hlen


def decode_header(codec: Codec, raw: bytes, what: str,
                  pack_size: int | None = None) -> list[BlobEntry]:
    """The entries of a pack header; with ``pack_size``, each must lie inside the pack."""
    rec = codec.decode_record(RecordKind.PACK_HEADER, raw, what, 1)
    blobs = rec.get("blobs")
    if not isinstance(blobs, list):
        raise IntegrityError(f"{what}: pack header without blobs", key=what)
    entries = [BlobEntry.from_list(b, what) for b in blobs]
    if pack_size is not None:
        end = pack_size - len(raw) - TRAILER.size
        for e in entries:
            if e.offset < len(PACK_MAGIC) or e.offset + e.length > end:
                raise IntegrityError(f"{what}: header names a blob outside the pack", key=what)
    return entries
