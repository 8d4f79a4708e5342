"""The repository ``config`` record: identity, parameters and required features."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import IncompatibleRepository, IntegrityError
from .format import FORMAT_VERSION, KNOWN_FEATURES, decode_record, encode_record

MIN_CHUNK = 64 << 10
MAX_CHUNK = 4 << 20
DEFAULT_CHUNK = 256 << 10
DEFAULT_PACK_SIZE = 32 << 20
DEFAULT_PAGE_ENTRIES = 512
DEFAULT_ZSTD_LEVEL = 3


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

    @classmethod
    def new(cls, chunk_size: int = DEFAULT_CHUNK, pack_size: int = DEFAULT_PACK_SIZE,
            compression_level: int = DEFAULT_ZSTD_LEVEL) -> RepoConfig:
        """A fresh config with a random id and hash key."""
        check_chunk_size(chunk_size)
        if pack_size < chunk_size * 2:
            raise ValueError("pack size must be at least two chunks")
        return cls(
            repository_id=secrets.token_hex(16),
            chunk_size=chunk_size,
            hash_key=secrets.token_bytes(32),
            compression_level=compression_level,
            pack_size=pack_size,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    def encode(self) -> bytes:
        return encode_record({
            "v": self.version,
            "id": self.repository_id,
            "chunk_size": self.chunk_size,
            "hash": {"algorithm": "blake3-keyed", "key": self.hash_key},
            "compression": {"algorithm": self.compression, "level": self.compression_level},
            "pack_size": self.pack_size,
            "page_entries": self.page_entries,
            "encryption": self.encryption,
            "created": self.created,
            "features": {
                "required": list(self.features_required),
                "compatible": list(self.features_compatible),
            },
        })

    @classmethod
    def decode(cls, raw: bytes) -> RepoConfig:
        """Decode and check the config; refuse what this version cannot handle."""
        rec = decode_record(raw, "config")
        features = rec.get("features", {})
        required = tuple(features.get("required", ()))
        missing = sorted(set(required) - KNOWN_FEATURES)
        if missing:
            raise IncompatibleRepository(
                "repository requires features this vmrepo lacks: " + ", ".join(missing),
                version=rec["v"], features=missing,
            )
        try:
            cfg = cls(
                repository_id=str(rec["id"]),
                chunk_size=check_chunk_size(int(rec["chunk_size"])),
                hash_key=bytes(rec["hash"]["key"]),
                compression=str(rec["compression"]["algorithm"]),
                compression_level=int(rec["compression"]["level"]),
                pack_size=int(rec["pack_size"]),
                page_entries=int(rec["page_entries"]),
                encryption=str(rec.get("encryption", "none")),
                created=str(rec.get("created", "")),
                version=int(rec["v"]),
                features_required=required,
                features_compatible=tuple(features.get("compatible", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"config: malformed ({exc})", key="config") from exc
        if rec["hash"].get("algorithm") != "blake3-keyed" or cfg.compression != "zstd":
            raise IncompatibleRepository("config names an unknown hash or compression")
        if cfg.encryption != "none":
            raise IncompatibleRepository(f"encryption {cfg.encryption!r} is not supported")
        if cfg.page_entries < 1 or len(cfg.hash_key) != 32:
            raise IntegrityError("config: malformed parameters", key="config")
        return cfg

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.repository_id,
            "version": self.version,
            "chunk_size": self.chunk_size,
            "pack_size": self.pack_size,
            "compression": f"{self.compression}-{self.compression_level}",
            "created": self.created,
        }
