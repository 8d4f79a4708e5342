"""Locks: shared ones coexist, exclusive ones exclude, stale ones never block."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from vmrepo.errors import RepositoryLocked
from vmrepo.format import lock_key
from vmrepo.locks import LockInfo, acquire, list_locks, remove_stale, stale_reason
from vmrepo.storage.memory import MemoryBackend

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def clock() -> datetime:
    return NOW


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def plant(backend: MemoryBackend, pid: int, exclusive: bool, host: str | None = None,
          age: timedelta = timedelta()) -> LockInfo:
    info = LockInfo(os.urandom(8).hex(), host or os.uname().nodename, pid, "test", exclusive,
                    NOW - age, NOW - age)
    backend.put(lock_key(info.id), info.encode())
    return info


def test_shared_locks_coexist_and_release() -> None:
    b = MemoryBackend()
    a1 = acquire(b, "snapshot", clock=clock)
    a2 = acquire(b, "snapshot", clock=clock)
    assert len(list_locks(b)) == 2
    a1.release()
    a2.release()
    assert list_locks(b) == []


def test_exclusive_excludes_and_is_excluded() -> None:
    b = MemoryBackend()
    shared = acquire(b, "snapshot", clock=clock)
    with pytest.raises(RepositoryLocked, match="shared lock"):
        acquire(b, "prune", exclusive=True, clock=clock)
    shared.release()
    ex = acquire(b, "prune", exclusive=True, clock=clock)
    with pytest.raises(RepositoryLocked, match=f"pid {os.getpid()}"):
        acquire(b, "snapshot", clock=clock)
    ex.release()
    assert list_locks(b) == []  # the refused attempts left nothing


def test_lock_of_a_dead_process_is_stale_and_reported() -> None:
    b = MemoryBackend()
    planted = plant(b, dead_pid(), exclusive=True)
    lock = acquire(b, "snapshot", clock=clock)
    assert [lk.id for lk, _ in lock.stale] == [planted.id]
    assert "gone" in lock.stale[0][1]
    lock.release()
    assert [lk.id for lk in remove_stale(b, NOW)] == [planted.id]


def test_lock_not_refreshed_is_stale_even_from_another_host() -> None:
    b = MemoryBackend()
    old = plant(b, 1, exclusive=True, host="elsewhere", age=timedelta(hours=2))
    fresh = plant(b, 1, exclusive=True, host="elsewhere2", age=timedelta(minutes=1))
    assert stale_reason(old, NOW) is not None
    assert stale_reason(fresh, NOW) is None
    with pytest.raises(RepositoryLocked, match="elsewhere2"):
        acquire(b, "snapshot", clock=clock)
