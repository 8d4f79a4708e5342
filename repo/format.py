"""Byte-level building blocks of repository format v1 (see docs/format.md).

* Object ids: keyed BLAKE3-256 of the plaintext, the key from ``config``.
* Records (config, index segments, snapshots, locks, pack headers): one
  envelope byte (``0x00`` = plain) followed by a msgpack map that carries
  ``v`` (record version). Envelope values other than ``0x00`` are reserved
  for authenticated encryption.
* Blobs (chunks, manifest pages, manifest roots): one encoding byte whose
  low nibble is the compression (``0`` raw, ``1`` zstd) and whose high
  nibble is reserved for encryption (``0`` = none), then the payload.
"""

from __future__ import annotations

import threading
from enum import IntEnum
from typing import Any

import blake3
import msgpack
import zstandard

from .errors import IncompatibleRepository, IntegrityError

FORMAT_VERSION = 1
#: Features this version understands; a repository requiring others is refused.
KNOWN_FEATURES: frozenset[str] = frozenset()

ID_SIZE = 32
ZERO_ID = bytes(ID_SIZE)  # marks an all-zero chunk in a manifest page

ENVELOPE_PLAIN = 0x00
COMPRESSION_NONE = 0x0
COMPRESSION_ZSTD = 0x1


class BlobType(IntEnum):
    """What a blob holds."""

    CHUNK = 0
    PAGE = 1
    ROOT = 2


class Hasher:
    """Keyed BLAKE3 ids for one repository."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise IncompatibleRepository("hash key must be 32 bytes")
        self.key = key

    def id(self, data: bytes | bytearray | memoryview) -> bytes:
        # blake3 releases the GIL on large inputs, so chunk workers run in parallel.
        return bytes(blake3.blake3(data, key=self.key, max_threads=1).digest())

    def id_of_parts(self, parts: list[bytes]) -> bytes:
        """The id of the parts' concatenation."""
        h = blake3.blake3(key=self.key, max_threads=1)
        for p in parts:
            h.update(p)
        return bytes(h.digest())


def encode_record(fields: dict[str, Any]) -> bytes:
    """Encode a record map (which must carry ``v``) in the plain envelope."""
    if "v" not in fields:
        raise ValueError("record without version")
    body: bytes = msgpack.packb(fields, use_bin_type=True)
    return bytes([ENVELOPE_PLAIN]) + body


def decode_record(raw: bytes, what: str, max_version: int = FORMAT_VERSION) -> dict[str, Any]:
    """Decode a record, checking the envelope, shape and version."""
    if not raw:
        raise IntegrityError(f"{what}: empty record", key=what)
    if raw[0] != ENVELOPE_PLAIN:
        raise IncompatibleRepository(
            f"{what}: envelope {raw[0]:#04x} is not supported by this version "
            "(an encrypted repository needs a newer vmrepo)"
        )
    try:
        fields = msgpack.unpackb(raw[1:], raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise IntegrityError(f"{what}: undecodable record ({exc})", key=what) from exc
    if not isinstance(fields, dict) or not isinstance(fields.get("v"), int):
        raise IntegrityError(f"{what}: record without a version", key=what)
    if fields["v"] > max_version:
        raise IncompatibleRepository(
            f"{what}: record version {fields['v']} is newer than this vmrepo supports "
            f"({max_version})",
            version=fields["v"],
        )
    return fields


class BlobCodec:
    """Compresses and decompresses blobs; safe to share between threads."""

    def __init__(self, level: int = 3) -> None:
        self.level = level
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level)
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def encode(self, data: bytes | bytearray) -> bytes:
        """Return the stored form: zstd when it saves space, else raw."""
        packed: bytes = self._compressor().compress(data)
        if len(packed) < len(data):
            return bytes([COMPRESSION_ZSTD]) + packed
        return bytes([COMPRESSION_NONE]) + data

    def decode(self, stored: bytes, raw_length: int, what: str) -> bytes:
        """Return the plaintext of a stored blob of ``raw_length`` bytes."""
        if not stored:
            raise IntegrityError(f"{what}: empty blob", key=what)
        enc = stored[0]
        if enc >> 4:
            raise IncompatibleRepository(f"{what}: encrypted blob needs a newer vmrepo")
        if enc == COMPRESSION_NONE:
            data = stored[1:]
        elif enc == COMPRESSION_ZSTD:
            try:
                data = self._decompressor().decompress(stored[1:], max_output_size=raw_length)
            except zstandard.ZstdError as exc:
                raise IntegrityError(f"{what}: corrupt compressed blob ({exc})", key=what) from exc
        else:
            raise IntegrityError(f"{what}: unknown blob encoding {enc:#04x}", key=what)
        if len(data) != raw_length:
            raise IntegrityError(
                f"{what}: blob is {len(data)} bytes, index says {raw_length}", key=what
            )
        return data


def pack_key(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"data/{h[:2]}/{h}"


def index_key(segment_id: bytes) -> str:
    return f"index/{segment_id.hex()}"


def snapshot_key(snapshot_id: str) -> str:
    return f"snapshots/{snapshot_id}"


def lock_key(lock_id: str) -> str:
    return f"locks/{lock_id}"


CONFIG_KEY = "config"
