"""The read planner: few requests, every blob checked, other copies used when one is bad."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from vmrepo.config import RepoConfig
from vmrepo.errors import IntegrityError
from vmrepo.format import BlobType, pack_key
from vmrepo.planner import ReadPlanner
from vmrepo.repository import Repository
from vmrepo.storage.local import LocalBackend

CS = 64 << 10


def _repo(tmp_path: Path, blobs: list[bytes], pack_size: int = 16 * CS) -> Repository:
    repo = Repository.init(LocalBackend(tmp_path / "repo", create=True),
                           RepoConfig.new(chunk_size=CS, pack_size=pack_size))
    session = repo.session()
    for b in blobs:
        session.add(repo.hasher.id(b), BlobType.CHUNK, b)
    session.commit()
    return repo


def _read(repo: Repository, wants: list[tuple[bytes, int]], **kw: object
          ) -> tuple[dict[int, bytes], ReadPlanner[int]]:
    got: dict[int, bytes] = {}
    lock = threading.Lock()

    def deliver(tag: int, data: bytes) -> None:
        with lock:
            assert tag not in got
            got[tag] = data

    planner: ReadPlanner[int] = ReadPlanner(repo, deliver, **kw)  # type: ignore[arg-type]
    planner.read(wants)
    return got, planner


def test_blobs_are_read_with_few_requests(tmp_path: Path) -> None:
    blobs = [os.urandom(CS) for _ in range(200)]
    repo = _repo(tmp_path, blobs)
    ids = [repo.hasher.id(b) for b in blobs]
    wants = [(bid, i) for i, bid in enumerate(ids)] + [(ids[3], 1000), (ids[3], 1001)]
    got, planner = _read(repo, wants)
    assert all(got[i] == blobs[i] for i in range(200))
    assert got[1000] == got[1001] == blobs[3]
    assert planner.stats.blobs == 200  # blob 3 was read once for three tags
    packs = len(list(repo.backend.list("data/")))
    assert planner.stats.requests <= packs + 1, (planner.stats.requests, packs)
    _, small = _read(repo, [(bid, i) for i, bid in enumerate(ids)], max_request=3 * CS + 100)
    assert small.stats.requests >= 200 // 3


def test_a_bad_copy_is_replaced_by_a_good_one(tmp_path: Path) -> None:
    blob = os.urandom(CS)
    repo = _repo(tmp_path, [blob, os.urandom(CS)])
    bid = repo.hasher.id(blob)
    # Store the blob again in another pack (as a session that found the first copy bad would).
    from vmrepo.pack import PackBuilder

    builder = PackBuilder()
    builder.add(bid, BlobType.CHUNK, repo.codec.encode_blob(bid, blob), len(blob))
    entries = list(builder.entries)
    pack_id, parts = builder.seal(repo.hasher, repo.codec)
    repo.store.put_pack(pack_id, parts)
    from vmrepo.segments import encode_segment

    key, raw = encode_segment(repo.codec, repo.hasher, [(pack_id, None, entries)])
    repo.store.put_segment(key, raw)
    first = repo.index.get(bid)
    assert first is not None and first.pack_id != pack_id
    path = Path(repo.backend.location) / pack_key(first.pack_id)
    data = bytearray(path.read_bytes())
    data[first.offset + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    again = Repository.open(LocalBackend(tmp_path / "repo"))
    got, planner = _read(again, [(bid, 0)])
    assert got[0] == blob and planner.stats.damaged == 0


def test_damage_without_a_good_copy_is_named(tmp_path: Path) -> None:
    blob = os.urandom(CS)
    repo = _repo(tmp_path, [blob])
    bid = repo.hasher.id(blob)
    loc = repo.index.get(bid)
    assert loc is not None
    (Path(repo.backend.location) / pack_key(loc.pack_id)).unlink()
    with pytest.raises(IntegrityError, match=bid.hex()[:16]):
        _read(repo, [(bid, 0)])
    seen: list[tuple[int, str]] = []
    planner: ReadPlanner[int] = ReadPlanner(repo, lambda t, d: None,
                                            damaged=lambda t, b, why: seen.append((t, why)))
    planner.read([(bid, 7), (os.urandom(32), 8)])
    assert sorted(t for t, _ in seen) == [7, 8]
    assert any("missing" in why for _, why in seen)
    assert any("not in the index" in why for _, why in seen)
