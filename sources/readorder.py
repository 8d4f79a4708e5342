"""The order of a read: the two halves of the data asked for, taken in turns.

A disk's kinds of data come in long stretches: a region of already
compressed or encrypted files costs the repository little CPU and much disk
writing, a region of text the opposite. Read front to back, the backup
spends the first kind of stretch waiting on the disk and the second on the
cores. Reading the first half of the data and the second half in turns, a
few MiB of each at a time, mixes the two loads, so both the cores and the
disk stay busy. (The core takes extents in any order, see :mod:`.base`.) A
turn ends with the piece that brings it to ``TURN`` bytes of data or more.

Each half is still read front to back, so read-ahead and the manifest's
pages in progress stay as they are for a sequential read, two fronts
instead of one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

#: ``(offset, length, is_data)``: a range of the disk, data to read or zeros.
Range = tuple[int, int, bool]

#: Data bytes taken from one half, at least, before turning to the other (a multiple of
#: every chunk size, so the turns cut no chunk).
TURN = 16 << 20


def split_point(ranges: Iterable[Range], data_bytes: int, turn: int | None = None) -> int:
    """The offset, a multiple of ``turn``, before which lies about half of the
    ``data_bytes`` of data in ``ranges`` (read only as far as that)."""
    turn = turn or TURN
    half, seen = data_bytes // 2, 0
    for off, n, is_data in ranges:
        if not is_data:
            continue
        if seen + n >= half:
            return (off + half - seen) // turn * turn
        seen += n
    return 0


def clip(ranges: Iterable[Range], start: int, stop: int) -> Iterator[Range]:
    """The parts of ``ranges`` within ``[start, stop)``."""
    for off, n, is_data in ranges:
        lo, hi = max(off, start), min(off + n, stop)
        if lo < hi:
            yield lo, hi - lo, is_data


def in_turns(first: Iterable[Range], second: Iterable[Range],
             turn: int | None = None) -> Iterator[tuple[int, Range]]:
    """Yield ``(half, range)`` from both halves, ``turn`` bytes of data at a time.

    Data ranges are cut at multiples of ``turn``; zero ranges come as they are,
    in their half's order, and do not count towards a turn.
    """
    turn = turn or TURN
    halves = [_cut(iter(first), turn), _cut(iter(second), turn)]
    live = [0, 1]
    while live:
        for half in list(live):
            taken = 0
            for rng in halves[half]:
                yield half, rng
                if rng[2]:
                    taken += rng[1]
                    if taken >= turn:
                        break
            else:
                live.remove(half)


def _cut(ranges: Iterator[Range], turn: int) -> Iterator[Range]:
    for off, n, is_data in ranges:
        if not is_data:
            yield off, n, False
            continue
        end = off + n
        while off < end:
            step = min(end, (off // turn + 1) * turn) - off
            yield off, step, True
            off += step
