"""The storage backend interface and the guarantees every backend gives.

Every backend MUST guarantee:

* **Atomic put**: after ``put`` returns, readers see either no object or the
  whole object, never a partial one; a failed or interrupted ``put`` leaves
  no object (or the previous one) under the key.
* **Durability**: when ``put`` returns, the object survives a crash of the
  process and, where the medium allows it, of the host.
* **Read-after-write**: ``get``, ``size`` and ``list`` see an object as soon
  as its ``put`` has returned, and stop seeing it once ``delete`` returns.
* **Ranged get**: ``get(key, offset, length)`` returns exactly the bytes
  asked for, or raises; a range beyond the end is an error.
* **Listing by prefix**: ``list(prefix)`` yields every key that starts with
  ``prefix``, each once, in no particular order.

Keys are relative, lowercase and made of ``[a-z0-9/._-]``; no empty path
component, no ``.`` or ``..`` component, at most 512 characters.
Retries, rate limits and fault injection are wrappers, not methods.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

from .errors import InvalidKey, ObjectNotFound, StorageError

Buffer = bytes | bytearray | memoryview
#: What ``put`` stores: one buffer, or parts stored concatenated (no join needed).
Payload = Buffer | Sequence[Buffer]


def payload_parts(data: Payload) -> list[memoryview]:
    """The parts of a payload as byte views."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return [memoryview(data).cast("B")]
    return [memoryview(p).cast("B") for p in data]


def payload_bytes(data: Payload) -> bytes:
    """A payload joined into one bytes object."""
    if isinstance(data, bytes):
        return data
    return b"".join(payload_parts(data))


_KEY_RE = re.compile(r"[a-z0-9._-]+(/[a-z0-9._-]+)*")


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise :class:`InvalidKey`."""
    if (
        not isinstance(key, str)
        or len(key) > 512
        or not _KEY_RE.fullmatch(key)
        or any(part in (".", "..") for part in key.split("/"))
    ):
        raise InvalidKey(f"invalid object key {key!r}", key=str(key))
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is empty or a valid key optionally ending in '/'."""
    if prefix:
        validate_key(prefix.rstrip("/"))
    return prefix


class Backend(ABC):
    """An object store holding immutable objects under validated keys."""

    #: A URL-ish description for messages, e.g. ``/srv/backup/repo``.
    location: str = ""

    @classmethod
    def from_url(cls, url: str, create: bool = False) -> Backend:
        """Open the store a URL names; ``create`` makes an empty one where needed."""
        raise NotImplementedError(f"{cls.__name__} cannot be opened from a URL")

    @abstractmethod
    def put(self, key: str, data: Payload) -> None:
        """Store ``data`` (one buffer or parts, concatenated) under ``key`` atomically and
        durably, replacing any object."""

    @abstractmethod
    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return the object's bytes, or ``length`` bytes from ``offset``.

        Raises :class:`~vmrepo.storage.errors.ObjectNotFound` if absent and
        :class:`~vmrepo.storage.errors.StorageError` for a range past the end.
        """

    @abstractmethod
    def size(self, key: str) -> int:
        """Return the object's size in bytes; ObjectNotFound if absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield every key starting with ``prefix``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; ObjectNotFound if absent."""

    def exists(self, key: str) -> bool:
        """Return whether an object is stored under ``key``."""
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the default does nothing."""


def check_range(key: str, total: int, offset: int, length: int | None) -> int:
    """Validate a ranged read of an object of ``total`` bytes; return the length to read."""
    if length is None:
        length = total - offset
    if offset < 0 or length < 0 or offset + length > total:
        raise StorageError(
            f"range {offset}+{length} outside object {key} of {total} bytes", key=key
        )
    return length
