"""Repository locks: what an operation covers, refreshed while it runs, never silently lost.

A lock is a record under ``locks/<random id>`` (docs/format.md, section
locks) naming host, pid, operation, *scope* and *exclusive*, and when it was
last refreshed. Two locks conflict when either is an exclusive lock of the
whole repository, or both are exclusive locks of the same VM (two snapshots
of one VM); shared locks never conflict with each other. See
:func:`conflicts`.

A lock is *stale* when its process is gone (same host, pid not running) or it
was not refreshed for :data:`STALE_AFTER`. Stale locks never block; they are
reported and ``vmrepo unlock`` removes them. A lock record that cannot be
decoded is *corrupt*: reported, never blocking, removable by ``unlock``.

Acquisition: check for conflicting locks, create ours, check again (a
concurrent locker may have written between), and back off on conflict. The
holder refreshes its lock every :data:`REFRESH_EVERY` seconds from a thread;
when a refresh fails the lock is *lost* and :meth:`RepoLock.check`, which
the operation calls as it goes, raises :class:`LockLost`: an operation never
runs on under a lock others may already treat as stale.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from vmrepo.storage.errors import ObjectNotFound, StorageError

from .codec import RecordKind
from .errors import IncompatibleRepository, IntegrityError, LockLost, RepositoryLocked
from .format import LOCK_PREFIX, lock_key
from .store import RepoStore

log = logging.getLogger(__name__)

STALE_AFTER = timedelta(minutes=30)
#: A holder stops this long after its last successful refresh (by its own monotonic
#: clock), well before others may take its lock for stale.
STOP_AFTER = timedelta(minutes=20)
REFRESH_EVERY = 300.0
LOCK_VERSION = 2
REPOSITORY = "repository"

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def vm_scope(vm: str) -> str:
    """The scope of a lock on one VM's snapshots."""
    return f"vm:{vm}"


@dataclass(frozen=True)
class LockInfo:
    id: str
    host: str
    pid: int
    operation: str
    exclusive: bool
    time: datetime
    refreshed: datetime
    scope: str = REPOSITORY

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        what = "" if self.scope == REPOSITORY else f" of {self.scope}"
        return (f"{kind} lock{what} {self.id[:8]} by pid {self.pid} on {self.host} "
                f"({self.operation}, since {self.time.astimezone():%Y-%m-%d %H:%M:%S})")

    def fields(self, version: int) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "v": version, "host": self.host, "pid": self.pid, "operation": self.operation,
            "exclusive": self.exclusive, "time": self.time.isoformat(),
            "refreshed": self.refreshed.isoformat()}
        if version >= 2:
            rec["scope"] = self.scope
        return rec

    @classmethod
    def from_fields(cls, lock_id: str, rec: dict[str, Any]) -> LockInfo:
        try:
            info = cls(lock_id, str(rec["host"]), int(rec["pid"]), str(rec["operation"]),
                       bool(rec["exclusive"]), datetime.fromisoformat(rec["time"]),
                       datetime.fromisoformat(rec["refreshed"]),
                       str(rec.get("scope", REPOSITORY)))
        except (KeyError, ValueError, TypeError) as exc:
            raise IntegrityError(f"lock {lock_id}: malformed ({exc})",
                                 key=lock_key(lock_id)) from exc
        if info.time.tzinfo is None or info.refreshed.tzinfo is None:
            raise IntegrityError(f"lock {lock_id}: times without zone", key=lock_key(lock_id))
        return info


@dataclass(frozen=True)
class CorruptLock:
    """A record under ``locks/`` that is not a lock this vmrepo can read."""

    id: str
    problem: str

    def describe(self) -> str:
        return f"corrupt lock {self.id}: {self.problem}"


def conflicts(a: LockInfo, b: LockInfo) -> bool:
    """Whether two live locks exclude each other."""
    if (a.exclusive and a.scope == REPOSITORY) or (b.exclusive and b.scope == REPOSITORY):
        return True
    return a.exclusive and b.exclusive and a.scope == b.scope


def stale_reason(lock: LockInfo, now: datetime, host: str | None = None) -> str | None:
    """Why ``lock`` is stale, or None if it may still be held."""
    if (host or socket.gethostname()) == lock.host:
        try:
            os.kill(lock.pid, 0)
        except ProcessLookupError:
            return f"process {lock.pid} is gone"
        except PermissionError:
            pass
    if now - lock.refreshed > STALE_AFTER:
        return f"not refreshed since {lock.refreshed.astimezone():%Y-%m-%d %H:%M:%S}"
    return None


def alive_ids(store: RepoStore, own: str | None, now: datetime) -> set[str]:
    """Ids of the locks that may still be held, judged by the store's clock where it can be:
    a lock whose object was last written more than :data:`STALE_AFTER` before our own lock
    was (both times from the store's listing) is stale whatever the hosts' clocks say; a
    lock of this host whose process is gone is stale; otherwise the lock's own
    ``refreshed`` time is compared with ``now``. Corrupt locks count as alive (they cannot be
    judged). ``own`` (the caller's lock) is left out."""
    written = {i.key[len(LOCK_PREFIX):]: i.mtime for i in store.listing(LOCK_PREFIX)}
    ref = written.get(own) if own is not None else None
    locks, corrupt = list_locks(store)
    alive = {c.id for c in corrupt if c.id != own}
    host = socket.gethostname()
    for lk in locks:
        if lk.id == own:
            continue
        why = stale_reason(lk, now, host)
        if why is not None and why.startswith("process"):
            continue
        mtime = written.get(lk.id)
        if ref is not None and mtime is not None:
            if ref - mtime <= STALE_AFTER.total_seconds():
                alive.add(lk.id)
        elif why is None:
            alive.add(lk.id)
    return alive


def list_locks(store: RepoStore) -> tuple[list[LockInfo], list[CorruptLock]]:
    """The readable locks and the corrupt records under ``locks/``."""
    locks, corrupt = [], []
    for info in store.listing(LOCK_PREFIX):
        lock_id = info.key[len(LOCK_PREFIX):]
        if "/" in lock_id:
            store.problem(info.key, "not an object vmrepo writes", "foreign")
            continue
        try:
            rec = store.get_record(RecordKind.LOCK, info.key, LOCK_VERSION)
            locks.append(LockInfo.from_fields(lock_id, rec))
        except ObjectNotFound:
            continue  # released while we listed
        except (IntegrityError, IncompatibleRepository) as exc:
            corrupt.append(CorruptLock(lock_id, str(exc)))
    return locks, corrupt


class RepoLock:
    """A held lock; refreshes itself in a daemon thread until released."""

    def __init__(self, store: RepoStore, info: LockInfo, version: int, clock: Clock,
                 stale: list[tuple[LockInfo, str]], corrupt: list[CorruptLock],
                 refresh_every: float = REFRESH_EVERY) -> None:
        self.store = store
        self.info = info
        self.version = version
        self.clock = clock
        self.stale = stale
        self.corrupt = corrupt
        self.refresh_every = refresh_every
        self.lost: LockLost | None = None
        #: When the lock was last written, by this process's monotonic clock.
        self._written = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="vmrepo-lock", daemon=True)
        self._thread.start()

    def _overdue(self) -> bool:
        return time.monotonic() - self._written > STOP_AFTER.total_seconds()

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_every):
            if self._overdue():  # suspended: others may have taken the lock for stale
                self.lost = LockLost("the repository lock was not refreshed in time (was the "
                                     "process suspended?); the operation stops",
                                     lock=self.info.id)
                return
            info = replace(self.info, refreshed=self.clock())
            try:
                self.store.put_record(RecordKind.LOCK, lock_key(info.id),
                                      info.fields(self.version))
            except StorageError as exc:
                self.lost = LockLost(f"could not refresh the repository lock ({exc}); the "
                                     "operation stops before other processes take the lock "
                                     "for stale", lock=info.id)
                log.debug("lock %s lost: %s", info.id, exc)
                return
            self.info = info
            self._written = time.monotonic()

    def check(self) -> None:
        """Raise :class:`LockLost` if the lock could not be kept."""
        if self.lost is not None:
            raise self.lost
        if self._overdue() or self.clock() - self.info.refreshed > STOP_AFTER:
            self.lost = LockLost("the repository lock was not refreshed in time (was the "
                                 "process suspended?); the operation stops", lock=self.info.id)
            raise self.lost

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.store.delete(lock_key(self.info.id))
        except StorageError as exc:
            log.debug("could not remove lock %s: %s", self.info.id, exc)


def _blocking(new: LockInfo, locks: list[LockInfo], now: datetime
              ) -> tuple[list[LockInfo], list[tuple[LockInfo, str]]]:
    blocking, stale = [], []
    for lock in locks:
        if lock.id == new.id:
            continue
        why = stale_reason(lock, now)
        if why:
            stale.append((lock, why))
        elif conflicts(new, lock):
            blocking.append(lock)
    return blocking, stale


def acquire(store: RepoStore, operation: str, *, scope: str = REPOSITORY,
            exclusive: bool = False, version: int = LOCK_VERSION, clock: Clock = utc_now,
            refresh_every: float = REFRESH_EVERY) -> RepoLock:
    """Take a lock or raise :class:`RepositoryLocked` naming the holders.

    ``version`` is the lock record version the repository's format uses.
    """
    now = clock()
    info = LockInfo(secrets.token_hex(16), socket.gethostname(), os.getpid(), operation,
                    exclusive, now, now, scope if version >= 2 else REPOSITORY)
    locks, _ = list_locks(store)
    blocking, _ = _blocking(info, locks, now)
    if blocking:
        raise _locked(blocking)
    store.create_record(RecordKind.LOCK, lock_key(info.id), info.fields(version))
    locks, corrupt = list_locks(store)
    blocking, stale = _blocking(info, locks, now)
    if blocking:
        try:
            store.delete(lock_key(info.id))
        except StorageError as exc:
            log.debug("could not withdraw lock %s: %s", info.id, exc)
        raise _locked(blocking)
    log.debug("took %s", info.describe())
    return RepoLock(store, info, version, clock, stale, corrupt, refresh_every)


def _locked(blocking: list[LockInfo]) -> RepositoryLocked:
    return RepositoryLocked("repository is locked: " + "; ".join(b.describe() for b in blocking),
                            holders=[b.describe() for b in blocking])


def remove_stale(store: RepoStore, now: datetime, all_locks: bool = False
                 ) -> tuple[list[LockInfo], list[CorruptLock]]:
    """Delete stale and corrupt locks (every lock with ``all_locks``); return those removed."""
    removed = []
    locks, corrupt = list_locks(store)
    for lock in locks:
        if all_locks or stale_reason(lock, now):
            store.delete(lock_key(lock.id))
            removed.append(lock)
    for bad in corrupt:
        store.delete(lock_key(bad.id))
    return removed, corrupt
