"""The one door to storage: every repository object is written and read here.

:class:`RepoStore` sits between the core and a backend. It encodes and
decodes every object through the repository's :class:`~vmrepo.codec.Codec`,
checks ids, keeps immutable objects in the local cache when the repository
is remote, and turns what it cannot use into *problems* (the key and what is
wrong) instead of failing the whole command:

* names vmrepo never writes (``snapshots/README``, ``.DS_Store``) are
  foreign: ignored, reported once;
* objects that do not decode or do not match their id are damaged: the
  caller decides whether it can go on without them (listing snapshots can,
  a restore that needs the object cannot).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vmrepo.storage.base import Backend, Buffer, ObjectInfo, Payload, Span, is_valid_key
from vmrepo.storage.errors import ObjectNotFound

from .cache import Cache, ObjectCache
from .codec import Codec, RecordKind
from .errors import IntegrityError
from .format import Hasher, index_key, pack_key
from .pack import BlobEntry, decode_header, parse_trailer
from .segments import Segment, decode_segment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """An object a command met but could not use."""

    key: str
    message: str
    #: ``damaged`` (fails its checks) or ``foreign`` (a name vmrepo never writes).
    kind: str = "damaged"

    def __str__(self) -> str:
        if self.kind == "foreign":
            return f"ignoring {self.key}: not an object vmrepo writes"
        return self.message if self.key in self.message else f"{self.key}: {self.message}"


Reporter = Callable[[Problem], None]


def log_problem(problem: Problem) -> None:
    log.warning("%s", problem)


class RepoStore:
    """A backend seen through the repository's codec, ids and cache."""

    def __init__(self, backend: Backend, codec: Codec, hasher: Hasher,
                 cache: Cache | None = None, report: Reporter = log_problem) -> None:
        self.backend = backend
        self.codec = codec
        self.hasher = hasher
        self.cache = cache
        #: Cached copies of immutable objects, for repositories that are not local.
        self.objects: ObjectCache | None = None
        if cache is not None and not backend.local:
            self.objects = cache.objects
        self._report = report
        self.problems: list[Problem] = []
        self._reported: set[str] = set()

    # -- problems ------------------------------------------------------------

    def problem(self, key: str, message: str, kind: str = "damaged") -> Problem:
        """Record (and report once) that ``key`` could not be used."""
        p = Problem(key, message, kind)
        if key not in self._reported:
            self._reported.add(key)
            self.problems.append(p)
            self._report(p)
        return p

    def damaged(self, exc: IntegrityError, key: str) -> Problem:
        return self.problem(key, str(exc))

    # -- listing -------------------------------------------------------------

    def listing(self, prefix: str, is_ours: Callable[[str], bool] | None = None
             ) -> list[ObjectInfo]:
        """The objects under ``prefix``; names vmrepo never writes are reported and left out."""
        out = []
        for info in self.backend.list(prefix):
            if not is_valid_key(info.key) or (is_ours is not None and not is_ours(info.key)):
                self.problem(info.key, "not an object vmrepo writes", "foreign")
                continue
            out.append(info)
        return out

    # -- records -------------------------------------------------------------

    def put_record(self, kind: RecordKind, key: str, fields: dict[str, Any]) -> bytes:
        raw = self.codec.encode_record(kind, fields)
        self.backend.put(key, raw)
        return raw

    def create_record(self, kind: RecordKind, key: str, fields: dict[str, Any]) -> None:
        self.backend.create(key, self.codec.encode_record(kind, fields))

    def get_record(self, kind: RecordKind, key: str, max_version: int,
                   info: ObjectInfo | None = None) -> dict[str, Any]:
        """A record's fields; with ``info`` (from a listing) it may come from the cache."""
        raw = self._cached(key, info.etag if info is not None else None)
        try:
            return self.codec.decode_record(kind, raw, key, max_version)
        except IntegrityError:
            if self.objects is not None:
                self.objects.discard(key)  # never keep a bad copy
            raise

    def _cached(self, key: str, tag: str | None) -> bytes:
        """An object's bytes, from the cache when ``tag`` says the cached copy is current."""
        if self.objects is not None and tag is not None:
            raw = self.objects.get(key, tag)
            if raw is not None:
                return raw
        raw = self.backend.get(key)
        if self.objects is not None and tag is not None:
            self.objects.put(key, raw, tag)
        return raw

    # -- index segments (content-addressed) -----------------------------------

    def load_segment(self, segment_id: bytes) -> Segment:
        """A segment checked against its id; IntegrityError if damaged, ObjectNotFound."""
        key = index_key(segment_id)
        raw = self._cached(key, "")
        if self.hasher.id(raw) != segment_id:
            if self.objects is not None:
                self.objects.discard(key)
            raise IntegrityError(f"{key}: content does not match its id", key=key)
        return decode_segment(self.codec, raw, key)

    def put_segment(self, key: str, raw: bytes) -> None:
        self.backend.put(key, raw)
        if self.objects is not None:
            self.objects.put(key, raw)

    def forget_cached(self, prefix: str, keep: Iterable[str]) -> None:
        """Drop cached objects under ``prefix`` that the repository no longer has."""
        if self.objects is not None:
            self.objects.retain(prefix, keep)

    # -- packs ---------------------------------------------------------------

    def put_pack(self, pack_id: bytes, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        self.backend.put(pack_key(pack_id), parts)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.backend.get(key, offset, length)

    def get_spans(self, key: str, spans: Sequence[Span]) -> Generator[Buffer, None, None]:
        """Several spans of one object with one request (as they arrive, where the
        backend reads in windows)."""
        return self.backend.get_spans(key, spans)

    def pack_header(self, pack_id: bytes, size: int | None = None) -> list[BlobEntry]:
        """The blobs a pack's own header lists (the index can be rebuilt from these)."""
        key = pack_key(pack_id)
        cache_key = f"headers/{pack_id.hex()}"
        raw = self.objects.get(cache_key) if self.objects is not None else None
        if raw is None:
            if size is None:
                size = self.backend.stat(key).size
            hoff, hlen = parse_trailer(self.backend.get(key, max(0, size - 12), min(12, size)),
                                       size, key)
            raw = self.backend.get(key, hoff, hlen)
            entries = decode_header(self.codec, raw, key, size)
            if self.objects is not None:
                self.objects.put(cache_key, raw)
            return entries
        try:
            return decode_header(self.codec, raw, key, size)
        except IntegrityError:
            if self.objects is not None:
                self.objects.discard(cache_key)
            raise

    def delete(self, key: str) -> None:
        self.backend.delete(key)
        if self.objects is not None:
            self.objects.discard(key)

    def exists(self, key: str) -> bool:
        try:
            self.backend.stat(key)
        except ObjectNotFound:
            return False
        return True

    def put(self, key: str, data: Payload) -> None:
        """Store bytes the caller encoded itself (the config)."""
        self.backend.put(key, data)
