"""The conformance kit against the local, in-memory and retrying backends, and their specifics."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmrepo.storage.base import Backend, is_valid_key
from vmrepo.storage.errors import (
    BackendUnavailable,
    ObjectNotFound,
    StorageError,
    StorageFull,
    TransientError,
)
from vmrepo.storage.faulty import FaultyBackend
from vmrepo.storage.local import LocalBackend
from vmrepo.storage.memory import MemoryBackend
from vmrepo.storage.retry import RetryingBackend

from .storagekit import BackendConformance


class TestLocal(BackendConformance):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[Backend]:
        b = LocalBackend(tmp_path / "store", create=True)
        yield b
        b.close()


class TestMemory(BackendConformance):
    @pytest.fixture
    def backend(self) -> Iterator[Backend]:
        yield MemoryBackend()


class TestRetryingOverFlakyLocal(BackendConformance):
    """Every other call fails transiently; the retry wrapper must hide all of it."""

    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[Backend]:
        flaky = FaultyBackend(LocalBackend(tmp_path / "store", create=True),
                              {op: "fail,ok" for op in ("put", "create", "get", "stat",
                                                         "list", "delete")},
                              error=TransientError, cycle=True)
        yield RetryingBackend(flaky, sleep=lambda s: None)


# Local-backend specifics: permissions, atomicity leftovers, foreign files.

def test_local_permissions(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "store", create=True)
    b.put("data/aa/obj", b"x")
    b.create("locks/l", b"x")
    assert stat.S_IMODE((tmp_path / "store/data/aa/obj").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "store/locks/l").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "store/data/aa").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "store/data").stat().st_mode) == 0o700


def test_local_packs_leave_the_page_cache_once_durable(tmp_path: Path) -> None:
    """Large objects are dropped from the page cache after their fsync; small ones (read
    again soon) stay."""
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                        text=True, check=True).stdout.strip()
    if fs in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {fs}, whose pages cannot leave memory")
    b = LocalBackend(tmp_path / "store", create=True)
    b.put("data/aa/pack", [os.urandom(3 << 20), os.urandom(1 << 20)])
    b.put("index/seg", os.urandom(64 << 10))

    def resident(key: str) -> int:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                              str(tmp_path / "store" / key)], capture_output=True, text=True,
                             check=True).stdout
        return int(out.split()[0])

    assert resident("data/aa/pack") < (1 << 20)
    assert resident("index/seg") == 64 << 10
    assert b.get("data/aa/pack", 1 << 20, 10) and b.size("data/aa/pack") == 4 << 20


def test_local_packs_are_allocated_before_they_are_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large object's blocks are reserved in one call before its bytes are written
    (beyond its end: the file's size is only ever what was written); a small one's are
    not; the bytes are what was put, whether or not the file system could allocate."""
    from vmrepo.storage import local

    calls: list[tuple[int, int, int, int]] = []
    real = local.fallocate

    def spy(fd: int, mode: int, offset: int, length: int) -> bool:
        calls.append((os.fstat(fd).st_size, mode, offset, length))
        return real(fd, mode, offset, length)

    monkeypatch.setattr(local, "fallocate", spy)
    b = LocalBackend(tmp_path / "store", create=True)
    pack = [os.urandom(3 << 20), os.urandom((1 << 20) + 7)]
    b.put("data/aa/pack", pack)
    b.put("index/seg", os.urandom(64 << 10))
    assert calls == [(0, local.FALLOC_FL_KEEP_SIZE, 0, (4 << 20) + 7)]
    assert b.get("data/aa/pack") == b"".join(pack)
    assert b.size("data/aa/pack") == (4 << 20) + 7
    monkeypatch.setattr(local, "fallocate", lambda *args: False)  # a file system without
    b.put("data/bb/pack", pack)
    assert b.get("data/bb/pack") == b"".join(pack)


def test_local_failed_put_keeps_old_object(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    b = LocalBackend(tmp_path / "store", create=True)
    b.put("data/aa/obj", b"old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StorageFull):
        b.put("data/aa/obj", b"new")
    with pytest.raises(StorageFull):
        b.create("data/aa/other", b"new")
    monkeypatch.undo()
    assert b.get("data/aa/obj") == b"old"
    assert sorted(os.listdir(tmp_path / "store/data/aa")) == ["obj"]


def test_local_ignores_temporary_files_and_shows_foreign_ones(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "store", create=True)
    b.put("index/aa", b"1")
    (tmp_path / "store/index/.tmp-aa.123").write_bytes(b"partial")
    (tmp_path / "store/index/README").write_bytes(b"hello")
    listed = {i.key: i for i in b.list("index/")}
    assert set(listed) == {"index/aa", "index/README"}
    assert not is_valid_key("index/README") and listed["index/README"].size == 5


def test_local_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        LocalBackend(tmp_path / "absent")


def test_faulty_backend_follows_plan() -> None:
    b = FaultyBackend(MemoryBackend(), {"put": "ok,fail,ok"})
    b.put("a", b"1")
    with pytest.raises(StorageError):
        b.put("b", b"2")
    b.put("c", b"3")
    b.put("d", b"4")
    assert sorted(i.key for i in b.list()) == ["a", "c", "d"]
    always = FaultyBackend(MemoryBackend(), {"get": "ok,fail*"}, key_prefix="data/")
    always.put("data/x", b"1")
    always.put("other", b"1")
    assert always.get("data/x") == b"1"
    for _ in range(3):
        with pytest.raises(StorageError):
            always.get("data/x")
    assert always.get("other") == b"1"


# The retry wrapper.

def _retrying(inner: Backend, **kw: object) -> tuple[RetryingBackend, list[float]]:
    delays: list[float] = []
    return RetryingBackend(inner, sleep=delays.append, rand=lambda: 1.0, **kw), delays  # type: ignore[arg-type]


def test_retry_backs_off_exponentially_up_to_a_bound() -> None:
    inner = FaultyBackend(MemoryBackend(), {"put": "fail,fail,fail,fail,fail,ok"},
                          error=TransientError)
    b, delays = _retrying(inner, attempts=8, base_delay=0.1, max_delay=0.5)
    b.put("k", b"v")
    assert b.get("k") == b"v"
    assert delays == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert b.retries == 5


def test_retry_gives_up_after_its_attempts() -> None:
    inner = FaultyBackend(MemoryBackend(), {"get": "fail*"}, error=TransientError)
    inner.put("k", b"v")
    b, delays = _retrying(inner, attempts=3)
    with pytest.raises(TransientError):
        b.get("k")
    assert len(delays) == 2


def test_permanent_errors_are_not_retried() -> None:
    inner = FaultyBackend(MemoryBackend(), {"put": "fail*"}, error=BackendUnavailable)
    b, delays = _retrying(inner)
    with pytest.raises(BackendUnavailable):
        b.put("k", b"v")
    with pytest.raises(ObjectNotFound):
        b.get("absent")
    assert delays == []


class _LostAnswer(MemoryBackend):
    """The first call of an operation takes effect, but its answer is lost."""

    def __init__(self, ops: set[str]) -> None:
        super().__init__()
        self.ops = ops

    def create(self, key: str, data: object) -> None:  # type: ignore[override]
        super().create(key, data)  # type: ignore[arg-type]
        if "create" in self.ops:
            self.ops.discard("create")
            raise TransientError("connection reset after the write", key=key)


def test_retry_settles_a_create_whose_answer_was_lost() -> None:
    b, _ = _retrying(_LostAnswer({"create"}))
    b.create("locks/mine", b"me")  # our own first attempt is recognised
    assert b.get("locks/mine") == b"me"
    b.delete("locks/mine")
    assert not b.exists("locks/mine")


def test_retry_create_does_not_claim_someone_elses_object() -> None:
    inner = _LostAnswer(set())
    inner.put("locks/theirs", b"them")
    flaky = FaultyBackend(inner, {"create": "fail,ok"}, error=TransientError)
    b, _ = _retrying(flaky)
    from vmrepo.storage.errors import ObjectExists

    with pytest.raises(ObjectExists):
        b.create("locks/theirs", b"me")


def test_retry_restarts_a_broken_listing_without_repeats() -> None:
    class BreaksOnce(MemoryBackend):
        broke = False

        def list(self, prefix: str = ""):  # type: ignore[no-untyped-def]
            for n, info in enumerate(super().list(prefix)):
                if n == 2 and not self.broke:
                    self.broke = True
                    raise TransientError("connection reset mid-listing")
                yield info

    inner = BreaksOnce()
    for i in range(6):
        inner.put(f"index/{i}", b"x")
    b, delays = _retrying(inner)
    keys = [i.key for i in b.list("index/")]
    assert sorted(keys) == [f"index/{i}" for i in range(6)] and len(delays) == 1


def test_retry_resumes_broken_spans_at_the_first_one_not_given() -> None:
    class BreaksMidway(MemoryBackend):
        asked: list[list[tuple[int, int]]] = []

        def get_spans(self, key, spans):  # type: ignore[no-untyped-def]
            self.asked.append(list(spans))
            for n, piece in enumerate(super().get_spans(key, spans)):
                if n == 2 and len(self.asked) == 1:
                    raise TransientError("connection reset mid-body")
                yield piece

    inner = BreaksMidway()
    data = bytes(range(256)) * 16
    inner.put("data/p", data)
    spans = [(0, 10), (20, 30), (100, 1), (200, 300), (4000, 96)]
    b, delays = _retrying(inner)
    assert [bytes(p) for p in b.get_spans("data/p", spans)] == [data[o:o + n] for o, n in spans]
    # Asked again only for what it had not given; one retry, two requests counted.
    assert inner.asked == [spans, spans[2:]] and len(delays) == 1
    assert b.requests["get"] == 2
