"""In-memory backend for tests: a dict behind a lock, same guarantees as any backend."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from .base import Backend, Payload, check_range, payload_bytes, validate_key, validate_prefix
from .errors import ObjectNotFound


class MemoryBackend(Backend):
    """Objects kept in a process-local dict; nothing survives the process."""

    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.location = "memory://"

    @classmethod
    def from_url(cls, url: str, create: bool = False) -> MemoryBackend:
        """Build an empty store; ``memory://`` carries no parameters."""
        return cls()

    def put(self, key: str, data: Payload) -> None:
        validate_key(key)
        blob = bytes(payload_bytes(data))
        with self._lock:
            self._objects[key] = blob

    def _obj(self, key: str) -> bytes:
        validate_key(key)
        with self._lock:
            try:
                return self._objects[key]
            except KeyError:
                raise ObjectNotFound(f"no object {key}", key=key) from None

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        blob = self._obj(key)
        n = check_range(key, len(blob), offset, length)
        return blob[offset : offset + n]

    def size(self, key: str) -> int:
        return len(self._obj(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        with self._lock:
            keys = [k for k in self._objects if k.startswith(prefix)]
        yield from keys

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._lock:
            if self._objects.pop(key, None) is None:
                raise ObjectNotFound(f"no object {key}", key=key)
