"""Write sessions: failed ones leak nothing, killed ones leave reusable packs, lost locks stop."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmrepo.backup import SnapshotOptions, take_snapshot
from vmrepo.config import RepoConfig
from vmrepo.errors import LockLost
from vmrepo.locks import acquire, vm_scope
from vmrepo.repository import Repository
from vmrepo.restore import restore_raw
from vmrepo.sources.base import DiskStream, Extent
from vmrepo.sources.file import FileSource
from vmrepo.storage.base import BackendWrapper, Payload
from vmrepo.storage.errors import BackendUnavailable
from vmrepo.storage.faulty import FaultyBackend
from vmrepo.storage.local import LocalBackend

from .helpers import MemorySource, pack_count, random_image_vm, run_cli, run_json, signal_when

CS = 64 << 10


class Switchable(BackendWrapper):
    """Fails puts under ``prefix`` while ``broken`` is set."""

    def __init__(self, inner: LocalBackend, prefix: str) -> None:
        super().__init__(inner)
        self.prefix = prefix
        self.broken = False

    def put(self, key: str, data: Payload) -> None:
        if self.broken and key.startswith(self.prefix):
            raise BackendUnavailable(f"injected: {key}", key=key)
        self.inner.put(key, data)


def test_repository_reused_after_a_failed_session_commits_only_restorable_snapshots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(os.urandom(40 * CS))
    backend = Switchable(LocalBackend(tmp_path / "repo", create=True), "index/")
    repo = Repository.init(backend, RepoConfig.new(chunk_size=CS, pack_size=4 * CS))
    backend.broken = True  # packs are stored, their index segments are not
    with pytest.raises(BackendUnavailable):
        take_snapshot(repo, FileSource("vm", {"disk0": str(img)}), SnapshotOptions(vm="vm"))
    assert len(list((tmp_path / "repo/data").rglob("*"))) > 5
    backend.broken = False
    snap = take_snapshot(repo, FileSource("vm", {"disk0": str(img)}), SnapshotOptions(vm="vm"))
    assert snap.disks[0].stats["chunks_new"] == 40  # nothing unindexed was reused
    # As a fresh process would (its own cache, the index read from the repository):
    monkeypatch.setenv("VMREPO_CACHE_DIR", str(tmp_path / "other-cache"))
    out = tmp_path / "out.raw"
    restore_raw(Repository.open(LocalBackend(tmp_path / "repo")), snap.disks[0], out)
    assert out.read_bytes() == img.read_bytes()


def test_long_sessions_index_their_packs_as_they_go(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(os.urandom(64 * CS))
    backend = LocalBackend(tmp_path / "repo", create=True)
    repo = Repository.init(backend, RepoConfig.new(chunk_size=CS, pack_size=2 * CS))
    session = repo.session(flush_packs=3)
    from vmrepo.format import BlobType

    data = img.read_bytes()
    for i in range(0, len(data), CS):
        chunk = data[i : i + CS]
        session.add(repo.hasher.id(chunk), BlobType.CHUNK, chunk)
    session.commit()
    assert session.stats.segments >= 8
    assert len(list(backend.list("index/"))) == session.stats.segments


def test_sigkill_at_60_percent_then_rerun_stores_less_than_half(tmp_path: Path) -> None:
    mib = 128
    big = random_image_vm(tmp_path, mib)
    signal_when(["snapshot", "vm1"], tmp_path,
                lambda: pack_count(tmp_path / "repo") >= mib * 6 // 10, signal.SIGKILL)
    assert run_json("snapshots", cwd=tmp_path)["snapshots"] == []
    second = run_json("snapshot", "vm1", cwd=tmp_path)
    stored = second["totals"]["bytes_stored"]
    assert stored < big.stat().st_size / 2, f"re-run stored {stored} bytes"
    out = tmp_path / "out.raw"
    run_cli("restore", "vm1@latest", "--disk", "disk0", "-o", str(out), cwd=tmp_path)
    assert subprocess.run(["cmp", str(out), str(big)]).returncode == 0


class SlowDisk(DiskStream):
    def __init__(self, chunks: int) -> None:
        self.name, self.size, self.mode, self.reason = "d", chunks * CS, "full", "test"
        self.base_snapshot = None
        self.chunks = chunks

    def extents(self) -> Iterator[Extent]:
        for i in range(self.chunks):
            time.sleep(0.02)
            yield Extent(i * CS, CS, os.urandom(CS))


def test_a_lock_whose_refresh_fails_aborts_its_snapshot(tmp_path: Path) -> None:
    inner = LocalBackend(tmp_path / "repo", create=True)
    Repository.init(inner, RepoConfig.new(chunk_size=CS, pack_size=4 * CS))
    faulty = FaultyBackend(inner, {"put": "fail*"}, key_prefix="locks/")
    repo = Repository.open(faulty)
    lock = acquire(repo.store, "snapshot vm", scope=vm_scope("vm"), exclusive=True,
                   refresh_every=0.1)
    src = MemorySource([SlowDisk(200)])
    try:
        with pytest.raises(LockLost, match="could not refresh"):
            take_snapshot(repo, src, SnapshotOptions(vm="vm", check=lock.check))
    finally:
        lock.release()
    assert src.finished == [False]
    assert repo.snapshots() == []
