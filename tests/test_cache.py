"""The local cache: a remote repository's immutable objects are read once."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from vmrepo.backup import SnapshotOptions, take_snapshot
from vmrepo.config import RepoConfig
from vmrepo.repository import Repository
from vmrepo.restore import restore_raw
from vmrepo.sources.file import FileSource
from vmrepo.storage.base import BackendWrapper
from vmrepo.storage.local import LocalBackend

CS = 64 << 10


class RemoteLike(BackendWrapper):
    """A local store presented as remote, counting reads by key prefix."""

    def __init__(self, root: Path) -> None:
        super().__init__(LocalBackend(root, create=True))
        self.local = False
        self.gets: Counter[str] = Counter()

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        self.gets[key.split("/")[0]] += 1
        return self.inner.get(key, offset, length)


def test_second_commands_read_no_record_or_segment_again(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(os.urandom(20 * CS) + bytes(10 * CS))
    backend = RemoteLike(tmp_path / "repo")
    repo = Repository.init(backend, RepoConfig.new(chunk_size=CS, pack_size=4 * CS))
    for _ in range(3):
        take_snapshot(repo, FileSource("vm", {"disk0": str(img)}), SnapshotOptions(vm="vm"))
    # A new process: reads the records and segments it has not seen (the cache has the ones
    # its own writes put there).
    backend.gets.clear()
    first = Repository.open(backend)
    snaps = first.snapshots()
    assert len(snaps) == 3
    first.index  # noqa: B018 - syncs the index
    backend.gets.clear()
    second = Repository.open(backend)
    assert [s.id for s in second.snapshots()] == [s.id for s in snaps]
    assert len(second.index) > 0
    assert backend.gets["snapshots"] == 0 and backend.gets["index"] == 0
    # Manifest pages and roots come from the cache too: a restore reads only chunks.
    out = tmp_path / "o.raw"
    restore_raw(second, snaps[-1].disks[0], out)
    before = backend.gets["data"]
    third = Repository.open(backend)
    restore_raw(third, snaps[-1].disks[0], out, force=True)
    data_requests = backend.gets["data"] - before
    assert out.read_bytes() == img.read_bytes()
    assert data_requests <= 6, data_requests  # chunk ranges only: few coalesced requests


def test_a_replaced_record_is_read_again(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(os.urandom(4 * CS))
    backend = RemoteLike(tmp_path / "repo")
    repo = Repository.init(backend, RepoConfig.new(chunk_size=CS, pack_size=4 * CS))
    snap = take_snapshot(repo, FileSource("vm", {"disk0": str(img)}), SnapshotOptions(vm="vm"))
    assert Repository.open(backend).snapshots()[0].tags == []
    from vmrepo.snapshots import save_snapshot

    snap.tags = ["kept"]
    save_snapshot(repo.store, snap)
    assert Repository.open(backend).snapshots()[0].tags == ["kept"]


def test_the_cache_directories_are_private(tmp_path: Path) -> None:
    """The cache (``XDG_CACHE_HOME/vmrepo`` here) is made 0700, whatever the umask, and so
    is each repository's directory in it; a directory that exists is left as it is."""
    from vmrepo.cache import Cache

    old = os.umask(0o022)
    try:
        cache = Cache.open("ab" * 16, {"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    finally:
        os.umask(old)
    assert cache.root == tmp_path / "xdg" / "vmrepo" / ("ab" * 16)
    for path in (tmp_path / "xdg" / "vmrepo", cache.root):
        assert path.stat().st_mode & 0o777 == 0o700, path
