"""Index segments: immutable records naming packs and where each blob lies in them.

A segment is stored under ``index/<id>``, the id being the keyed hash of its
stored bytes. Version 2 (docs/format.md, section index) holds its entries as
one binary string of fixed-size records sorted by blob id, so that segments
merge into the local on-disk index (:mod:`vmrepo.runs`) without parsing each
entry, and may name the segments it *supersedes* (a merge). Version 1
segments (a msgpack list per pack) are still read.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from .codec import Codec, RecordKind
from .errors import IntegrityError
from .format import ID_SIZE, BlobType, Hasher, index_key
from .pack import BlobEntry

#: One index entry: blob id, pack (number in the segment's pack list), offset, length,
#: raw length, blob type; little-endian, 49 bytes.
ENTRY = struct.Struct("<32sIIIIB")
ENTRY_SIZE = ENTRY.size
SEGMENT_VERSION = 2
#: Packs per segment a writer should not exceed (merges split beyond it).
MAX_SEGMENT_ENTRIES = 1 << 20


@dataclass
class Segment:
    """A decoded segment."""

    packs: list[bytes]
    #: Sizes of the packs in bytes (None where a v1 segment did not record them).
    pack_sizes: list[int | None]
    #: Sorted fixed-size entries (:data:`ENTRY`) whose pack numbers index :attr:`packs`.
    entries: bytes
    supersedes: list[bytes] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries) // ENTRY_SIZE

    def records(self) -> Iterator[tuple[bytes, int, int, int, int, int]]:
        """``(blob id, pack number, offset, length, raw length, type)`` per entry."""
        return ENTRY.iter_unpack(self.entries)


def pack_entries(packs: Sequence[tuple[bytes, int | None, Iterable[BlobEntry]]]
                 ) -> tuple[list[bytes], list[int | None], bytes]:
    """Pack ids, sizes and the sorted entry string for ``(pack id, size, entries)`` items."""
    ids = [p[0] for p in packs]
    sizes = [p[1] for p in packs]
    recs = sorted(ENTRY.pack(e.id, ref, e.offset, e.length, e.raw_length, int(e.type))
                  for ref, (_, _, entries) in enumerate(packs) for e in entries)
    return ids, sizes, b"".join(recs)


def encode_segment(codec: Codec, hasher: Hasher,
                   packs: Sequence[tuple[bytes, int | None, Iterable[BlobEntry]]],
                   supersedes: Sequence[bytes] = ()) -> tuple[str, bytes]:
    """``(key, stored bytes)`` of a v2 segment naming ``packs``."""
    ids, sizes, entries = pack_entries(packs)
    return encode_packed(codec, hasher, ids, sizes, entries, supersedes)


def encode_packed(codec: Codec, hasher: Hasher, ids: Sequence[bytes],
                  sizes: Sequence[int | None], entries: bytes,
                  supersedes: Sequence[bytes] = ()) -> tuple[str, bytes]:
    """``(key, stored bytes)`` of a v2 segment from already sorted entries."""
    raw = codec.encode_record(RecordKind.INDEX, {
        "v": SEGMENT_VERSION,
        "packs": [[pid, size] for pid, size in zip(ids, sizes, strict=True)],
        "entries": entries,
        "supersedes": list(supersedes),
        # Two segments never share an id, even with the same entries: a segment written
        # again after a merge superseded its twin would otherwise count as superseded.
        "salt": secrets.token_bytes(16),
    })
    return index_key(hasher.id(raw)), raw


def decode_segment(codec: Codec, raw: bytes, what: str) -> Segment:
    """Decode a v1 or v2 segment, checking its shape (not its id: see the caller)."""
    rec = codec.decode_record(RecordKind.INDEX, raw, what, SEGMENT_VERSION)
    try:
        if rec["v"] == 1:
            return _decode_v1(rec, what)
        packs = [bytes(p[0]) for p in rec["packs"]]
        sizes = [None if p[1] is None else int(p[1]) for p in rec["packs"]]
        entries = bytes(rec["entries"])
        supersedes = [bytes(s) for s in rec.get("supersedes", [])]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise IntegrityError(f"{what}: malformed segment ({exc})", key=what) from exc
    seg = Segment(packs, sizes, entries, supersedes)
    _check(seg, what)
    return seg


def _decode_v1(rec: dict[str, object], what: str) -> Segment:
    items = rec.get("packs")
    if not isinstance(items, list):
        raise IntegrityError(f"{what}: segment without packs", key=what)
    packs: list[tuple[bytes, int | None, list[BlobEntry]]] = []
    for item in items:
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], list):
            raise IntegrityError(f"{what}: malformed pack entry", key=what)
        packs.append((bytes(item[0]), None, [BlobEntry.from_list(b, what) for b in item[1]]))
    ids, sizes, entries = pack_entries(packs)
    seg = Segment(ids, sizes, entries)
    _check(seg, what)
    return seg


def _check(seg: Segment, what: str) -> None:
    """Cheap shape checks; entry by entry checks happen where entries are read in order
    (:func:`check_records`)."""
    if len(seg.entries) % ENTRY_SIZE or any(len(p) != ID_SIZE for p in seg.packs) or \
            any(len(s) != ID_SIZE for s in seg.supersedes):
        raise IntegrityError(f"{what}: malformed segment", key=what)


def check_records(seg: Segment, what: str) -> Iterator[tuple[bytes, int, int, int, int, int]]:
    """The segment's records, raising IntegrityError at the first malformed or misordered."""
    npacks = len(seg.packs)
    top = max(BlobType)
    prev = b""
    for rec in ENTRY.iter_unpack(seg.entries):
        if rec[1] >= npacks or rec[3] < 1 or rec[5] > top or rec[0] < prev:
            raise IntegrityError(f"{what}: malformed or misordered index entry", key=what)
        prev = rec[0]
        yield rec
