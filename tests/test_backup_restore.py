"""Snapshots and restores through the library, on in-memory and local repositories."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmrepo import output, restore
from vmrepo.backup import SnapshotOptions, take_snapshot
from vmrepo.config import RepoConfig
from vmrepo.errors import ExtentError, IntegrityError
from vmrepo.format import ZERO_ID
from vmrepo.manifest import iter_chunks
from vmrepo.repository import Repository
from vmrepo.restore import changed_chunks, restore_raw
from vmrepo.snapshots import Snapshot
from vmrepo.sources import readorder
from vmrepo.sources.base import Extent
from vmrepo.sources.errors import SourceError
from vmrepo.sources.file import FileSource
from vmrepo.storage.faulty import FaultyBackend
from vmrepo.storage.memory import MemoryBackend

from .helpers import MemoryDisk, MemorySource, text_like

CS = 64 << 10


def snapshot_file(repo: Repository, path: Path, vm: str = "vm1") -> Snapshot:
    src = FileSource(vm, {"disk0": str(path)})
    return take_snapshot(repo, src, SnapshotOptions(vm=vm, workers=2))


def restored(repo: Repository, snap: Snapshot, out: Path, disk: str = "disk0") -> bytes:
    rec = snap.disk(disk)
    assert rec is not None
    restore_raw(repo, rec, out, force=True)
    return out.read_bytes()


@st.composite
def images(draw: st.DrawFn) -> tuple[int, list[tuple[str, int, int]]]:
    """Layouts of holes, zero runs, random data, text and repeated blocks."""
    seed = draw(st.integers(0, 2**32))
    runs = draw(st.lists(st.tuples(st.sampled_from(["hole", "zero", "random", "text", "repeat"]),
                                   st.integers(1, 3 * CS)), min_size=1, max_size=8))
    return seed, runs


def build_image(path: Path, seed: int, runs: list[tuple[str, int]]) -> bytes:
    rnd = random.Random(seed)
    repeated = rnd.randbytes(CS)
    size = sum(n for _, n in runs)
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        for kind, n in runs:
            f.seek(pos)
            if kind == "zero":
                f.write(bytes(n))
            elif kind == "random":
                f.write(rnd.randbytes(n))
            elif kind == "text":
                f.write(text_like(rnd, n))
            elif kind == "repeat":
                f.write((repeated * (n // CS + 1))[:n])
            pos += n
    return path.read_bytes()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(images(), st.sampled_from([CS, 2 * CS, readorder.TURN]))
def test_restore_is_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   case: tuple[int, list], turn: int) -> None:
    seed, runs = case
    monkeypatch.setattr(readorder, "TURN", turn)  # small turns: both halves read in turns
    repo = Repository.init(MemoryBackend(), RepoConfig.new(chunk_size=CS, pack_size=256 << 10))
    image = build_image(tmp_path / f"img{seed}", seed, runs)
    snap = snapshot_file(repo, tmp_path / f"img{seed}")
    assert restored(repo, snap, tmp_path / f"out{seed}") == image
    # A reopened repository (index from its segments) restores the same bytes.
    again = Repository.open(repo.backend)
    assert restored(again, snap, tmp_path / f"out{seed}") == image


def test_second_snapshot_stores_only_new_chunks_and_pages(mem_repo: Repository,
                                                          tmp_path: Path) -> None:
    rnd = random.Random(7)
    img = tmp_path / "disk.raw"
    size = 2000 * CS + 123  # 4 pages of 512 chunks, the last short; a partial last chunk
    with open(img, "wb") as f:
        f.write(rnd.randbytes(size))
    first = snapshot_file(mem_repo, img)
    changed = sorted(rnd.sample(range(2000), 5))
    with open(img, "r+b") as f:
        for c in changed:
            f.seek(c * CS + 100)
            f.write(rnd.randbytes(4096))
    second = snapshot_file(mem_repo, img)
    s = second.disks[0].stats
    assert s["chunks_new"] == len(changed)
    assert s["bytes_new"] == len(changed) * CS
    assert s["pages_new"] == len({c // 512 for c in changed})
    assert restored(mem_repo, second, tmp_path / "o") == img.read_bytes()
    m1 = mem_repo.manifest(first.disks[0].root)
    m2 = mem_repo.manifest(second.disks[0].root)
    assert [i for i, _ in changed_chunks(mem_repo, m2, m1)] == changed


def test_zero_chunks_are_not_stored(mem_repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "zeros.raw"
    with open(img, "wb") as f:
        f.write(bytes(10 * CS))  # written zeros, not holes
        f.truncate(40 * CS)
    snap = snapshot_file(mem_repo, img)
    s = snap.disks[0].stats
    assert s["chunks_zero"] == 40 and s["chunks_new"] == 0
    m = mem_repo.manifest(snap.disks[0].root)
    ids = [cid for _, cid in iter_chunks(m, lambda n: mem_repo.page(m, n))]
    assert ids == [ZERO_ID] * 40
    assert s["bytes_data"] == 10 * CS  # holes were not read


def test_changes_pass_takes_gaps_from_base(mem_repo: Repository, tmp_path: Path) -> None:
    size = 10 * CS + 500
    base = bytearray(os.urandom(size))
    src = MemorySource([MemoryDisk("d", size, [Extent(0, size, bytes(base))])])
    first = take_snapshot(mem_repo, src, SnapshotOptions(vm="vm"))
    assert src.finished == [True]
    # Changes: one piece inside chunk 2, zeros over chunk 5, a piece of the short last chunk.
    expected = bytearray(base)
    expected[2 * CS + 10 : 2 * CS + 20] = b"x" * 10
    expected[5 * CS : 6 * CS] = bytes(CS)
    expected[10 * CS + 1 : 10 * CS + 3] = b"yz"
    changes = [Extent(2 * CS + 10, 10, b"x" * 10), Extent(5 * CS, CS, None),
               Extent(10 * CS + 1, 2, b"yz")]
    src2 = MemorySource([MemoryDisk("d", size, changes, mode="changes", base=first.id)])
    second = take_snapshot(mem_repo, src2, SnapshotOptions(vm="vm"))
    assert second.disks[0].taken == "incremental" and second.disks[0].base == first.id
    assert restored(mem_repo, second, tmp_path / "o", "d") == bytes(expected)
    assert src2.context is not None and src2.context.history["d"][0].snapshot_id == first.id


@pytest.mark.parametrize("fail_on", ["data/", "index/", "snapshots/"])
def test_failed_write_leaves_no_snapshot(tmp_path: Path, fail_on: str) -> None:
    inner = MemoryBackend()
    Repository.init(inner, RepoConfig.new(chunk_size=CS, pack_size=256 << 10))
    faulty = FaultyBackend(inner, {"put": "fail*"}, key_prefix=fail_on)
    repo = Repository.open(faulty)
    img = tmp_path / "d.raw"
    img.write_bytes(os.urandom(40 * CS))
    src = FileSource("vm1", {"disk0": str(img)})
    with pytest.raises(Exception, match="injected fault"):
        take_snapshot(repo, src, SnapshotOptions(vm="vm1"))
    assert list(inner.list("snapshots/")) == []
    # The repository stays usable: the next snapshot succeeds and restores.
    healthy = Repository.open(inner)
    snap = snapshot_file(healthy, img)
    assert restored(healthy, snap, tmp_path / "o") == img.read_bytes()


def test_source_is_rolled_back_on_failure(mem_repo: Repository) -> None:
    src = MemorySource([MemoryDisk("d", CS, [Extent(0, 2 * CS, None)])])  # outside the disk
    with pytest.raises(ExtentError, match="outside disk"):
        take_snapshot(mem_repo, src, SnapshotOptions(vm="vm"))
    assert src.finished == [False]
    assert mem_repo.snapshots() == []


def test_a_failed_rollback_is_reported_and_the_first_error_raised(
        mem_repo: Repository, caplog: pytest.LogCaptureFixture) -> None:
    """What the source could not undo (a bitmap left in an image) is the operator's to clean
    up: it is said as a warning, and the error that stopped the snapshot is the one raised."""

    class StuckSource(MemorySource):
        def finish(self, committed: bool) -> None:
            super().finish(committed)
            raise SourceError("rolling back: clean-up failed: bitmap b1 stays in the image")

    src = StuckSource([MemoryDisk("d", CS, [Extent(0, 2 * CS, None)])])
    with caplog.at_level(logging.WARNING), pytest.raises(ExtentError, match="outside disk"):
        take_snapshot(mem_repo, src, SnapshotOptions(vm="vm"))
    assert src.finished == [False]
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "rolling back: clean-up failed: bitmap b1 stays in the image")]
    assert mem_repo.snapshots() == []


def test_corrupted_chunk_is_detected(local_repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(os.urandom(4 * CS))
    snap = snapshot_file(local_repo, img)
    for key in (i.key for i in local_repo.backend.list("data/")):
        path = Path(local_repo.backend.location) / key
        raw = bytearray(path.read_bytes())
        raw[100] ^= 0xFF
        path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        restored(Repository.open(local_repo.backend), snap, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_restore_reserves_its_data_ranges_before_writing_them(
        mem_repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the ranges of data chunks are allocated ahead (holes stay holes), each before
    any of its chunks is written, in groups of RESERVE_CHUNKS; the bytes are the image's."""
    img = tmp_path / "disk.raw"
    rnd = random.Random(7)
    with open(img, "wb") as f:
        f.truncate(50 * CS + 1000)
        for first, count in ((0, 3), (5, 1), (6, 4), (20, 12), (49, 2)):
            f.seek(first * CS)
            f.write(rnd.randbytes(min(count * CS, 50 * CS + 1000 - first * CS)))
    data = {0, 1, 2, 5, 6, 7, 8, 9} | set(range(20, 32)) | {49, 50}
    snap = snapshot_file(mem_repo, img)
    events: list[tuple[str, int, int]] = []
    real_reserve, real_write = output.FileTarget.reserve, output.FileTarget.write

    def reserve(self: output.FileTarget, offset: int, length: int) -> None:
        events.append(("reserve", offset, offset + length))
        real_reserve(self, offset, length)

    def write(self: output.FileTarget, offset: int, chunk: bytes) -> None:
        events.append(("write", offset, offset + len(chunk)))
        real_write(self, offset, chunk)

    monkeypatch.setattr(output.FileTarget, "reserve", reserve)
    monkeypatch.setattr(output.FileTarget, "write", write)
    monkeypatch.setattr(restore, "RESERVE_CHUNKS", 8)  # groups end inside data runs too
    assert restored(mem_repo, snap, tmp_path / "out.raw") == img.read_bytes()
    reserved = [(a, b) for kind, a, b in events if kind == "reserve"]
    covered = {i for a, b in reserved for i in range(a // CS, -(-b // CS))}
    assert covered == data
    assert reserved == [(0, 3 * CS), (5 * CS, 8 * CS), (8 * CS, 10 * CS), (20 * CS, 24 * CS),
                        (24 * CS, 32 * CS), (49 * CS, 50 * CS + 1000)]
    for n, (kind, a, b) in enumerate(events):
        if kind == "write":
            assert any(ra <= a and b <= rb for k, ra, rb in events[:n] if k == "reserve")
    blocks = os.stat(tmp_path / "out.raw").st_blocks * 512
    assert blocks <= len(data) * CS + 64 * 1024  # what is not data stayed a hole
