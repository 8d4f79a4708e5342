"""The on-disk index: runs, merges, syncing with the repository's segments, bounded memory."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmrepo import index as index_mod
from vmrepo.codec import Codec
from vmrepo.format import BlobType, Hasher, index_key
from vmrepo.index import Index, Location
from vmrepo.pack import BlobEntry
from vmrepo.runs import Run, RunPack, Source, write_run
from vmrepo.segments import encode_segment
from vmrepo.storage.memory import MemoryBackend
from vmrepo.store import RepoStore

HASHER = Hasher(b"h" * 32)


def make_store() -> RepoStore:
    return RepoStore(MemoryBackend(), Codec(), HASHER)


def add_segment(store: RepoStore, n: int, rnd: random.Random, supersedes: list[bytes] = (),
                pack: bytes | None = None) -> tuple[bytes, dict[bytes, Location]]:
    pack = pack or rnd.randbytes(32)
    entries = [BlobEntry(rnd.randbytes(32), BlobType(rnd.randrange(3)), 8 + i * 100, 90,
                         rnd.randrange(1, 1 << 20)) for i in range(n)]
    key, raw = encode_segment(store.codec, HASHER, [(pack, 8 + n * 100 + 20, entries)],
                              list(supersedes))
    store.put_segment(key, raw)
    locs = {e.id: Location(pack, e.type, e.offset, e.length, e.raw_length) for e in entries}
    return bytes.fromhex(key[len("index/"):]), locs


def check(index: Index, truth: dict[bytes, Location], rnd: random.Random) -> None:
    for bid, loc in truth.items():
        assert index.get(bid) == loc
    for _ in range(50):
        assert index.get(rnd.randbytes(32)) is None
    assert len(index) == len(truth)
    assert sorted(bid for bid, _ in index.entries()) == sorted(truth)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 300), min_size=1, max_size=6), st.integers(0, 2**32))
def test_index_agrees_with_a_dict(tmp_path_factory: pytest.TempPathFactory, sizes: list[int],
                                  seed: int) -> None:
    rnd = random.Random(seed)
    store = make_store()
    truth: dict[bytes, Location] = {}
    directory = tmp_path_factory.mktemp("idx")
    for n in sizes:
        _, locs = add_segment(store, n, rnd)
        truth.update(locs)
        index = Index(directory)  # a new process each time: state comes from the directory
        index.sync(store)
        check(index, truth, rnd)
        index.close()


def test_small_segments_spill_into_runs_and_runs_merge(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_mod, "SPILL_ENTRIES", 500)
    rnd = random.Random(1)
    store = make_store()
    truth: dict[bytes, Location] = {}
    for _round in range(12):
        for _ in range(3):
            _, locs = add_segment(store, rnd.randrange(50, 300), rnd)
            truth.update(locs)
        index = Index(tmp_path)
        index.sync(store)
        check(index, truth, rnd)
        runs = sorted(tmp_path.glob("run-*.idx"))
        assert len(runs) <= index_mod.MAX_RUNS
        index.close()
    assert len(list(tmp_path.glob("run-*.idx"))) < 12  # merged as they grew


def test_published_entries_spill_and_survive_a_new_process(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    from vmrepo.segments import decode_segment

    monkeypatch.setattr(index_mod, "SPILL_ENTRIES", 200)
    rnd = random.Random(2)
    store = make_store()
    index = Index(tmp_path)
    index.sync(store)
    truth: dict[bytes, Location] = {}
    for _ in range(5):
        sid, locs = add_segment(store, 150, rnd)
        seg = decode_segment(store.codec, store.backend.get(index_key(sid)), "s")
        index.publish(sid, seg)
        truth.update(locs)
    check(index, truth, rnd)
    assert index._mem_count < 200  # noqa: SLF001 - memory stays bounded
    index.close()
    again = Index(tmp_path)
    again.sync(store)
    check(again, truth, rnd)


def test_a_merge_supersedes_and_a_vanished_segment_rebuilds(tmp_path: Path) -> None:
    rnd = random.Random(3)
    store = make_store()
    a, locs_a = add_segment(store, 100, rnd)
    b, locs_b = add_segment(store, 100, rnd)
    index = Index(tmp_path)
    index.sync(store)
    check(index, {**locs_a, **locs_b}, rnd)
    index.close()
    # A merge keeps a's entries (moved to a new pack) and drops b's; the old ones stay present.
    merged_pack = rnd.randbytes(32)
    entries = [BlobEntry(bid, loc.type, loc.offset, loc.length, loc.raw_length)
               for bid, loc in locs_a.items()]
    key, raw = encode_segment(store.codec, HASHER, [(merged_pack, None, entries)], [a, b])
    store.put_segment(key, raw)
    moved = {bid: Location(merged_pack, loc.type, loc.offset, loc.length, loc.raw_length)
             for bid, loc in locs_a.items()}
    index = Index(tmp_path)
    index.sync(store)
    check(index, moved, rnd)
    index.close()
    store.backend.delete(index_key(a))
    store.backend.delete(index_key(b))
    index = Index(tmp_path)
    index.sync(store)
    check(index, moved, rnd)


def test_damaged_segment_is_reported_and_the_rest_used(tmp_path: Path) -> None:
    rnd = random.Random(4)
    store = make_store()
    _, good = add_segment(store, 40, rnd)
    bad, _ = add_segment(store, 40, rnd)
    raw = store.backend.get(index_key(bad))
    store.backend.put(index_key(bad), raw[: len(raw) // 2])  # truncated
    index = Index(tmp_path)
    index.sync(store)
    check(index, good, rnd)
    assert [p.key for p in store.problems] == [index_key(bad)]


def test_pack_filter_skips_entries_of_missing_packs(tmp_path: Path) -> None:
    rnd = random.Random(5)
    store = make_store()
    _, first = add_segment(store, 10, rnd)
    bid = next(iter(first))
    gone = first[bid].pack_id
    again = Location(rnd.randbytes(32), BlobType.CHUNK, 8, 90, 100)
    key, raw = encode_segment(store.codec, HASHER, [(again.pack_id, None, [
        BlobEntry(bid, BlobType.CHUNK, 8, 90, 100)])])
    store.put_segment(key, raw)
    index = Index(tmp_path)
    index.sync(store)
    assert len(index.locations(bid)) == 2
    index.set_pack_filter(lambda pid: pid != gone)
    assert index.get(bid) == again
    index.set_pack_filter(lambda pid: pid not in (gone, again.pack_id))
    assert index.get(bid) is None and bid not in index


def test_runs_merge_by_block_copy_with_duplicates_and_fanout(tmp_path: Path) -> None:
    rnd = random.Random(6)
    packs = [RunPack(rnd.randbytes(32), 100), RunPack(rnd.randbytes(32), None)]
    big = sorted((rnd.randbytes(32), rnd.randrange(2), 8, 10, 20, 0) for _ in range(5000))
    small = sorted((rnd.randbytes(32), 0, 8, 10, 20, 1) for _ in range(300))
    same = next(r for r in big if r[1] == 0)  # pack 0 is pack 0 in both tables
    small += [same]  # an identical entry is kept once
    small += [(big[30][0], 1, 999, 10, 20, 0)]  # a second copy of a blob is kept
    small.sort()
    base = write_run(tmp_path / "base.idx", [Source(packs, lambda: iter(big), len(big))])
    merged = write_run(tmp_path / "m.idx", [Source(packs[:1] + [RunPack(os.urandom(32), 5)],
                                                   lambda: iter(small), len(small))], base=base)
    assert merged.n == len(big) + len(small) - 1
    ids = [r[0] for r in merged.records()]
    assert ids == sorted(ids)
    assert len(merged.find(big[30][0])) == 2
    for rec in big[::97] + small:
        assert merged.find(rec[0])
    reopened = Run(tmp_path / "m.idx")
    assert all(reopened.find(r[0]) for r in big[::13])


@pytest.mark.parametrize("bad", ["pack number", "blob type", "order"])
def test_a_malformed_segment_is_refused_and_the_index_left_as_it_was(tmp_path: Path,
                                                                     bad: str) -> None:
    """Published entries are checked first: a malformed one raises IntegrityError naming
    the segment, and nothing of that segment becomes visible."""
    import struct

    from vmrepo.errors import IntegrityError
    from vmrepo.segments import ENTRY, Segment

    idx = Index(tmp_path / "idx")
    good_id = os.urandom(32)
    idx.publish(b"g" * 32, Segment([b"p" * 32], [None],
                                   ENTRY.pack(good_id, 0, 0, 10, 10, int(BlobType.CHUNK))))
    ids = sorted(os.urandom(32) for _ in range(3))
    entries = [[bid, 0, 10 * i, 10, 10, int(BlobType.CHUNK)] for i, bid in enumerate(ids)]
    if bad == "pack number":
        entries[2][1] = 1
    elif bad == "blob type":
        entries[2][5] = max(BlobType) + 1
    else:
        entries[0], entries[2] = entries[2], entries[0]
    seg = Segment([b"q" * 32], [None], b"".join(struct.pack(ENTRY.format, *e)
                                                for e in entries))
    with pytest.raises(IntegrityError, match="malformed or misordered") as err:
        idx.publish(b"s" * 32, seg)
    assert err.value.key == index_key(b"s" * 32)
    assert len(idx) == 1 and idx.covered == {b"g" * 32}
    assert good_id in idx and idx.get(good_id) == Location(b"p" * 32, BlobType.CHUNK, 0, 10, 10)
    assert not any(bid in idx for bid in ids)
