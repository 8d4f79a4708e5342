"""The read planner: many blobs read with few requests, in parallel, checked, delivered in place.

Restore, verify, copy and the NBD export ask for blobs through one
:class:`ReadPlanner`. It takes the wanted blobs in windows, looks each one
up once (a blob wanted several times is read once), groups them by pack,
sorts them by offset and coalesces neighbours into one ranged request when
the gap between them is small and the request stays below a size limit.
Requests run on a thread pool sized from the CPU count and the backend's
concurrency hint; each worker fetches its range, decodes and checks every
blob in it against its id and hands the plaintext to the caller's
``deliver(tag, data)``, which writes it where it belongs. At most
``memory`` bytes of requests are in flight; from a store that reads in
windows (S3), a request holds one window at a time, so a whole pack is asked
for at once without holding it.

A blob whose copy fails its checks (or whose pack is missing) is read again
from any other copy the index knows; if none is good, the caller's
``damaged(tag, blob_id, why)`` is told, or an IntegrityError naming the
blob is raised.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from vmrepo.storage.errors import StorageError

from .errors import IntegrityError
from .format import pack_key
from .index import Location

if TYPE_CHECKING:
    from .repository import Repository

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Wanted blobs planned together (grouping by pack happens within a window): 4 GiB of
#: 256 KiB chunks, so that the packs of a disk read in two halves in turns (each pack
#: holding pieces of both) are read once each, up to 4 GiB of data (a few MiB of memory).
WINDOW = 16384


@dataclass
class PlannerStats:
    requests: int = 0
    bytes_fetched: int = 0
    blobs: int = 0
    bytes_delivered: int = 0
    damaged: int = 0


@dataclass
class _Request(Generic[T]):
    pack_id: bytes
    start: int
    end: int
    blobs: list[tuple[bytes, Location, list[T]]] = field(default_factory=list)


def default_workers(concurrency: int) -> int:
    """Threads for reading: every core, more when the store rewards parallel requests."""
    return max(2, os.cpu_count() or 2, min(concurrency, 8))


class ReadPlanner(Generic[T]):
    """Reads blobs for one caller; ``deliver`` and ``damaged`` run in worker threads."""

    def __init__(self, repo: Repository, deliver: Callable[[T, bytes], None], *,
                 damaged: Callable[[T, bytes, str], None] | None = None,
                 workers: int | None = None, max_request: int | None = None,
                 max_gap: int | None = None, memory: int | None = None,
                 check: Callable[[], None] | None = None,
                 decode: bool = True,
                 locate: Callable[[bytes], Location | None] | None = None) -> None:
        self.repo = repo
        self.deliver = deliver
        self.damaged = damaged
        self.workers = workers or default_workers(repo.backend.concurrency)
        local = repo.backend.local
        # A remote store charges per request and may read a whole object per range (moto
        # does): ask for up to a whole pack at once there.
        self.max_request = max_request or (8 << 20 if local else
                                           max(8 << 20, repo.config.pack_size))
        # A local disk reads small gaps faster than it seeks; a remote store pays per request.
        self.max_gap = max_gap if max_gap is not None else \
            (256 << 10 if repo.backend.local else 1 << 20)
        self.memory = max(memory or (64 << 20 if local else 2 * self.max_request),
                          self.max_request)
        self.check = check
        #: False: deliver the stored bytes as they are (copies between repositories).
        self.decode = decode
        #: Where to read a blob, before the index is asked (a repack reads given copies).
        self.locate = locate
        self.stats = PlannerStats()
        self._budget = threading.Semaphore(self.memory // (64 << 10))
        self._stats_lock = threading.Lock()

    def read(self, wants: Iterable[tuple[bytes, T]]) -> PlannerStats:
        """Read every wanted ``(blob id, tag)``; ``deliver`` gets each tag's plaintext."""
        pending: list[Future[None]] = []
        error: list[BaseException] = []
        with ThreadPoolExecutor(self.workers, thread_name_prefix="vmrepo-read") as pool:
            try:
                for window in _windows(wants, WINDOW):
                    for req in self._plan(window):
                        if error:
                            break
                        if self.check is not None:
                            self.check()
                        units = self._units(req)
                        for _ in range(units):
                            self._budget.acquire()
                        fut = pool.submit(self._run, req)
                        fut.add_done_callback(functools.partial(self._done, units=units,
                                                                error=error))
                        pending.append(fut)
                        pending = [f for f in pending if not f.done()]
                    if error:
                        break
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
            if error:
                for f in pending:
                    f.cancel()
        if error:
            raise error[0]
        log.info("read %d blobs (%d bytes) with %d requests of %d bytes",
                 self.stats.blobs, self.stats.bytes_delivered, self.stats.requests,
                 self.stats.bytes_fetched)
        return self.stats

    def _units(self, req: _Request[T]) -> int:
        # A store that reads in windows holds one window (or blob) of a request at a time.
        size = req.end - req.start
        window = self.repo.backend.read_window
        if window:
            size = min(size, max(window, max(loc.length for _, loc, _ in req.blobs)))
        return min(max(1, size >> 16), self.memory // (64 << 10))

    def _done(self, fut: Future[None], *, units: int, error: list[BaseException]) -> None:
        for _ in range(units):
            self._budget.release()
        if not fut.cancelled() and fut.exception() is not None and not error:
            error.append(fut.exception())  # type: ignore[arg-type]

    def _plan(self, window: dict[bytes, list[T]]) -> Iterator[_Request[T]]:
        by_pack: dict[bytes, list[tuple[bytes, Location, list[T]]]] = {}
        for blob_id, tags in window.items():
            loc = self.locate(blob_id) if self.locate is not None else None
            if loc is None:
                loc = self.repo.index.get(blob_id)
            if loc is None:
                locs = self.repo.index.locations(blob_id)
                if not locs:
                    self._fail(blob_id, tags, f"blob {blob_id.hex()[:16]} is referenced but "
                                              "not in the index")
                    continue
                loc = locs[0]
            by_pack.setdefault(loc.pack_id, []).append((blob_id, loc, tags))
        for pack_id, blobs in by_pack.items():
            blobs.sort(key=lambda b: b[1].offset)
            req: _Request[T] | None = None
            for blob in blobs:
                loc = blob[1]
                end = loc.offset + loc.length
                if req is not None and loc.offset - req.end <= self.max_gap and \
                        end - req.start <= self.max_request and loc.offset >= req.end:
                    req.end = end
                    req.blobs.append(blob)
                    continue
                if req is not None:
                    yield req
                req = _Request(pack_id, loc.offset, end, [blob])
            if req is not None:
                yield req

    def _run(self, req: _Request[T]) -> None:
        key = pack_key(req.pack_id)
        pieces = self.repo.store.get_spans(key, [(loc.offset, loc.length)
                                                 for _, loc, _ in req.blobs])
        try:
            for i, (blob_id, loc, tags) in enumerate(req.blobs):
                stored = None  # a windowed read lets the last window go before the next
                try:
                    stored = next(pieces, None)
                    if stored is None:
                        raise StorageError(f"{key}: fewer spans than asked for", key=key)
                except StorageError as exc:
                    log.debug("request %s %d+%d failed: %s", key, req.start,
                              req.end - req.start, exc)
                    for later_id, _loc, later_tags in req.blobs[i:]:
                        self._retry(later_id, later_tags, f"{key}: {exc}")
                    return
                if i == 0:
                    with self._stats_lock:
                        self.stats.requests += 1
                        self.stats.bytes_fetched += req.end - req.start
                what = f"blob {blob_id.hex()[:16]} in {key}"
                try:
                    plain = self.repo.check_blob(blob_id, stored, loc.raw_length, what) \
                        if self.decode else bytes(stored)
                except IntegrityError as exc:
                    self._retry(blob_id, tags, str(exc))
                    continue
                self._give(tags, plain)
        finally:
            pieces.close()

    def _give(self, tags: list[T], data: bytes) -> None:
        for tag in tags:
            self.deliver(tag, data)
        with self._stats_lock:
            self.stats.blobs += 1
            self.stats.bytes_delivered += len(data) * len(tags)

    def _retry(self, blob_id: bytes, tags: list[T], why: str) -> None:
        """The planned copy failed: try every copy the index knows."""
        try:
            if self.decode:
                self._give(tags, self.repo.read_blob(blob_id))
            else:
                self._give(tags, self._stored_copy(blob_id))
            return
        except IntegrityError as exc:
            why = str(exc)
        self._fail(blob_id, tags, why)

    def _stored_copy(self, blob_id: bytes) -> bytes:
        """A copy of the blob as stored that passes its checks (for ``decode=False``)."""
        errors = []
        for loc in self.repo.index.locations(blob_id):
            key = pack_key(loc.pack_id)
            try:
                stored = self.repo.store.get_range(key, loc.offset, loc.length)
                self.repo.check_blob(blob_id, stored, loc.raw_length, f"blob in {key}")
                return stored
            except (IntegrityError, StorageError) as exc:
                errors.append(str(exc))
        raise IntegrityError(f"blob {blob_id.hex()[:16]}: no readable copy "
                             f"({'; '.join(errors) or 'not in the index'})",
                             key=f"blob {blob_id.hex()[:16]}")

    def _fail(self, blob_id: bytes, tags: list[T], why: str) -> None:
        with self._stats_lock:
            self.stats.damaged += 1
        if self.damaged is None:
            raise IntegrityError(why, key=f"blob {blob_id.hex()[:16]}")
        for tag in tags:
            self.damaged(tag, blob_id, why)


def _windows(wants: Iterable[tuple[bytes, T]], size: int) -> Iterator[dict[bytes, list[T]]]:
    window: dict[bytes, list[T]] = {}
    for blob_id, tag in wants:
        window.setdefault(blob_id, []).append(tag)
        if len(window) >= size:
            yield window
            window = {}
    if window:
        yield window
