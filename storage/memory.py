"""In-memory backend for tests: a dict behind a lock, same guarantees as any backend."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from .base import (
    Backend,
    ObjectInfo,
    Payload,
    check_range,
    payload_bytes,
    validate_key,
    validate_prefix,
)
from .errors import ObjectExists, ObjectNotFound


class MemoryBackend(Backend):
    """Objects kept in a process-local dict; nothing survives the process."""

    atomic_create = True

    def __init__(self) -> None:
        self._objects: dict[str, tuple[bytes, float, str]] = {}
        self._lock = threading.Lock()
        self._versions = itertools.count(1)
        self.location = "memory://"

    @classmethod
    def from_url(cls, url: str, create: bool = False,
                 options: Mapping[str, Any] | None = None) -> MemoryBackend:
        """Build an empty store; ``memory://`` carries no parameters."""
        return cls()

    def _store(self, key: str, data: Payload, exclusive: bool) -> None:
        validate_key(key)
        blob = bytes(payload_bytes(data))
        with self._lock:
            if exclusive and key in self._objects:
                raise ObjectExists(f"{key} exists", key=key)
            self._objects[key] = (blob, time.time(), f"v{next(self._versions)}")

    def put(self, key: str, data: Payload) -> None:
        self._store(key, data, exclusive=False)

    def create(self, key: str, data: Payload) -> None:
        self._store(key, data, exclusive=True)

    def _obj(self, key: str) -> tuple[bytes, float, str]:
        validate_key(key)
        with self._lock:
            try:
                return self._objects[key]
            except KeyError:
                raise ObjectNotFound(f"no object {key}", key=key) from None

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        blob = self._obj(key)[0]
        n = check_range(key, len(blob), offset, length)
        return blob[offset : offset + n]

    def stat(self, key: str) -> ObjectInfo:
        blob, mtime, etag = self._obj(key)
        return ObjectInfo(key, len(blob), mtime, etag)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        with self._lock:
            found = [ObjectInfo(k, len(b), t, e) for k, (b, t, e) in self._objects.items()
                     if k.startswith(prefix)]
        yield from found

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._lock:
            self._objects.pop(key, None)
