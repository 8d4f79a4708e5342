"""The codecs: how every object's bytes are made and checked (docs/format.md, sections 3 and 5).

Every object passes through one :class:`Codec`:

* **Records** (snapshot records, index segments, locks, pack headers, ...):
  one envelope byte, then the payload. Envelope ``0x00`` is a plain msgpack
  map carrying ``v`` (the record version); envelope ``0x01`` is that map
  sealed (:mod:`vmrepo.crypto`) with associated data naming the repository
  and the record's kind.
* **Blobs** (chunks, manifest pages, manifest roots): one encoding byte whose
  low nibble is the compression (``0`` raw, ``1`` zstd) and whose high
  nibble the encryption (``0`` none, ``1`` sealed, associated data: the blob's
  id), then the payload.

Compression (``level`` 0 stores raw) skips data that does not compress: a
sample of each blob (:data:`SAMPLE` bytes from three places) is compressed
first, and a blob whose sample saves under :data:`SAMPLE_GAIN` is stored raw
without compressing the rest. zstd runs with its level's parameters except a
minimum match of at least 5 bytes: at levels 1 to 3 zstd otherwise looks for
4-byte matches in blobs of 256 KiB or less, which costs up to five times the
time on high-entropy data for no gain (docs/benchmarks.md).

A codec with a cipher (an encrypted repository) seals everything but the
config and key records, and refuses plain objects of other kinds (they could
only have been put there by someone without the key). Each call names what
the object is (``kind``) and, for blobs, its id, so that an object moved to
another place or kind does not open. Ids are checked by the callers.
"""

from __future__ import annotations

import threading
from enum import Enum
from typing import Any

import msgpack
import zstandard

from .crypto import Cipher
from .errors import IncompatibleRepository, IntegrityError
from .format import ENVELOPE_PLAIN, ENVELOPE_SEALED

COMPRESSION_NONE = 0x0
COMPRESSION_ZSTD = 0x1
_MSGPACK_ERRORS = (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
                   msgpack.StackError)


class RecordKind(Enum):
    """The kinds of records; an encrypting codec binds each record to its kind."""

    CONFIG = "config"
    SNAPSHOT = "snapshot"
    INDEX = "index"
    LOCK = "lock"
    PACK_HEADER = "pack-header"
    MARK = "mark"
    DAMAGE = "damage"
    KEY = "key"


#: Records that stay plain in an encrypted repository (read before the key is known).
PLAIN_KINDS = frozenset({RecordKind.CONFIG, RecordKind.KEY})
ENCRYPTION_AEAD = 0x1
#: Bytes of each blob compressed first to judge whether it compresses at all.
SAMPLE = 3 * 4096
#: Blobs larger than this are sampled; smaller ones are simply compressed.
SAMPLE_ABOVE = 64 * 1024
#: A sample that compresses by less than this fraction marks its blob incompressible.
SAMPLE_GAIN = 1 / 32
MIN_MATCH = 5

def pack_map(fields: dict[str, Any]) -> bytes:
    out: bytes = msgpack.packb(fields, use_bin_type=True)
    return out


def unpack_map(raw: bytes | memoryview, what: str) -> dict[str, Any]:
    """A msgpack map, or IntegrityError naming ``what``."""
    try:
        fields = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except _MSGPACK_ERRORS as exc:
        raise IntegrityError(f"{what}: undecodable ({exc})", key=what) from exc
    if not isinstance(fields, dict):
        raise IntegrityError(f"{what}: not a map", key=what)
    return fields


def check_version(fields: dict[str, Any], what: str, max_version: int) -> dict[str, Any]:
    """Refuse a record without a version or with one newer than ``max_version``."""
    version = fields.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise IntegrityError(f"{what}: record without a version", key=what)
    if version > max_version:
        raise IncompatibleRepository(
            f"{what}: record version {version} is newer than this vmrepo supports "
            f"({max_version})", version=version)
    return fields


class Codec:
    """Encodes and decodes records and blobs; safe to share between threads."""

    def __init__(self, compression_level: int = 3, cipher: Cipher | None = None,
                 repository_id: str = "", blob_size: int = 256 * 1024) -> None:
        #: zstd level, 0 for no compression.
        self.level = compression_level
        self._params = None if compression_level <= 0 else zstandard.ZstdCompressionParameters(
            **_params_of(compression_level, blob_size))
        self.cipher = cipher
        self._record_aad = f"vmrepo record {repository_id} ".encode()
        self._local = threading.local()

    # -- records -------------------------------------------------------------

    def encode_record(self, kind: RecordKind, fields: dict[str, Any]) -> bytes:
        """A record's stored bytes; ``fields`` must carry ``v``."""
        if "v" not in fields:
            raise ValueError("record without version")
        if self.cipher is None or kind in PLAIN_KINDS:
            return bytes([ENVELOPE_PLAIN]) + pack_map(fields)
        return bytes(self.cipher.seal(pack_map(fields), self._record_aad + kind.value.encode(),
                                      bytes([ENVELOPE_SEALED])))

    def decode_record(self, kind: RecordKind, raw: bytes, what: str,
                      max_version: int) -> dict[str, Any]:
        """A record's fields, after checking envelope, authenticity, shape and version."""
        if not raw:
            raise IntegrityError(f"{what}: empty record", key=what)
        body: bytes | memoryview = memoryview(raw)[1:]
        sealed = self.cipher is not None and kind not in PLAIN_KINDS
        if raw[0] == ENVELOPE_SEALED and self.cipher is not None:
            if not sealed:
                raise IntegrityError(f"{what}: sealed, but this kind of record never is",
                                     key=what)
            body = self.cipher.open(body, self._record_aad + kind.value.encode(), what)
        elif raw[0] == ENVELOPE_SEALED:
            raise IntegrityError(f"{what}: encrypted, in a repository without encryption "
                                 "(damaged, or put there from elsewhere)", key=what)
        elif raw[0] != ENVELOPE_PLAIN:
            raise IntegrityError(f"{what}: unknown envelope {raw[0]:#04x} (damaged)", key=what)
        elif sealed:
            raise IntegrityError(f"{what}: not encrypted, in an encrypted repository "
                                 "(tampered with: refused)", key=what)
        return check_version(unpack_map(body, what), what, max_version)

    # -- blobs ---------------------------------------------------------------

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(compression_params=self._params)
        return c

    def _sampler(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "s", None)
        if c is None:
            c = self._local.s = zstandard.ZstdCompressor(level=1)
        return c

    def compresses(self, data: bytes | bytearray | memoryview) -> bool:
        """Whether ``data`` is worth compressing, judged from a sample of it."""
        n = len(data)
        if n <= SAMPLE_ABOVE:
            return True
        view = memoryview(data)
        part = SAMPLE // 3
        mid = n // 2 - part // 2
        sample = b"".join((view[:part], view[mid:mid + part], view[n - part:]))
        return len(self._sampler().compress(sample)) < len(sample) * (1 - SAMPLE_GAIN)

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def encode_blob(self, blob_id: bytes, data: bytes | bytearray | memoryview
                    ) -> bytes | bytearray:
        """A blob's stored form: zstd when it saves space, else raw; sealed in an encrypted
        repository."""
        enc: int = COMPRESSION_NONE
        payload: bytes | bytearray | memoryview = data
        if self.level > 0 and self.compresses(data):
            packed: bytes = self._compressor().compress(data)
            if len(packed) < len(data):
                enc, payload = COMPRESSION_ZSTD, packed
        if self.cipher is None:
            out = bytearray(1 + len(payload))  # one copy of the payload, not two
            out[0] = enc
            out[1:] = payload
            return out
        return self.cipher.seal(payload, blob_id, bytes([ENCRYPTION_AEAD << 4 | enc]))

    def decode_blob(self, blob_id: bytes, stored: bytes | bytearray | memoryview, raw_length: int,
                    what: str) -> bytes:
        """The plaintext of a stored blob of ``raw_length`` bytes."""
        if not len(stored):
            raise IntegrityError(f"{what}: empty blob", key=what)
        enc = stored[0]
        body: bytes | memoryview = memoryview(stored)[1:]
        if self.cipher is not None:
            if enc >> 4 != ENCRYPTION_AEAD:
                raise IntegrityError(f"{what}: not encrypted, in an encrypted repository "
                                     "(tampered with: refused)", key=what)
            body = self.cipher.open(body, blob_id, what)
            enc &= 0x0F
        elif enc >> 4:
            raise IntegrityError(f"{what}: encrypted blob in a repository without "
                                 "encryption (damaged, or put there from elsewhere)", key=what)
        if enc == COMPRESSION_NONE:
            data = bytes(body)
        elif enc == COMPRESSION_ZSTD:
            try:
                data = self._decompressor().decompress(body, max_output_size=raw_length)
            except zstandard.ZstdError as exc:
                raise IntegrityError(f"{what}: corrupt compressed blob ({exc})",
                                     key=what) from exc
        else:
            raise IntegrityError(f"{what}: unknown blob encoding {enc:#04x}", key=what)
        if len(data) != raw_length:
            raise IntegrityError(f"{what}: blob is {len(data)} bytes, index says {raw_length}",
                                 key=what)
        return data


def _params_of(level: int, blob_size: int) -> dict[str, int]:
    """zstd's parameters for ``level`` and blobs of ``blob_size`` bytes (a chunk), with a
    minimum match of at least :data:`MIN_MATCH`."""
    p = zstandard.ZstdCompressionParameters.from_level(level, source_size=blob_size)
    return {"window_log": p.window_log, "chain_log": p.chain_log, "hash_log": p.hash_log,
            "search_log": p.search_log, "min_match": max(MIN_MATCH, p.min_match),
            "target_length": p.target_length, "strategy": p.strategy,
            "threads": 0, "write_content_size": 1}
