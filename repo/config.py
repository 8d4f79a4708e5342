"""The repository ``config`` record: identity, parameters and required features.

Format v2 wraps the parameters in a checksummed envelope (docs/format.md,
section config) so that damage to the config, its hash key included, is
reported as damage to the config. Format v1 configs (no checksum) are read
as they are; ``vmrepo upgrade`` rewrites them as v2.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from vmrepo.storage.objectlock import Retention

from .codec import check_version, pack_map, unpack_map
from .crypto import ALGORITHMS
from .errors import IncompatibleRepository, IntegrityError
from .format import (
    ENVELOPE_PLAIN,
    FORMAT_VERSION,
    KNOWN_FEATURES,
    OBJECT_LOCK,
    OLDEST_VERSION,
    checksum,
)

MIN_CHUNK = 64 << 10
MAX_CHUNK = 4 << 20
DEFAULT_CHUNK = 256 << 10
DEFAULT_PACK_SIZE = 32 << 20
DEFAULT_PAGE_ENTRIES = 512
DEFAULT_ZSTD_LEVEL = 3
MAX_PACK = 1 << 30
COMPRESSIONS = ("zstd", "none")


def check_chunk_size(size: int) -> int:
    """Return ``size`` if it is a power of two within 64 KiB..4 MiB, else raise ValueError."""
    if size < MIN_CHUNK or size > MAX_CHUNK or size & (size - 1):
        raise ValueError(f"chunk size must be a power of two from 64K to 4M, not {size}")
    return size


@dataclass(frozen=True)
class RepoConfig:
    """Parameters fixed at ``init``; see docs/format.md, section config."""

    repository_id: str
    chunk_size: int
    hash_key: bytes
    compression: str = "zstd"
    compression_level: int = DEFAULT_ZSTD_LEVEL
    pack_size: int = DEFAULT_PACK_SIZE
    page_entries: int = DEFAULT_PAGE_ENTRIES
    encryption: str = "none"
    created: str = ""
    version: int = FORMAT_VERSION
    features_required: tuple[str, ...] = field(default_factory=tuple)
    features_compatible: tuple[str, ...] = field(default_factory=tuple)
    #: S3 Object Lock: every object but locks and marks retained this many days (None: off).
    object_lock_days: int | None = None
    object_lock_mode: str = "governance"

    @property
    def encrypted(self) -> bool:
        return self.encryption != "none"

    @classmethod
    def new(cls, chunk_size: int = DEFAULT_CHUNK, pack_size: int = DEFAULT_PACK_SIZE,
            compression_level: int = DEFAULT_ZSTD_LEVEL, compression: str = "zstd",
            hash_key: bytes | None = None, encryption: str = "none") -> RepoConfig:
        """A fresh config with a random id (and a random hash key unless one is given; in an
        encrypted repository the hash key is part of the master key, never in the config)."""
        check_chunk_size(chunk_size)
        if pack_size < chunk_size * 2:
            raise ValueError("pack size must be at least two chunks")
        if pack_size > MAX_PACK:
            raise ValueError(f"pack size must be at most {MAX_PACK >> 20}M")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}")
        if compression == "zstd" and not 1 <= compression_level <= 22:
            raise ValueError("zstd levels go from 1 to 22")
        if encryption != "none" and encryption not in ALGORITHMS:
            raise ValueError(f"encryption must be one of {', '.join(ALGORITHMS)} or none")
        return cls(
            repository_id=secrets.token_hex(16),
            chunk_size=chunk_size,
            hash_key=hash_key if hash_key is not None else secrets.token_bytes(32),
            compression=compression,
            compression_level=compression_level if compression == "zstd" else 0,
            pack_size=pack_size,
            encryption=encryption,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    def with_object_lock(self, days: int, mode: str) -> RepoConfig:
        """This config requiring S3 Object Lock (feature ``object-lock``)."""
        Retention(days, mode)  # checks them
        return replace(self, object_lock_days=days, object_lock_mode=mode,
                       features_required=tuple(sorted({*self.features_required, OBJECT_LOCK})))

    def fields(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.object_lock_days is not None:
            extra["object_lock"] = {"days": self.object_lock_days, "mode": self.object_lock_mode}
        return {**extra,
            "v": self.version,
            "id": self.repository_id,
            "chunk_size": self.chunk_size,
            # An encrypted repository's hash key is in its master key (keys/), never here.
            "hash": {"algorithm": "blake3-keyed",
                     "key": None if self.encrypted else self.hash_key},
            "compression": {"algorithm": self.compression, "level": self.compression_level},
            "pack_size": self.pack_size,
            "page_entries": self.page_entries,
            "encryption": self.encryption,
            "created": self.created,
            "features": {
                "required": list(self.features_required),
                "compatible": list(self.features_compatible),
            },
        }

    def encode(self) -> bytes:
        """The config object: v1 as a plain record, v2 with a checksum over its body."""
        if self.version == 1:
            return bytes([ENVELOPE_PLAIN]) + pack_map(self.fields())
        body = pack_map(self.fields())
        return bytes([ENVELOPE_PLAIN]) + pack_map(
            {"v": self.version, "body": body, "blake3": checksum(body)})

    def upgraded(self) -> RepoConfig:
        """This config at the current format version."""
        return replace(self, version=FORMAT_VERSION)

    @classmethod
    def decode(cls, raw: bytes) -> RepoConfig:
        """Decode and check the config; refuse what this version cannot handle."""
        if not raw or raw[0] != ENVELOPE_PLAIN:
            raise IntegrityError("config: damaged (unknown envelope)", key="config")
        outer = check_version(unpack_map(memoryview(raw)[1:], "config"), "config",
                              FORMAT_VERSION)
        if outer["v"] < OLDEST_VERSION:
            raise IncompatibleRepository(f"config: format version {outer['v']} is unknown")
        rec = outer
        if outer["v"] >= 2:
            body = outer.get("body")
            if not isinstance(body, bytes) or outer.get("blake3") != checksum(body):
                raise IntegrityError("config: checksum mismatch (the config object is "
                                     "damaged)", key="config")
            rec = unpack_map(body, "config")
            if rec.get("v") != outer["v"]:
                raise IntegrityError("config: versions disagree (damaged)", key="config")
        try:
            features = rec.get("features") or {}
            required = tuple(str(f) for f in features.get("required", ()))
            cfg = cls(
                repository_id=str(rec["id"]),
                chunk_size=check_chunk_size(int(rec["chunk_size"])),
                hash_key=bytes(rec["hash"]["key"] or b""),
                compression=str(rec["compression"]["algorithm"]),
                compression_level=int(rec["compression"]["level"]),
                pack_size=int(rec["pack_size"]),
                page_entries=int(rec["page_entries"]),
                encryption=str(rec.get("encryption", "none")),
                created=str(rec.get("created", "")),
                version=int(rec["v"]),
                features_required=required,
                features_compatible=tuple(str(f) for f in features.get("compatible", ())),
            )
            lock = rec.get("object_lock")
            if lock is not None:
                days, mode = int(lock["days"]), str(lock["mode"])
                Retention(days, mode)  # checks them
                cfg = replace(cfg, object_lock_days=days, object_lock_mode=mode)
            elif OBJECT_LOCK in required:
                raise ValueError("object-lock required but not configured")
            hash_algorithm = rec["hash"].get("algorithm")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"config: malformed ({exc})", key="config") from exc
        missing = sorted(set(required) - KNOWN_FEATURES)
        if missing:
            raise IncompatibleRepository(
                "repository requires features this vmrepo lacks: " + ", ".join(missing),
                version=cfg.version, features=missing)
        if hash_algorithm != "blake3-keyed" or cfg.compression not in COMPRESSIONS:
            raise IncompatibleRepository("config names an unknown hash or compression")
        if cfg.encrypted and cfg.encryption not in ALGORITHMS:
            raise IncompatibleRepository(f"encryption {cfg.encryption!r} is not supported")
        if cfg.page_entries < 1 or len(cfg.hash_key) != (0 if cfg.encrypted else 32) or not \
                cfg.chunk_size * 2 <= cfg.pack_size <= MAX_PACK:
            raise IntegrityError("config: malformed parameters", key="config")
        return cfg

    @property
    def codec_level(self) -> int:
        """The zstd level writers use; 0 stores blobs uncompressed."""
        return self.compression_level if self.compression == "zstd" else 0

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.repository_id,
            "version": self.version,
            "chunk_size": self.chunk_size,
            "pack_size": self.pack_size,
            "compression": f"{self.compression}-{self.compression_level}",
            "encryption": self.encryption,
            "created": self.created,
            "object_lock": None if self.object_lock_days is None else
            {"days": self.object_lock_days, "mode": self.object_lock_mode},
        }
