"""Prune's two phases through the core: what is marked, when it goes, and what it never takes.

Each test drives repositories the way concurrent processes would: several
:class:`Repository` objects on one store, sessions holding real locks, and a
prune that marks and sweeps between their steps.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from vmrepo import marks
from vmrepo.backup import SnapshotOptions, take_snapshot
from vmrepo.config import RepoConfig
from vmrepo.format import PACK_PREFIX, SNAPSHOT_PREFIX, pack_key, snapshot_key
from vmrepo.locks import acquire, vm_scope
from vmrepo.manifest import iter_chunks
from vmrepo.pack import PackBuilder
from vmrepo.prune import PruneOptions, PruneRefused, PruneReport, prune
from vmrepo.repository import Repository
from vmrepo.snapshots import Snapshot
from vmrepo.sources.base import DiskStream, Extent
from vmrepo.storage.local import LocalBackend

from .helpers import MemoryDisk, MemorySource

CS = 64 << 10
T0 = datetime(2024, 5, 1, 12, tzinfo=UTC)


@pytest.fixture
def where(tmp_path: Path) -> Path:
    cfg = RepoConfig.new(chunk_size=CS, pack_size=256 << 10)
    Repository.init(LocalBackend(tmp_path / "repo", create=True), cfg).close()
    return tmp_path / "repo"


def opened(where: Path) -> Repository:
    """The repository as another process would open it."""
    return Repository.open(LocalBackend(where))


def data(seed: int, size: int = 1 << 20) -> bytes:
    return random.Random(seed).randbytes(size)


class PausingDisk(DiskStream):
    """A disk whose second half is sent only after ``pause()`` ran (to act between)."""

    def __init__(self, content: bytes, pause: Callable[[], None]) -> None:
        self.name, self.size, self.mode, self.reason = "d0", len(content), "full", "test"
        self.base_snapshot = None
        self.content, self.pause = content, pause

    def extents(self) -> Iterator[Extent]:
        half = len(self.content) // 2
        yield Extent(0, half, self.content[:half])
        self.pause()
        yield Extent(half, len(self.content) - half, self.content[half:])


def take(repo: Repository, vm: str, content: bytes,
         pause: Callable[[], None] | None = None) -> Snapshot:
    """A snapshot under the VM's lock, as `vmrepo snapshot` takes it."""
    lock = acquire(repo.store, f"snapshot {vm}", scope=vm_scope(vm), exclusive=True)
    try:
        disk: DiskStream = PausingDisk(content, pause) if pause else \
            MemoryDisk("d0", len(content), [Extent(0, len(content), content)])
        return take_snapshot(repo, MemorySource([disk]), SnapshotOptions(vm=vm, workers=2))
    finally:
        lock.release()


def content(repo: Repository, snap: Snapshot) -> bytes:
    m = repo.manifest(snap.disks[0].root)
    return b"".join(repo.read_chunk(cid, m.chunk_length(i))
                    for i, cid in iter_chunks(m, functools.partial(repo.page, m)))


def run_prune(where: Path, *, grace: timedelta = timedelta(), now: datetime | None = None,
              max_unused: float = 0.3, dry_run: bool = False) -> PruneReport:
    repo = opened(where)
    lock = acquire(repo.store, "prune", scope="prune", exclusive=True)
    try:
        return prune(repo, PruneOptions(max_unused=max_unused, grace=grace, dry_run=dry_run,
                                        lock_id=lock.info.id,
                                        clock=(lambda: now) if now else lambda: datetime.now(UTC)))
    finally:
        lock.release()
        repo.close()


def forget(where: Path, snap: Snapshot) -> None:
    (where / snapshot_key(snap.id)).unlink()


def pack_files(where: Path) -> dict[str, int]:
    return {str(p.relative_to(where)): p.stat().st_size for p in (where / "data").glob("*/*")}


def test_marked_data_goes_only_after_the_grace_period(where: Path) -> None:
    repo = opened(where)
    a = take(repo, "vm1", data(1))
    b = take(repo, "vm1", data(2))
    before = pack_files(where)
    forget(where, a)
    first = run_prune(where, grace=timedelta(days=1), now=T0)
    assert first.packs_unused > 0 and first.mark and first.packs_deleted == 0
    assert pack_files(where) == before
    assert [p.id for p in first.pending] == [first.mark]
    assert first.pending[0].due == T0 + timedelta(days=1)
    early = run_prune(where, grace=timedelta(days=1), now=T0 + timedelta(hours=23))
    assert early.packs_deleted == 0 and early.mark is None and pack_files(where) == before
    late = run_prune(where, grace=timedelta(days=1), now=T0 + timedelta(days=1, minutes=1))
    assert late.packs_deleted == first.packs_unused and late.marks_swept == 1
    assert late.bytes_deleted == first.bytes_unused
    after = pack_files(where)
    assert sum(after.values()) == sum(before.values()) - late.bytes_deleted
    assert not list((where / "marks").iterdir())
    assert content(opened(where), b) == data(2)


def test_zero_grace_frees_space_in_one_run_when_nothing_else_runs(where: Path) -> None:
    repo = opened(where)
    a = take(repo, "vm1", data(1))
    take(repo, "vm1", data(2))
    forget(where, a)
    rep = run_prune(where)
    assert rep.packs_deleted == rep.packs_unused > 0 and not rep.pending
    assert run_prune(where).packs_deleted == 0  # nothing left to do


def test_a_session_alive_at_marking_time_delays_the_sweep(where: Path) -> None:
    repo = opened(where)
    a = take(repo, "vm1", data(1))
    forget(where, a)
    session_lock = acquire(repo.store, "snapshot vm2", scope=vm_scope("vm2"), exclusive=True)
    try:
        first = run_prune(where)
        assert first.mark and first.packs_deleted == 0
        assert first.pending[0].waiting_for == [session_lock.info.id]
        again = run_prune(where)
        assert again.packs_deleted == 0 and again.pending
    finally:
        session_lock.release()
    done = run_prune(where)
    assert done.packs_deleted == first.packs_unused and not done.pending


def test_a_snapshot_begun_before_the_mark_keeps_what_it_used(where: Path) -> None:
    """The snapshot deduplicates against packs a concurrent prune condemns; the sweep finds
    its record and spares them."""
    shared = data(7)
    first = opened(where)
    a = take(first, "vm1", shared)
    forget(where, a)
    marked: list[PruneReport] = []
    writer = opened(where)
    b = take(writer, "vm2", shared, pause=lambda: marked.append(run_prune(where)))
    assert marked[0].mark and marked[0].packs_unused > 0 and marked[0].packs_deleted == 0
    assert b.disks[0].stats["chunks_new"] == 0  # it used the condemned packs' blobs
    sweep = run_prune(where)
    assert sweep.marks_swept == 1 and sweep.packs_spared == marked[0].packs_unused
    assert sweep.packs_deleted == 0
    assert content(opened(where), b) == shared
    assert run_prune(where).packs_deleted == 0  # the spared packs are ordinary again


def test_a_snapshot_begun_after_the_mark_stores_condemned_data_again(where: Path) -> None:
    """Same data again after its packs were condemned: stored anew, in packs that cannot be
    confused with the condemned ones even where the bytes are the same."""
    shared = data(8, 200 << 10)  # one pack, written the same way twice
    repo = opened(where)
    a = take(repo, "vm1", shared)
    a_packs = set(pack_files(where))
    forget(where, a)
    mark = run_prune(where, grace=timedelta(days=1), now=T0)
    assert mark.packs_unused == len(a_packs)
    b = take(opened(where), "vm1", shared)
    assert b.disks[0].stats["chunks_new"] == len(shared) // CS + 1
    b_packs = set(pack_files(where)) - a_packs
    assert b_packs and not b_packs & a_packs
    sweep = run_prune(where, grace=timedelta(days=1), now=T0 + timedelta(days=2))
    assert sweep.packs_deleted == len(a_packs) and sweep.packs_spared == 0
    assert set(pack_files(where)) == b_packs
    assert content(opened(where), b) == shared


def test_a_condemned_pack_id_is_never_written_again() -> None:
    from vmrepo.codec import Codec
    from vmrepo.format import BlobType, Hasher

    hasher, codec = Hasher(bytes(32)), Codec(3)

    def build() -> PackBuilder:
        pb = PackBuilder()
        pb.add(b"\x01" * 32, BlobType.CHUNK, b"stored bytes", 12)
        return pb

    plain, _ = build().seal(hasher, codec)
    assert build().seal(hasher, codec)[0] == plain  # packs are content-addressed
    other, parts = build().seal(hasher, codec, avoid={plain})
    assert other != plain and hasher.id_of_parts(parts) == other


def test_orphaned_packs_of_a_killed_snapshot_go(where: Path) -> None:
    repo = opened(where)
    keep = take(repo, "vm1", data(3))
    pb = PackBuilder()
    blob = os.urandom(1000)
    from vmrepo.format import BlobType

    pb.add(repo.hasher.id(blob), BlobType.CHUNK, repo.codec.encode_blob(repo.hasher.id(blob),
                                                                       blob), len(blob))
    pid, parts = pb.seal(repo.hasher, repo.codec)
    repo.store.put_pack(pid, parts)  # stored, but the session died before its segment
    rep = run_prune(where)
    assert rep.packs_orphaned == 1 and rep.packs_deleted == 1
    assert not (where / pack_key(pid)).exists()
    assert content(opened(where), keep) == data(3)


def test_mostly_unused_packs_are_repacked(where: Path) -> None:
    repo = opened(where)
    base = data(4, 2 << 20)
    a = take(repo, "vm1", base)
    changed = bytearray(base)
    for i in range(0, len(changed), 4 * CS):  # one chunk in four differs
        changed[i:i + CS] = os.urandom(CS)
    b = take(repo, "vm1", bytes(changed))
    forget(where, a)
    before = pack_files(where)
    rep = run_prune(where, max_unused=0.1)
    assert rep.packs_repacked > 0 and rep.bytes_rewritten > 0
    assert rep.packs_deleted == rep.packs_repacked + rep.packs_unused
    after = pack_files(where)
    new = {k: v for k, v in after.items() if k not in before}
    assert new and sum(after.values()) == \
        sum(before.values()) - rep.bytes_deleted + sum(new.values())
    assert sum(after.values()) < len(changed) + (64 << 10)  # what b needs, and pack headers
    assert content(opened(where), b) == bytes(changed)
    again = run_prune(where, max_unused=0.1)
    assert again.packs_repacked == 0 and again.bytes_unused_kept == 0


def test_a_dry_run_changes_nothing(where: Path) -> None:
    repo = opened(where)
    a = take(repo, "vm1", data(1))
    take(repo, "vm1", data(2))
    forget(where, a)
    before = sorted(str(p) for p in where.rglob("*"))
    rep = run_prune(where, dry_run=True)
    assert rep.packs_unused > 0 and rep.mark is None
    assert sorted(str(p) for p in where.rglob("*")) == before


def test_prune_refuses_when_a_snapshot_record_is_damaged(where: Path) -> None:
    repo = opened(where)
    a = take(repo, "vm1", data(1))
    take(repo, "vm1", data(2))
    record = where / snapshot_key(a.id)
    record.write_bytes(record.read_bytes()[:-5])
    before = pack_files(where)
    with pytest.raises(PruneRefused, match=f"{SNAPSHOT_PREFIX}{a.id}"):
        run_prune(where)
    assert pack_files(where) == before and not (where / "marks").exists()


def test_an_unarmed_mark_left_by_a_killed_prune_is_armed_and_swept(where: Path) -> None:
    repo = opened(where)
    a = take(repo, "vm1", data(1))
    forget(where, a)
    condemned = [bytes.fromhex(k.split("/")[-1]) for k in pack_files(where)]
    marks.save(repo.store, marks.new_mark(condemned, T0))  # the prune died before arming
    rep = run_prune(where)
    assert rep.marks_swept == 1 and rep.packs_deleted == len(condemned)
    assert not pack_files(where) and not list((where / PACK_PREFIX).glob("*/*"))


def test_a_snapshot_after_a_whole_prune_never_uses_what_it_deleted(where: Path) -> None:
    """A writer that listed the packs and read the index before a prune marked and swept
    (its mark already gone) must see the packs gone, and the segment it writes, the same
    as one the sweep merged away, must count."""
    repo = opened(where)
    a = take(repo, "vm1", data(1, 300 << 10))
    take(repo, "vm1", data(2, 300 << 10))
    writer = opened(where)
    writer.existing_packs()
    assert writer.index.get(a.disks[0].root) is not None
    forget(where, a)
    rep = run_prune(where)
    assert rep.packs_deleted > 0 and rep.segments_written > 0 and not rep.pending
    again = take(writer, "vm3", data(1, 300 << 10))
    assert again.disks[0].stats["chunks_new"] > 0
    reader = opened(where)
    assert content(reader, again) == data(1, 300 << 10)
    assert len(reader.index) > 0 and reader.index.get(again.disks[0].root) is not None


def test_a_dry_run_counts_due_packs_once(where: Path) -> None:
    repo = opened(where)
    a = take(repo, "vm1", data(1))
    take(repo, "vm1", data(2))
    forget(where, a)
    first = run_prune(where, grace=timedelta(days=1), now=T0)
    dry = run_prune(where, grace=timedelta(days=1), now=T0 + timedelta(days=2), dry_run=True)
    assert dry.marks_swept == 1 and dry.packs_deleted == first.packs_unused
    assert dry.packs_unused == 0  # the due mark's packs are not marked a second time
    zero = run_prune(where, grace=timedelta(), dry_run=True)  # still the same mark
    assert zero.packs_deleted == first.packs_unused and zero.packs_unused == 0
