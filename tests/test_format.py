"""Codecs, packs, config (v1 and v2), index segments (v1 and v2)."""

from __future__ import annotations

import os

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmrepo.codec import Codec, RecordKind, pack_map
from vmrepo.config import RepoConfig, check_chunk_size
from vmrepo.errors import IncompatibleRepository, IntegrityError
from vmrepo.format import BlobType, Hasher, checksum
from vmrepo.pack import PACK_MAGIC, BlobEntry, PackBuilder, decode_header, parse_trailer
from vmrepo.segments import ENTRY_SIZE, decode_segment, encode_segment

CODEC = Codec(3)


def test_record_roundtrip_and_version_check() -> None:
    raw = CODEC.encode_record(RecordKind.SNAPSHOT, {"v": 1, "x": b"\x00\x01", "y": [1, 2]})
    assert raw[0] == 0
    assert CODEC.decode_record(RecordKind.SNAPSHOT, raw, "r", 1) == \
        {"v": 1, "x": b"\x00\x01", "y": [1, 2]}
    newer = CODEC.encode_record(RecordKind.SNAPSHOT, {"v": 2})
    with pytest.raises(IncompatibleRepository, match="newer"):
        CODEC.decode_record(RecordKind.SNAPSHOT, newer, "r", 1)
    for bad in (b"\x01" + raw[1:], b"\x00\xc1garbage", b"\x00" + pack_map({"no": "version"}),
                b"", b"\x00" + msgpack.packb([1, 2])):
        with pytest.raises(IntegrityError):
            CODEC.decode_record(RecordKind.SNAPSHOT, bad, "r", 1)


def test_blob_codec_compresses_or_stores_raw() -> None:
    text = b"abc" * 10000
    bid = b"\x01" * 32
    enc = CODEC.encode_blob(bid, text)
    assert enc[0] == 1 and len(enc) < len(text)
    assert CODEC.decode_blob(bid, enc, len(text), "b") == text
    rnd = os.urandom(4096)
    enc = CODEC.encode_blob(bid, rnd)
    assert enc[0] == 0 and enc[1:] == rnd
    assert CODEC.decode_blob(bid, enc, len(rnd), "b") == rnd
    with pytest.raises(IntegrityError):
        CODEC.decode_blob(bid, enc, len(rnd) + 1, "b")
    with pytest.raises(IntegrityError):
        CODEC.decode_blob(bid, b"\x01notzstd", 10, "b")
    with pytest.raises(IntegrityError, match="encrypted"):
        CODEC.decode_blob(bid, b"\x10" + rnd, len(rnd), "b")
    plain = Codec(0)
    assert plain.encode_blob(bid, text)[0] == 0


def test_incompressible_blobs_are_stored_raw_without_compressing_them() -> None:
    bid = b"\x02" * 32
    calls = 0
    codec = Codec(3)
    real = codec._compressor

    def counting():  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return real()
    codec._compressor = counting  # type: ignore[method-assign]
    rnd = os.urandom(256 * 1024)
    enc = codec.encode_blob(bid, rnd)
    assert enc[0] == 0 and enc[1:] == rnd and calls == 0
    # Compressible data, even with random bytes at its start, is compressed.
    mixed = os.urandom(2048) + b"0123456789abcdef" * (16 * 1024 - 128)
    enc = codec.encode_blob(bid, mixed)
    assert enc[0] == 1 and len(enc) < len(mixed) // 4 and calls == 1
    assert codec.decode_blob(bid, enc, len(mixed), "b") == mixed


@given(st.binary(min_size=1, max_size=300_000), st.sampled_from([1, 3, 9]))
@settings(max_examples=30, deadline=None)
def test_every_blob_round_trips(data: bytes, level: int) -> None:
    codec, bid = Codec(level, blob_size=65536), b"\x03" * 32
    enc = codec.encode_blob(bid, data)
    assert codec.decode_blob(bid, enc, len(data), "b") == data
    assert len(enc) <= len(data) + 1


def test_keyed_ids_depend_on_key() -> None:
    a, b = Hasher(b"a" * 32), Hasher(b"b" * 32)
    assert a.id(b"x") != b.id(b"x")
    assert a.id(b"x") == a.id(bytearray(b"x")) and len(a.id(b"x")) == 32


def test_pack_header_lists_its_blobs() -> None:
    h = Hasher(os.urandom(32))
    pb = PackBuilder()
    blobs = [os.urandom(100), os.urandom(7)]
    for i, blob in enumerate(blobs):
        pb.add(h.id(blob), BlobType.CHUNK if i else BlobType.PAGE, b"\x00" + blob, len(blob))
    pack_id, parts = pb.seal(h, CODEC)
    data = b"".join(parts)
    assert data.startswith(PACK_MAGIC) and pack_id == h.id(data)
    off, n = parse_trailer(data[-12:], len(data), "p")
    entries = decode_header(CODEC, data[off : off + n], "p", len(data))
    assert [e.raw_length for e in entries] == [100, 7]
    for e, blob in zip(entries, blobs, strict=True):
        assert data[e.offset + 1 : e.offset + e.length] == blob
    with pytest.raises(IntegrityError):
        parse_trailer(b"\x00" * 12, len(data), "p")
    with pytest.raises(IntegrityError, match="outside"):
        decode_header(CODEC, data[off : off + n], "p", len(data) - 50)


def test_config_v2_roundtrip_and_refusals() -> None:
    cfg = RepoConfig.new(chunk_size=128 << 10)
    assert cfg.version == 2
    back = RepoConfig.decode(cfg.encode())
    assert back == cfg
    outer = msgpack.unpackb(cfg.encode()[1:])
    rec = msgpack.unpackb(outer["body"])
    rec["features"]["required"] = ["encryption-v9"]
    body = pack_map(rec)
    with pytest.raises(IncompatibleRepository, match="encryption-v9"):
        RepoConfig.decode(b"\x00" + pack_map({"v": 2, "body": body, "blake3": checksum(body)}))
    with pytest.raises(IncompatibleRepository, match="newer"):
        RepoConfig.decode(b"\x00" + pack_map({"v": 3, "body": body, "blake3": checksum(body)}))


def test_config_damage_is_damage_to_the_config() -> None:
    raw = bytearray(RepoConfig.new().encode())
    key_at = raw.index(RepoConfig.decode(bytes(raw)).hash_key)
    raw[key_at + 5] ^= 0x01  # one bit of the hash key
    with pytest.raises(IntegrityError, match="config: checksum mismatch") as exc:
        RepoConfig.decode(bytes(raw))
    assert exc.value.key == "config"
    with pytest.raises(IntegrityError, match="config"):
        RepoConfig.decode(bytes(raw[:40]))


def test_config_v1_is_read_and_upgraded() -> None:
    v2 = RepoConfig.new()
    fields = {**v2.fields(), "v": 1}
    v1 = RepoConfig.decode(b"\x00" + pack_map(fields))
    assert v1.version == 1 and v1.hash_key == v2.hash_key
    up = v1.upgraded()
    assert up.version == 2 and RepoConfig.decode(up.encode()) == up


@pytest.mark.parametrize("size", [32 << 10, 100_000, 8 << 20, 3 << 16])
def test_bad_chunk_sizes(size: int) -> None:
    with pytest.raises(ValueError):
        check_chunk_size(size)


@pytest.mark.parametrize("size", [64 << 10, 256 << 10, 4 << 20])
def test_good_chunk_sizes(size: int) -> None:
    assert check_chunk_size(size) == size


entries_st = st.lists(st.tuples(st.binary(min_size=32, max_size=32), st.integers(0, 2),
                                st.integers(8, 1 << 30), st.integers(1, 1 << 22),
                                st.integers(0, 1 << 22)), max_size=40)


@settings(max_examples=50, deadline=None)
@given(st.lists(entries_st, min_size=1, max_size=4))
def test_segment_v2_roundtrip_is_sorted(packs: list[list[tuple[bytes, int, int, int, int]]]
                                        ) -> None:
    h = Hasher(b"k" * 32)
    items = [(os.urandom(32), 1000 + i, [BlobEntry(bid, BlobType(t), off, ln, raw)
                                         for bid, t, off, ln, raw in p])
             for i, p in enumerate(packs)]
    key, raw = encode_segment(CODEC, h, items, supersedes=[b"s" * 32])
    assert key == f"index/{h.id(raw).hex()}"
    seg = decode_segment(CODEC, raw, key)
    assert seg.supersedes == [b"s" * 32] and seg.pack_sizes == [1000 + i for i in
                                                                 range(len(packs))]
    got = sorted((seg.packs[ref], [bid, btype, off, ln, raw])
                 for bid, ref, off, ln, raw, btype in seg.records())
    want = sorted((pid, e.as_list()) for pid, _, es in items for e in es)
    assert got == want
    ids = [r[0] for r in seg.records()]
    assert ids == sorted(ids) and len(seg.entries) == ENTRY_SIZE * len(want)


def test_segment_v1_is_read() -> None:
    bid = os.urandom(32)
    raw = b"\x00" + pack_map({"v": 1, "packs": [[b"p" * 32, [[bid, 0, 8, 100, 200]]]]})
    seg = decode_segment(CODEC, raw, "index/x")
    assert seg.packs == [b"p" * 32]
    assert list(seg.records()) == [(bid, 0, 8, 100, 200, int(BlobType.CHUNK))]
    assert seg.pack_sizes == [None]
