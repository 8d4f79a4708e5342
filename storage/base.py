"""The storage backend interface and the guarantees every backend gives.

Every backend MUST guarantee:

* **Atomic put**: after ``put`` returns, readers see either no object or the
  whole object, never a partial one; a failed or interrupted ``put`` leaves
  no object (or the previous one) under the key.
* **Create if absent**: ``create`` stores an object only if none exists under
  the key, else raises :class:`~vmrepo.storage.errors.ObjectExists`. Where
  the store can do this atomically (``atomic_create``), two concurrent
  creates of one key never both succeed; where it cannot, ``create`` checks
  first and the caller must tolerate a race (locks write unique keys and
  check again after writing).
* **Durability**: when ``put`` or ``create`` returns, the object survives a
  crash of the process and, where the medium allows it, of the host.
* **Read-after-write**: ``get``, ``stat`` and ``list`` see an object as soon
  as its ``put`` has returned, and stop seeing it once ``delete`` returns.
  ``delete`` is idempotent: deleting an absent key succeeds.
* **Ranged get**: ``get(key, offset, length)`` returns exactly the bytes
  asked for, or raises; a range beyond the end is an error.
  ``get_spans(key, spans)`` gives the bytes of several ascending spans of
  one object, read with one request; a backend with a ``read_window`` hands
  the spans over as they arrive, holding at most that many bytes (or one
  span) at once, not the range (the base implementation reads the range
  with ``get``).
* **Listing by prefix**: ``list(prefix)`` yields an :class:`ObjectInfo` for
  every object whose name starts with ``prefix``, each once, in no
  particular order, with its size and, where the store has them, its
  modification time and an *etag* that changes whenever the content does.
  Listings also show names that are not valid keys (files someone put
  there); callers decide what to do with them (:func:`is_valid_key`).
* **Errors** come from :mod:`vmrepo.storage.errors`;
  :class:`~vmrepo.storage.errors.TransientError` marks the failures that may
  succeed if retried (timeouts, throttling, resets, server errors); every
  other error is permanent.

Keys are relative, lowercase and made of ``[a-z0-9/._-]``; no empty path
component, no ``.`` or ``..`` component, at most 512 characters.
Retries, rate limits and fault injection are wrappers, not methods.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidKey, ObjectNotFound, StorageError
from .objectlock import ObjectLock

Buffer = bytes | bytearray | memoryview
#: What ``put`` stores: one buffer, or parts stored concatenated (no join needed).
Payload = Buffer | Sequence[Buffer]
#: A byte range of an object: (offset, length).
Span = tuple[int, int]


@dataclass(frozen=True)
class ObjectInfo:
    """An object as a listing shows it."""

    key: str
    size: int
    #: Modification time (seconds since the epoch), where the store keeps one.
    mtime: float | None = None
    #: A validator that changes whenever the content does (S3's ETag), where available.
    etag: str | None = None


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


def payload_size(data: Payload) -> int:
    return sum(p.nbytes for p in payload_parts(data))


_KEY_RE = re.compile(r"[a-z0-9._-]+(/[a-z0-9._-]+)*")


def is_valid_key(key: str) -> bool:
    """Whether ``key`` is a well-formed object key."""
    return (
        isinstance(key, str)
        and len(key) <= 512
        and _KEY_RE.fullmatch(key) is not None
        and not any(part in (".", "..") for part in key.split("/"))
    )


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise :class:`InvalidKey`."""
    if not is_valid_key(key):
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
    #: How many requests in parallel pay off (sizes thread pools and connection pools).
    concurrency: int = 4
    #: Objects live on a local file system: reading them costs no more than a local cache.
    local: bool = False
    #: ``create`` is atomic against concurrent creators (else check-then-write).
    atomic_create: bool = True
    #: The settings ``from_url`` takes from the config's ``[storage]`` table.
    option_keys: frozenset[str] = frozenset()
    #: ``get_spans`` hands spans over as they arrive, holding at most this many bytes (or
    #: one span) at once; 0: it reads the whole range first.
    read_window: int = 0

    @classmethod
    def from_url(cls, url: str, create: bool = False,
                 options: Mapping[str, Any] | None = None) -> Backend:
        """Open the store a URL names; ``create`` makes an empty one where needed.

        ``options`` are backend settings from the config file (endpoint, region, ...).
        """
        raise NotImplementedError(f"{cls.__name__} cannot be opened from a URL")

    @abstractmethod
    def put(self, key: str, data: Payload) -> None:
        """Store ``data`` (one buffer or parts, concatenated) under ``key`` atomically and
        durably, replacing any object."""

    @abstractmethod
    def create(self, key: str, data: Payload) -> None:
        """Store ``data`` under ``key`` only if no object is there (ObjectExists otherwise)."""

    @abstractmethod
    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return the object's bytes, or ``length`` bytes from ``offset``.

        Raises :class:`~vmrepo.storage.errors.ObjectNotFound` if absent and
        :class:`~vmrepo.storage.errors.StorageError` for a range past the end.
        """

    def get_spans(self, key: str, spans: Sequence[Span]) -> Generator[Buffer, None, None]:
        """The bytes of each ``(offset, length)`` span of the object, in order, read with one
        request covering them all (the gaps between them read and dropped). Spans ascend
        and do not overlap. Errors as :meth:`get`; one part-way comes after the spans
        already given."""
        if not spans:
            return
        start, end = spans_range(spans)
        data = memoryview(self.get(key, start, end - start))
        for off, n in spans:
            yield data[off - start : off - start + n]

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """The object's size (and time and etag where known); ObjectNotFound if absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield every object whose name starts with ``prefix``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object if present (deleting an absent key is not an error, as on S3)."""

    def size(self, key: str) -> int:
        """The object's size in bytes; ObjectNotFound if absent."""
        return self.stat(key).size

    def exists(self, key: str) -> bool:
        """Return whether an object is stored under ``key``."""
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def object_lock(self) -> ObjectLock | None:
        """The store's object lock (S3 Object Lock), if it has one."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the default does nothing."""


class BackendWrapper(Backend):
    """A backend that forwards every call to ``inner`` (base of retries, faults, ...)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.location = inner.location

    # What the wrapped store is like may change as it learns (S3 probes conditional writes).
    @property
    def concurrency(self) -> int:  # type: ignore[override]
        return self.inner.concurrency

    @property
    def local(self) -> bool:
        return self.inner.local

    @local.setter
    def local(self, value: bool) -> None:
        self.inner.local = value

    @property
    def atomic_create(self) -> bool:  # type: ignore[override]
        return self.inner.atomic_create

    def put(self, key: str, data: Payload) -> None:
        self.inner.put(key, data)

    def create(self, key: str, data: Payload) -> None:
        self.inner.create(key, data)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(key, offset, length)

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def object_lock(self) -> ObjectLock | None:
        return self.inner.object_lock()

    def close(self) -> None:
        self.inner.close()


def spans_range(spans: Sequence[Span]) -> Span:
    """The ``(start, end)`` that spans cover; ValueError unless they ascend without overlap."""
    pos = spans[0][0]
    for off, n in spans:
        if off < pos or n < 0:
            raise ValueError(f"spans must ascend without overlapping: {list(spans)[:4]}...")
        pos = off + n
    return spans[0][0], pos


def check_range(key: str, total: int, offset: int, length: int | None) -> int:
    """Validate a ranged read of an object of ``total`` bytes; return the length to read."""
    if length is None:
        length = total - offset
    if offset < 0 or length < 0 or offset + length > total:
        raise StorageError(
            f"range {offset}+{length} outside object {key} of {total} bytes", key=key
        )
    return length
