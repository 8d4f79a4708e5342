"""The conformance suite every storage backend must pass."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmrepo.storage.base import Backend
from vmrepo.storage.errors import InvalidKey, ObjectNotFound, StorageError, StorageFull
from vmrepo.storage.faulty import FaultyBackend
from vmrepo.storage.local import LocalBackend
from vmrepo.storage.memory import MemoryBackend


@pytest.fixture(params=["local", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        b: Backend = LocalBackend(tmp_path / "store", create=True)
    else:
        b = MemoryBackend()
    yield b
    b.close()


def test_put_get_roundtrip(backend: Backend) -> None:
    backend.put("data/ab/abcdef", b"hello")
    assert backend.get("data/ab/abcdef") == b"hello"
    assert backend.size("data/ab/abcdef") == 5
    assert backend.exists("data/ab/abcdef")


def test_put_replaces_whole_object(backend: Backend) -> None:
    backend.put("config", b"x" * 1000)
    backend.put("config", b"short")
    assert backend.get("config") == b"short"


def test_ranged_get(backend: Backend) -> None:
    backend.put("k", bytes(range(100)))
    assert backend.get("k", 10, 5) == bytes(range(10, 15))
    assert backend.get("k", 95) == bytes(range(95, 100))
    assert backend.get("k", 100, 0) == b""


def test_range_past_end_is_an_error(backend: Backend) -> None:
    backend.put("k", b"abc")
    with pytest.raises(StorageError):
        backend.get("k", 2, 5)


def test_missing_object(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        backend.get("nope")
    with pytest.raises(ObjectNotFound):
        backend.size("nope")
    with pytest.raises(ObjectNotFound):
        backend.delete("nope")
    assert not backend.exists("nope")


def test_list_by_prefix(backend: Backend) -> None:
    keys = {"data/00/a1", "data/00/a2", "data/ff/b1", "index/c1", "snapshots/d1", "config"}
    for k in keys:
        backend.put(k, k.encode())
    assert set(backend.list("")) == keys
    assert set(backend.list("data/")) == {"data/00/a1", "data/00/a2", "data/ff/b1"}
    assert set(backend.list("data/00/")) == {"data/00/a1", "data/00/a2"}
    assert set(backend.list("data/00/a1")) == {"data/00/a1"}
    assert set(backend.list("index")) == {"index/c1"}
    assert list(backend.list("locks/")) == []


def test_delete_is_seen_at_once(backend: Backend) -> None:
    backend.put("locks/x", b"1")
    backend.delete("locks/x")
    assert list(backend.list("locks/")) == []
    assert not backend.exists("locks/x")


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "../x", "a/../b", "UPPER", "sp ace",
                                 "a/./b", "x" * 513, "tab\t"])
def test_invalid_keys_are_refused(backend: Backend, key: str) -> None:
    with pytest.raises(InvalidKey):
        backend.put(key, b"")
    with pytest.raises(InvalidKey):
        backend.get(key)


def test_large_object(backend: Backend) -> None:
    data = os.urandom(5 << 20)
    backend.put("data/11/big", data)
    assert backend.get("data/11/big") == data
    assert backend.get("data/11/big", 3 << 20, 100) == data[3 << 20 : (3 << 20) + 100]


# Local-backend specifics: permissions and atomicity leftovers.

def test_local_permissions(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "store", create=True)
    b.put("data/aa/obj", b"x")
    assert stat.S_IMODE((tmp_path / "store/data/aa/obj").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "store/data/aa").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "store/data").stat().st_mode) == 0o700


def test_local_failed_put_keeps_old_object(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    b = LocalBackend(tmp_path / "store", create=True)
    b.put("data/aa/obj", b"old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StorageFull):
        b.put("data/aa/obj", b"new")
    monkeypatch.undo()
    assert b.get("data/aa/obj") == b"old"
    assert sorted(os.listdir(tmp_path / "store/data/aa")) == ["obj"]


def test_local_ignores_temporary_files(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "store", create=True)
    b.put("index/aa", b"1")
    (tmp_path / "store/index/.tmp-aa.123").write_bytes(b"partial")
    assert list(b.list("index/")) == ["index/aa"]


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
    assert sorted(b.list()) == ["a", "c", "d"]
    always = FaultyBackend(MemoryBackend(), {"get": "ok,fail*"}, key_prefix="data/")
    always.put("data/x", b"1")
    always.put("other", b"1")
    assert always.get("data/x") == b"1"
    for _ in range(3):
        with pytest.raises(StorageError):
            always.get("data/x")
    assert always.get("other") == b"1"


def test_put_of_parts_stores_their_concatenation(backend: Backend) -> None:
    parts = [b"abc", bytearray(b""), memoryview(b"defg"), os.urandom(70_000)]
    backend.put("data/00/parts", parts)
    assert backend.get("data/00/parts") == b"abcdefg" + bytes(parts[3])
    backend.put("data/00/many", [bytes([i % 256]) for i in range(3000)])
    assert backend.get("data/00/many") == bytes(i % 256 for i in range(3000))
