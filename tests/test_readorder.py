"""The order of a full read: the two halves of the data in turns (logic, file source)."""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vmrepo.sources import readorder
from vmrepo.sources.base import BackupContext, DiskStream
from vmrepo.sources.errors import DiskUnreadable
from vmrepo.sources.file import FileSource
from vmrepo.sources.nbdread import END
from vmrepo.sources.readorder import Range, clip, in_turns, split_point

from .helpers import text_like

KiB, MiB = 1 << 10, 1 << 20


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[Range], int]:
    """Ranges covering a disk from 0, data and zeros, and a turn (a power of two)."""
    turn = draw(st.sampled_from([4 * KiB, 64 * KiB, 1 * MiB]))
    pos, out = 0, []
    for is_data, n in draw(st.lists(st.tuples(st.booleans(), st.integers(1, 5 * turn)),
                                    max_size=30)):
        out.append((pos, n, is_data))
        pos += n
    return out, turn


def merged(ranges: list[Range]) -> list[list[int]]:
    """Ranges in order, neighbours of the same kind joined; overlaps fail."""
    out: list[list[int]] = []
    for off, n, is_data in sorted(ranges):
        assert not out or out[-1][0] + out[-1][1] <= off
        if out and out[-1][0] + out[-1][1] == off and out[-1][2] == is_data:
            out[-1][1] += n
        else:
            out.append([off, n, is_data])
    return out


def data_bytes(ranges: list[Range]) -> int:
    return sum(n for _, n, is_data in ranges if is_data)


@given(layouts())
def test_turns_cover_every_range_once_each_half_in_order(case: tuple[list[Range], int]) -> None:
    ranges, turn = case
    split = split_point(ranges, data_bytes(ranges), turn)
    out = list(in_turns(clip(ranges, 0, split), clip(ranges, split, END), turn))
    # Every byte once, each with its kind.
    assert merged([r for _, r in out]) == merged(ranges)
    for half in (0, 1):
        mine = [r for h, r in out if h == half]
        assert all(a[0] + a[1] <= b[0] for a, b in zip(mine, mine[1:], strict=False))
        assert all((r[0] < split) == (half == 0) for r in mine)
    # Data pieces never cross a multiple of the turn (so they cut no chunk).
    assert all(off // turn == (off + n - 1) // turn for _, (off, n, d) in out if d)
    # A half gives way only after a whole turn of data, or when it has no more.
    runs: list[list[int]] = []
    for half, (_, n, is_data) in out:
        if is_data:
            if runs and runs[-1][0] == half:
                runs[-1][1] += n
            else:
                runs.append([half, n])
    for i, (half, n) in enumerate(runs[:-1]):
        assert n >= turn or all(h != half for h, _ in runs[i + 1:])


@given(layouts())
def test_split_point_halves_the_data_to_a_turn(case: tuple[list[Range], int]) -> None:
    ranges, turn = case
    total = data_bytes(ranges)
    split = split_point(ranges, total, turn)
    assert split % turn == 0
    before = data_bytes(list(clip(ranges, 0, split)))
    assert before <= total // 2
    assert data_bytes(list(clip(ranges, 0, split + turn))) >= total // 2


def test_no_data_reads_in_one_half() -> None:
    ranges = [(0, 10 * MiB, False)]
    assert split_point(ranges, 0) == 0
    assert list(in_turns(clip(ranges, 0, 0), clip(ranges, 0, END))) == [(1, ranges[0])]


def _disk(tmp_path: Path, size: int, data: list[tuple[int, bytes]]) -> tuple[Path, bytes]:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(size)
        for off, buf in data:
            f.seek(off)
            f.write(buf)
    return path, path.read_bytes()


@dataclass
class Drained:
    """What a disk stream gave: the image it describes, the MiB its data extents start
    at, in order, and the bytes it gave as zeros."""

    image: bytes
    order: list[int]
    zeros: int


def _drain(stream: DiskStream) -> Drained:
    got, order, zeros = bytearray(stream.size), [], 0
    for ext in stream.extents():
        if ext.data is None:
            zeros += ext.length
        else:
            got[ext.offset:ext.offset + ext.length] = ext.data
            order.append(ext.offset // MiB)
    return Drained(bytes(got), order, zeros)


def test_file_source_reads_both_halves_in_turns(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A raw image of random data then text: the read alternates between the two,
    a turn at a time, and every byte comes once, holes as zeros."""
    monkeypatch.setattr(readorder, "TURN", 1 * MiB)
    rnd = random.Random(5)
    path, image = _disk(tmp_path, 24 * MiB, [(0, rnd.randbytes(8 * MiB)),
                                             (10 * MiB, text_like(rnd, 8 * MiB))])
    fds = len(os.listdir("/proc/self/fd"))
    src = FileSource("vm1", {"disk0": str(path)})
    (stream,) = src.begin(BackupContext("r", 64 * KiB, "s"))
    try:
        read = _drain(stream)
        assert read.image == image
        assert stream.report() == {"path": str(path), "bytes_read": 16 * MiB,
                                   "hole_bytes": 8 * MiB}
        # 16 MiB of data: the halves split at 8 MiB; the text starts at 10 MiB.
        assert read.order == [o for pair in zip(range(8), range(10, 18), strict=True)
                              for o in pair]
    finally:
        src.finish(False)
    assert len(os.listdir("/proc/self/fd")) == fds


def test_both_halves_come_from_the_file_opened_at_the_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path renamed over, or removed, once the snapshot began: still the file it
    opened, in both halves."""
    monkeypatch.setattr(readorder, "TURN", 1 * MiB)
    rnd = random.Random(6)
    path, image = _disk(tmp_path, 8 * MiB, [(0, rnd.randbytes(8 * MiB))])
    for change in ("rename", "remove"):
        src = FileSource("vm1", {"disk0": str(path)})
        (stream,) = src.begin(BackupContext("r", 64 * KiB, "s"))
        try:
            other = tmp_path / "other.raw"
            other.write_bytes(rnd.randbytes(8 * MiB))
            if change == "rename":
                os.replace(other, path)
            else:
                path.unlink()
            read = _drain(stream)
            assert read.image == image and read.zeros == 0, change
        finally:
            src.finish(False)
        path.write_bytes(image)


def test_a_file_shrinking_past_the_reads_is_an_error(tmp_path: Path) -> None:
    """Cut shorter while being read where only holes remained ahead: the missing end
    would pass for holes; the snapshot fails instead."""
    path, _ = _disk(tmp_path, 64 * MiB, [(0, random.Random(7).randbytes(2 * MiB))])
    src = FileSource("vm1", {"disk0": str(path)})
    (stream,) = src.begin(BackupContext("r", 64 * KiB, "s"))
    try:
        extents = stream.extents()
        next(extents)
        os.truncate(path, 32 * MiB)
        with pytest.raises(DiskUnreadable, match="shrank while being read"):
            list(extents)
    finally:
        src.finish(False)


def test_reads_over_nbd_take_both_halves_in_turns(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A qcow2 image read through qemu-nbd and the NBD client: data in turns, zeros
    where the image has none, each byte once, counted as before."""
    monkeypatch.setattr(readorder, "TURN", 1 * MiB)
    rnd = random.Random(8)
    raw, image = _disk(tmp_path, 24 * MiB, [(0, rnd.randbytes(6 * MiB)),
                                            (12 * MiB, text_like(rnd, 6 * MiB))])
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True)
    src = FileSource("vm1", {"disk0": str(qcow2)})
    (stream,) = src.begin(BackupContext("r", 64 * KiB, "s"))
    try:
        read = _drain(stream)
        report = stream.report()
    finally:
        src.finish(False)
    assert read.image == image
    assert (report["bytes_read"], report["bytes_zero"], read.zeros) == \
        (12 * MiB, 12 * MiB, 12 * MiB)
    # 12 MiB of data: the halves split at 6 MiB, where the text starts at 12 MiB.
    assert read.order[:4] == [0, 12, 1, 13]
    assert sorted(read.order) == list(range(6)) + list(range(12, 18))
