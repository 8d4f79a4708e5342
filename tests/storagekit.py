"""The storage conformance kit: every backend runs all of it.

A backend's test module subclasses :class:`BackendConformance` and provides
a ``backend`` fixture that yields a fresh, empty store; every test here then
runs against it. The guarantees checked are those of
:mod:`vmrepo.storage.base`.
"""

from __future__ import annotations

import os
import threading

import pytest
from vmrepo.storage.base import Backend, ObjectInfo
from vmrepo.storage.errors import InvalidKey, ObjectExists, ObjectNotFound, StorageError


class BackendConformance:
    """Tests every backend must pass; subclasses supply the ``backend`` fixture."""

    def test_put_get_roundtrip(self, backend: Backend) -> None:
        backend.put("data/ab/abcdef", b"hello")
        assert backend.get("data/ab/abcdef") == b"hello"
        assert backend.size("data/ab/abcdef") == 5
        assert backend.exists("data/ab/abcdef")
        info = backend.stat("data/ab/abcdef")
        assert info.key == "data/ab/abcdef" and info.size == 5

    def test_put_replaces_whole_object(self, backend: Backend) -> None:
        backend.put("config", b"x" * 1000)
        before = backend.stat("config")
        backend.put("config", b"short")
        assert backend.get("config") == b"short"
        after = backend.stat("config")
        assert after.size == 5
        if before.etag is not None:
            assert after.etag != before.etag

    def test_ranged_get(self, backend: Backend) -> None:
        backend.put("k", bytes(range(100)))
        assert backend.get("k", 10, 5) == bytes(range(10, 15))
        assert backend.get("k", 95) == bytes(range(95, 100))
        assert backend.get("k", 100, 0) == b""

    def test_range_past_end_is_an_error(self, backend: Backend) -> None:
        backend.put("k", b"abc")
        with pytest.raises(StorageError):
            backend.get("k", 2, 5)

    def test_spans_of_one_object(self, backend: Backend) -> None:
        data = bytes(range(256)) * 4096  # 1 MiB
        backend.put("data/sp", data)
        spans = [(0, 10), (10, 5), (1000, 0), (5000, 70000), ((1 << 20) - 576, 576)]
        assert [bytes(p) for p in backend.get_spans("data/sp", spans)] == \
            [data[o:o + n] for o, n in spans]
        assert list(backend.get_spans("data/sp", [])) == []
        with pytest.raises(StorageError):
            list(backend.get_spans("data/sp", [(0, 1), ((1 << 20) - 10, 20)]))
        with pytest.raises(ObjectNotFound):
            list(backend.get_spans("data/none", [(0, 1)]))
        with pytest.raises(ValueError):
            list(backend.get_spans("data/sp", [(10, 5), (0, 1)]))

    def test_missing_object(self, backend: Backend) -> None:
        with pytest.raises(ObjectNotFound):
            backend.get("nope")
        with pytest.raises(ObjectNotFound):
            backend.get("nope", 0, 10)
        with pytest.raises(ObjectNotFound):
            backend.stat("nope")
        backend.delete("nope")  # idempotent
        assert not backend.exists("nope")

    def test_list_by_prefix_with_sizes(self, backend: Backend) -> None:
        keys = {"data/00/a1", "data/00/a2", "data/ff/b1", "index/c1", "snapshots/d1", "config"}
        for k in keys:
            backend.put(k, k.encode())
        listed = list(backend.list(""))
        assert {i.key for i in listed} == keys
        assert len(listed) == len(keys)
        assert all(isinstance(i, ObjectInfo) and i.size == len(i.key) for i in listed)
        assert {i.key for i in backend.list("data/")} == {"data/00/a1", "data/00/a2",
                                                         "data/ff/b1"}
        assert {i.key for i in backend.list("data/00/")} == {"data/00/a1", "data/00/a2"}
        assert {i.key for i in backend.list("data/00/a1")} == {"data/00/a1"}
        assert {i.key for i in backend.list("index")} == {"index/c1"}
        assert list(backend.list("locks/")) == []

    def test_listing_times_are_plausible(self, backend: Backend) -> None:
        import time

        backend.put("locks/t", b"1")
        (info,) = backend.list("locks/")
        if info.mtime is not None:
            assert abs(info.mtime - time.time()) < 3600

    def test_delete_is_seen_at_once(self, backend: Backend) -> None:
        backend.put("locks/x", b"1")
        backend.delete("locks/x")
        assert list(backend.list("locks/")) == []
        assert not backend.exists("locks/x")

    @pytest.mark.parametrize("key", ["", "/abs", "a//b", "../x", "a/../b", "UPPER", "sp ace",
                                     "a/./b", "x" * 513, "tab\t"])
    def test_invalid_keys_are_refused(self, backend: Backend, key: str) -> None:
        with pytest.raises(InvalidKey):
            backend.put(key, b"")
        with pytest.raises(InvalidKey):
            backend.get(key)
        with pytest.raises(InvalidKey):
            backend.create(key, b"")

    def test_large_object(self, backend: Backend) -> None:
        data = os.urandom(5 << 20)
        backend.put("data/11/big", data)
        assert backend.get("data/11/big") == data
        assert backend.get("data/11/big", 3 << 20, 100) == data[3 << 20 : (3 << 20) + 100]

    def test_put_of_parts_stores_their_concatenation(self, backend: Backend) -> None:
        parts = [b"abc", bytearray(b""), memoryview(b"defg"), os.urandom(70_000)]
        backend.put("data/00/parts", parts)
        assert backend.get("data/00/parts") == b"abcdefg" + bytes(parts[3])
        backend.put("data/00/many", [bytes([i % 256]) for i in range(3000)])
        assert backend.get("data/00/many") == bytes(i % 256 for i in range(3000))

    def test_create_if_absent(self, backend: Backend) -> None:
        backend.create("locks/one", b"first")
        with pytest.raises(ObjectExists):
            backend.create("locks/one", b"second")
        assert backend.get("locks/one") == b"first"
        backend.delete("locks/one")
        backend.create("locks/one", b"third")
        assert backend.get("locks/one") == b"third"

    def test_concurrent_creates_have_one_winner(self, backend: Backend) -> None:
        if not backend.atomic_create:
            pytest.skip("this store has no atomic create-if-absent")
        winners: list[int] = []
        errors: list[BaseException] = []
        start = threading.Barrier(8)

        def racer(i: int) -> None:
            start.wait()
            try:
                backend.create("locks/race", str(i).encode())
                winners.append(i)
            except ObjectExists:
                pass
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(winners) == 1
        assert backend.get("locks/race") == str(winners[0]).encode()

    def test_concurrency_hint(self, backend: Backend) -> None:
        assert isinstance(backend.concurrency, int) and backend.concurrency >= 1
