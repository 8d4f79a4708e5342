"""Repository locks: shared for snapshots, exclusive for maintenance.

A lock is a record under ``locks/<random id>`` naming host, pid, operation
and when it was last refreshed; a holder refreshes it every few minutes. A
lock is *stale* when its process is gone (same host, pid not running) or it
was not refreshed for :data:`STALE_AFTER`. Stale locks never block; they are
reported and ``vmrepo unlock`` removes them.

Acquisition: check for conflicting locks, write ours, check again (a
concurrent locker may have written between), and back off on conflict.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from vmrepo.storage.base import Backend
from vmrepo.storage.errors import ObjectNotFound

from .errors import IntegrityError, RepositoryLocked
from .format import decode_record, encode_record, lock_key

STALE_AFTER = timedelta(minutes=30)
REFRESH_EVERY = 300.0

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class LockInfo:
    id: str
    host: str
    pid: int
    operation: str
    exclusive: bool
    time: datetime
    refreshed: datetime

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        return (f"{kind} lock {self.id[:8]} by pid {self.pid} on {self.host} "
                f"({self.operation}, since {self.time.astimezone().strftime('%Y-%m-%d %H:%M:%S')})")

    def encode(self) -> bytes:
        return encode_record({
            "v": 1, "host": self.host, "pid": self.pid, "operation": self.operation,
            "exclusive": self.exclusive, "time": self.time.isoformat(),
            "refreshed": self.refreshed.isoformat(),
        })

    @classmethod
    def decode(cls, lock_id: str, raw: bytes) -> LockInfo:
        rec = decode_record(raw, lock_key(lock_id))
        try:
            return cls(lock_id, str(rec["host"]), int(rec["pid"]), str(rec["operation"]),
                       bool(rec["exclusive"]), datetime.fromisoformat(rec["time"]),
                       datetime.fromisoformat(rec["refreshed"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise IntegrityError(f"lock {lock_id}: malformed ({exc})") from exc


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


def list_locks(backend: Backend) -> list[LockInfo]:
    out = []
    for info in backend.list("locks/"):
        key = info.key
        lock_id = key.rpartition("/")[2]
        try:
            out.append(LockInfo.decode(lock_id, backend.get(key)))
        except ObjectNotFound:
            continue  # released while we listed
    return out


class RepoLock:
    """A held lock; refreshes itself in a daemon thread until released."""

    def __init__(self, backend: Backend, info: LockInfo, clock: Clock,
                 stale: list[tuple[LockInfo, str]]) -> None:
        self.backend = backend
        self.info = info
        self.clock = clock
        self.stale = stale
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="vmrepo-lock", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            info = LockInfo(**{**self.info.__dict__, "refreshed": self.clock()})
            with contextlib.suppress(Exception):
                self.backend.put(lock_key(info.id), info.encode())
                self.info = info

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(ObjectNotFound):
            self.backend.delete(lock_key(self.info.id))


def _conflicts(locks: list[LockInfo], exclusive: bool, now: datetime, own: str | None,
               unique: str | None) -> tuple[list[LockInfo], list[tuple[LockInfo, str]]]:
    blocking, stale = [], []
    for lock in locks:
        if lock.id == own:
            continue
        why = stale_reason(lock, now)
        if why:
            stale.append((lock, why))
        elif exclusive or lock.exclusive or (unique is not None and lock.operation == unique):
            blocking.append(lock)
    return blocking, stale


def acquire(backend: Backend, operation: str, exclusive: bool = False,
            clock: Clock = lambda: datetime.now(UTC), unique: bool = False) -> RepoLock:
    """Take a lock or raise :class:`RepositoryLocked` naming the holders.

    With ``unique``, a shared lock also conflicts with other locks of the same
    operation (e.g. two snapshots of one VM).
    """
    now = clock()
    same = operation if unique else None
    blocking, _ = _conflicts(list_locks(backend), exclusive, now, None, same)
    if blocking:
        raise _locked(blocking)
    info = LockInfo(secrets.token_hex(16), socket.gethostname(), os.getpid(), operation,
                    exclusive, now, now)
    backend.put(lock_key(info.id), info.encode())
    blocking, stale = _conflicts(list_locks(backend), exclusive, now, info.id, same)
    if blocking:
        with contextlib.suppress(ObjectNotFound):
            backend.delete(lock_key(info.id))
        raise _locked(blocking)
    return RepoLock(backend, info, clock, stale)


def _locked(blocking: list[LockInfo]) -> RepositoryLocked:
    return RepositoryLocked("repository is locked: " + "; ".join(b.describe() for b in blocking),
                            holders=[b.describe() for b in blocking])


@contextlib.contextmanager
def locked(backend: Backend, operation: str, exclusive: bool = False,
           clock: Clock = lambda: datetime.now(UTC), unique: bool = False) -> Iterator[RepoLock]:
    lock = acquire(backend, operation, exclusive, clock, unique)
    try:
        yield lock
    finally:
        lock.release()


def remove_stale(backend: Backend, now: datetime, all_locks: bool = False) -> list[LockInfo]:
    """Delete stale locks (every lock with ``all_locks``); return those removed."""
    removed = []
    for lock in list_locks(backend):
        if all_locks or stale_reason(lock, now):
            with contextlib.suppress(ObjectNotFound):
                backend.delete(lock_key(lock.id))
            removed.append(lock)
    return removed
