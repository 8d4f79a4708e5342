"""Locks: scopes, shared and exclusive, stale and corrupt ones never block, refresh failures."""

from __future__ import annotations

import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from vmrepo.codec import Codec
from vmrepo.errors import LockLost, RepositoryLocked
from vmrepo.format import Hasher, lock_key
from vmrepo.locks import (
    REPOSITORY,
    STALE_AFTER,
    STOP_AFTER,
    LockInfo,
    acquire,
    alive_ids,
    conflicts,
    list_locks,
    remove_stale,
    stale_reason,
    vm_scope,
)
from vmrepo.storage.errors import BackendUnavailable
from vmrepo.storage.faulty import FaultyBackend
from vmrepo.storage.local import LocalBackend
from vmrepo.storage.memory import MemoryBackend
from vmrepo.store import RepoStore

from .helpers import plant_lock

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def clock() -> datetime:
    return NOW


def store(backend: MemoryBackend | FaultyBackend | None = None) -> RepoStore:
    return RepoStore(backend or MemoryBackend(), Codec(), Hasher(b"k" * 32))


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def plant(s: RepoStore, pid: int, exclusive: bool, host: str | None = None,
          age: timedelta = timedelta(), scope: str = REPOSITORY) -> LockInfo:
    return plant_lock(s, pid, exclusive, host=host, when=NOW - age, scope=scope)


def test_shared_locks_coexist_and_release() -> None:
    s = store()
    a1 = acquire(s, "restore", clock=clock)
    a2 = acquire(s, "restore", clock=clock)
    assert len(list_locks(s)[0]) == 2
    a1.release()
    a2.release()
    assert list_locks(s) == ([], [])


def test_exclusive_excludes_and_is_excluded() -> None:
    s = store()
    shared = acquire(s, "restore", clock=clock)
    with pytest.raises(RepositoryLocked, match="shared lock"):
        acquire(s, "upgrade", exclusive=True, clock=clock)
    shared.release()
    ex = acquire(s, "upgrade", exclusive=True, clock=clock)
    with pytest.raises(RepositoryLocked, match=f"pid {os.getpid()}"):
        acquire(s, "restore", clock=clock)
    ex.release()
    assert list_locks(s) == ([], [])  # the refused attempts left nothing


def test_vm_scopes_exclude_only_the_same_vm() -> None:
    s = store()
    a = acquire(s, "snapshot a", scope=vm_scope("a"), exclusive=True, clock=clock)
    b = acquire(s, "snapshot b", scope=vm_scope("b"), exclusive=True, clock=clock)
    r = acquire(s, "restore a", clock=clock)
    with pytest.raises(RepositoryLocked, match="of vm:a"):
        acquire(s, "snapshot a", scope=vm_scope("a"), exclusive=True, clock=clock)
    with pytest.raises(RepositoryLocked):
        acquire(s, "upgrade", exclusive=True, clock=clock)
    for lk in (a, b, r):
        lk.release()
    (held, _) = list_locks(s)
    assert held == []


@pytest.mark.parametrize(("a", "b", "expected"), [
    ((REPOSITORY, False), (REPOSITORY, False), False),
    ((REPOSITORY, True), (REPOSITORY, False), True),
    ((REPOSITORY, True), ("vm:x", True), True),
    (("vm:x", True), ("vm:x", True), True),
    (("vm:x", True), ("vm:y", True), False),
    (("vm:x", True), (REPOSITORY, False), False),
    (("vm:x", False), ("vm:x", True), False),
])
def test_conflict_table(a: tuple[str, bool], b: tuple[str, bool], expected: bool) -> None:
    la = LockInfo("a", "h", 1, "op", a[1], NOW, NOW, a[0])
    lb = LockInfo("b", "h", 1, "op", b[1], NOW, NOW, b[0])
    assert conflicts(la, lb) is expected and conflicts(lb, la) is expected


def test_lock_of_a_dead_process_is_stale_and_reported() -> None:
    s = store()
    planted = plant(s, dead_pid(), exclusive=True)
    lock = acquire(s, "restore", clock=clock)
    assert [lk.id for lk, _ in lock.stale] == [planted.id]
    assert "gone" in lock.stale[0][1]
    lock.release()
    assert [lk.id for lk in remove_stale(s, NOW)[0]] == [planted.id]


def test_lock_not_refreshed_is_stale_even_from_another_host() -> None:
    s = store()
    old = plant(s, 1, exclusive=True, host="elsewhere", age=timedelta(hours=2))
    fresh = plant(s, 1, exclusive=True, host="elsewhere2", age=timedelta(minutes=1))
    assert stale_reason(old, NOW) is not None
    assert stale_reason(fresh, NOW) is None
    with pytest.raises(RepositoryLocked, match="elsewhere2"):
        acquire(s, "restore", clock=clock)


def test_junk_in_locks_is_a_corrupt_lock_that_never_blocks_and_unlock_removes() -> None:
    backend = MemoryBackend()
    s = store(backend)
    backend.put("locks/junk", b"\x00this is not msgpack\xc1")
    backend.put("locks/empty", b"")
    lock = acquire(s, "upgrade", exclusive=True, clock=clock)
    assert sorted(b.id for b in lock.corrupt) == ["empty", "junk"]
    lock.release()
    removed, corrupt = remove_stale(s, NOW)
    assert removed == [] and sorted(b.id for b in corrupt) == ["empty", "junk"]
    assert list(backend.list("locks/")) == []


def test_a_failed_refresh_loses_the_lock() -> None:
    inner = MemoryBackend()
    faulty = FaultyBackend(inner, {"put": "fail*"}, key_prefix="locks/",
                           error=BackendUnavailable)
    s = store(faulty)  # type: ignore[arg-type]
    lock = acquire(s, "snapshot", scope=vm_scope("a"), exclusive=True, refresh_every=0.05)
    deadline = time.monotonic() + 5
    while lock.lost is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(LockLost, match="could not refresh"):
        lock.check()
    lock.release()


def test_a_lock_not_refreshed_in_time_is_lost() -> None:
    now = [NOW]
    lock = acquire(store(), "snapshot", clock=lambda: now[0], refresh_every=3600)
    lock.check()
    now[0] = NOW + timedelta(hours=1)
    with pytest.raises(LockLost, match="in time"):
        lock.check()
    lock.release()


def test_a_suspended_holder_never_revives_its_lock() -> None:
    s = store()
    lock = acquire(s, "snapshot", refresh_every=0.05)
    before = list_locks(s)[0][0].refreshed
    lock._written -= STOP_AFTER.total_seconds() + 1  # as if the process had been stopped
    deadline = time.monotonic() + 5
    while lock.lost is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(LockLost, match="in time"):
        lock.check()
    assert list_locks(s)[0][0].refreshed == before  # not rewritten after the pause
    lock.release()


def test_liveness_follows_the_store_clock_not_the_hosts(tmp_path: Path) -> None:
    s = RepoStore(LocalBackend(tmp_path / "repo", create=True), Codec(), Hasher(b"k" * 32))
    behind = acquire(s, "snapshot vm1", scope=vm_scope("vm1"), exclusive=True,
                     clock=lambda: datetime.now(UTC) - timedelta(hours=2))  # a slow clock
    ahead = acquire(s, "snapshot vm2", scope=vm_scope("vm2"), exclusive=True,
                    clock=lambda: datetime.now(UTC) + timedelta(hours=2))  # a fast clock
    own = acquire(s, "prune", scope="prune", exclusive=True)
    # Written moments ago by the store's clock: alive, whatever their own times say.
    assert alive_ids(s, own.info.id, datetime.now(UTC)) == {behind.info.id, ahead.info.id}
    old = time.time() - STALE_AFTER.total_seconds() - 60  # not rewritten for 31 minutes
    os.utime(tmp_path / "repo" / lock_key(ahead.info.id), (old, old))
    assert alive_ids(s, own.info.id, datetime.now(UTC)) == {behind.info.id}
    for lk in (behind, ahead, own):
        lk.release()
