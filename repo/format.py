"""Names and numbers of the repository format (see docs/format.md).

* Object ids: keyed BLAKE3-256 of the plaintext, the key from ``config``.
* Object keys: where each kind of object lives in the store.
* Format versions: what this vmrepo reads and what it writes.
* A record's envelope byte (plain or sealed).

How objects are encoded (records, blobs) is :mod:`vmrepo.codec`'s business; the envelope
bytes are here so that what reads a plain record before the heavy modules load
(:mod:`vmrepo.cli.ahead`) need not import the codec.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

import blake3

from .errors import IncompatibleRepository

#: The format version new repositories get.
FORMAT_VERSION = 2
#: Oldest format version this vmrepo reads (and upgrades in place).
OLDEST_VERSION = 1
#: Features this version understands; a repository requiring others is refused.
OBJECT_LOCK = "object-lock"
KNOWN_FEATURES: frozenset[str] = frozenset({OBJECT_LOCK})

#: A record's first byte (its envelope): a plain msgpack map follows, or that map sealed.
ENVELOPE_PLAIN = 0x00
ENVELOPE_SEALED = 0x01
#: The version of the key records this vmrepo writes (and the newest it reads).
KEY_VERSION = 1

ID_SIZE = 32
ZERO_ID = bytes(ID_SIZE)  # marks an all-zero chunk in a manifest page
HEX_ID_LENGTH = 2 * ID_SIZE


class BlobType(IntEnum):
    """What a blob holds."""

    CHUNK = 0
    PAGE = 1
    ROOT = 2


#: Each blob type at the index of its value (a lookup per index entry read, cheaper than
#: calling the enum). Values above it are not a type: an IndexError.
BLOB_TYPES: tuple[BlobType, ...] = tuple(BlobType)


class Hasher:
    """Keyed BLAKE3 ids for one repository."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise IncompatibleRepository("hash key must be 32 bytes")
        self.key = key

    def id(self, data: bytes | bytearray | memoryview) -> bytes:
        # blake3 releases the GIL on large inputs, so chunk workers run in parallel.
        return bytes(blake3.blake3(data, key=self.key, max_threads=1).digest())

    def stream(self) -> blake3.blake3:
        """A hasher to feed piece by piece; its digest is the id of what it was fed."""
        return blake3.blake3(key=self.key, max_threads=1)

    def id_of_parts(self, parts: Sequence[bytes | bytearray | memoryview]) -> bytes:
        """The id of the parts' concatenation."""
        h = self.stream()
        for p in parts:
            h.update(p)
        return bytes(h.digest())


def checksum(data: bytes) -> bytes:
    """Unkeyed BLAKE3-256, for objects that must be checkable without any key (config)."""
    return bytes(blake3.blake3(data).digest())


CONFIG_KEY = "config"
PACK_PREFIX = "data/"
INDEX_PREFIX = "index/"
SNAPSHOT_PREFIX = "snapshots/"
LOCK_PREFIX = "locks/"
MARK_PREFIX = "marks/"
DAMAGE_PREFIX = "damage/"
QUARANTINE_PREFIX = "quarantine/"
KEY_PREFIX = "keys/"


def pack_key(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"{PACK_PREFIX}{h[:2]}/{h}"


def index_key(segment_id: bytes) -> str:
    return f"{INDEX_PREFIX}{segment_id.hex()}"


def snapshot_key(snapshot_id: str) -> str:
    return f"{SNAPSHOT_PREFIX}{snapshot_id}"


def lock_key(lock_id: str) -> str:
    return f"{LOCK_PREFIX}{lock_id}"


def mark_key(mark_id: str) -> str:
    return f"{MARK_PREFIX}{mark_id}"


def key_key(key_id: str) -> str:
    return f"{KEY_PREFIX}{key_id}"


def damage_key(record_id: str) -> str:
    return f"{DAMAGE_PREFIX}{record_id}"


def parse_hex_name(key: str, prefix: str, length: int = HEX_ID_LENGTH) -> str | None:
    """The hex name of ``prefix + name`` keys, or None for a name vmrepo never writes."""
    if not key.startswith(prefix):
        return None
    name = key[len(prefix):]
    if len(name) != length or any(c not in "0123456789abcdef" for c in name):
        return None
    return name


def parse_pack_key(key: str) -> bytes | None:
    """The pack id of a ``data/XX/ID`` key, or None for anything else."""
    name = parse_hex_name(key.rpartition("/")[2], "")
    if name is None or key != pack_key(bytes.fromhex(name)):
        return None
    return bytes.fromhex(name)
