"""Records, blob encoding, packs, config checks."""

from __future__ import annotations

import os

import msgpack
import pytest
from vmrepo.config import RepoConfig, check_chunk_size
from vmrepo.errors import IncompatibleRepository, IntegrityError
from vmrepo.format import BlobCodec, BlobType, Hasher, decode_record, encode_record
from vmrepo.pack import PACK_MAGIC, PackBuilder, decode_header, parse_header


def test_record_roundtrip_and_version_check() -> None:
    raw = encode_record({"v": 1, "x": b"\x00\x01", "y": [1, 2]})
    assert raw[0] == 0
    assert decode_record(raw, "r") == {"v": 1, "x": b"\x00\x01", "y": [1, 2]}
    with pytest.raises(IncompatibleRepository):
        decode_record(encode_record({"v": 2}), "r")
    with pytest.raises(IncompatibleRepository):
        decode_record(b"\x01" + raw[1:], "r")
    with pytest.raises(IntegrityError):
        decode_record(b"\x00\xc1garbage", "r")
    with pytest.raises(IntegrityError):
        decode_record(b"\x00" + msgpack.packb({"no": "version"}), "r")


def test_blob_codec_compresses_or_stores_raw() -> None:
    codec = BlobCodec(3)
    text = b"abc" * 10000
    enc = codec.encode(text)
    assert enc[0] == 1 and len(enc) < len(text)
    assert codec.decode(enc, len(text), "b") == text
    rnd = os.urandom(4096)
    enc = codec.encode(rnd)
    assert enc[0] == 0 and enc[1:] == rnd
    assert codec.decode(enc, len(rnd), "b") == rnd
    with pytest.raises(IntegrityError):
        codec.decode(enc, len(rnd) + 1, "b")
    with pytest.raises(IntegrityError):
        codec.decode(b"\x01notzstd", 10, "b")
    with pytest.raises(IncompatibleRepository):
        codec.decode(b"\x10" + rnd, len(rnd), "b")


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
    pack_id, parts = pb.seal(h)
    data = b"".join(parts)
    assert data.startswith(PACK_MAGIC) and pack_id == h.id(data)
    off, n = parse_header(data[-12:], len(data), "p")
    entries = decode_header(data[off : off + n], "p")
    assert [e.raw_length for e in entries] == [100, 7]
    for e, blob in zip(entries, blobs, strict=True):
        assert data[e.offset + 1 : e.offset + e.length] == blob
    with pytest.raises(IntegrityError):
        parse_header(b"\x00" * 12, len(data), "p")


def test_config_roundtrip_and_refusals() -> None:
    cfg = RepoConfig.new(chunk_size=128 << 10)
    back = RepoConfig.decode(cfg.encode())
    assert back == cfg
    rec = decode_record(cfg.encode(), "c")
    rec["features"]["required"] = ["encryption-v1"]
    with pytest.raises(IncompatibleRepository, match="encryption-v1"):
        RepoConfig.decode(encode_record(rec))
    rec["features"]["required"] = []
    rec["v"] = 2
    with pytest.raises(IncompatibleRepository, match="newer"):
        RepoConfig.decode(encode_record(rec))


@pytest.mark.parametrize("size", [32 << 10, 100_000, 8 << 20, 3 << 16])
def test_bad_chunk_sizes(size: int) -> None:
    with pytest.raises(ValueError):
        check_chunk_size(size)


@pytest.mark.parametrize("size", [64 << 10, 256 << 10, 4 << 20])
def test_good_chunk_sizes(size: int) -> None:
    assert check_chunk_size(size) == size
