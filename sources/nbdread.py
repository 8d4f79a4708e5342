"""Reading a disk through the NBD client: only what is asked, zeros without reading.

Given the ranges to back up (the whole disk, or the dirty extents of a
bitmap), ``base:allocation`` tells which parts read as zeros: those become
zero extents without a READ; the rest is read with several requests in
flight. A dirty range that reads as zeros is therefore recorded as zeros.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .base import Extent
from .errors import DiskUnreadable, SourceUnavailable
from .nbd.client import Extent as Status
from .nbd.client import NbdClient, merge_extents
from .nbd.errors import NbdConnectError, NbdError
from .readorder import Range, clip, in_turns, split_point

ALLOCATION = "base:allocation"
STATE_HOLE = 1
STATE_ZERO = 2
DIRTY = 1
#: Beyond the end of any disk.
END = 1 << 63
#: Ranges closer than this are described by one ``base:allocation`` query, its extents
#: clipped to each range: a few round trips to QEMU instead of one per dirty range (285,
#: 12-16 ms, in the benchmark's incremental), at the cost of describing the gaps too.
STATUS_GAP = 64 << 20


def bitmap_context(name: str) -> str:
    """The meta context of a bitmap name (or a full context name as it is)."""
    return name if ":" in name else f"qemu:dirty-bitmap:{name}"


@dataclass
class ReadCounters:
    bytes_read: int = 0
    bytes_zero: int = 0
    reads: int = 0


@contextlib.contextmanager
def source_errors(disk: str) -> Iterator[None]:
    """Present the NBD library's errors as the sources' errors, naming the disk."""
    try:
        yield
    except NbdConnectError as exc:
        raise SourceUnavailable(f"disk {disk}: {exc}", disk) from None
    except NbdError as exc:
        raise DiskUnreadable(f"disk {disk}: {exc}", disk) from None


def dirty_ranges(client: NbdClient, context: str) -> list[tuple[int, int]]:
    """The ranges a dirty-bitmap context marks dirty."""
    return [(e.offset, e.length) for e in merge_extents(client.block_status(context))
            if e.flags & DIRTY]


def spans(ranges: Iterable[tuple[int, int]], gap: int
          ) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Sorted, disjoint ``(offset, length)`` ranges grouped where fewer than ``gap`` bytes
    separate them: ``(start, end, ranges)`` per group."""
    out: list[tuple[int, int, list[tuple[int, int]]]] = []
    for off, n in ranges:
        if out and off - out[-1][1] < gap:
            start, _, members = out[-1]
            members.append((off, n))
            out[-1] = (start, off + n, members)
        else:
            out.append((off, off + n, [(off, n)]))
    return out


def clipped(extents: list[Status], ranges: list[tuple[int, int]]) -> Iterator[Range]:
    """``(offset, length, is data)`` of ``extents`` (sorted, covering every range) within
    each of the sorted ``ranges``."""
    i = 0
    for off, n in ranges:
        end = off + n
        while extents[i].offset + extents[i].length <= off:
            i += 1
        j = i
        while j < len(extents) and extents[j].offset < end:
            e = extents[j]
            first, last = max(e.offset, off), min(e.offset + e.length, end)
            yield first, last - first, not e.flags & STATE_ZERO
            j += 1
        i = max(i, j - 1)  # the last one may reach into the next range


def read_disk(client: NbdClient, ranges: Iterable[tuple[int, int]], counters: ReadCounters,
              check: Callable[[], None] | None = None, depth: int = 4) -> Iterator[Extent]:
    """Yield the extents of ``ranges``: zero extents where the export reads as zeros.

    The data is read in the order of :mod:`.readorder` (the two halves in turns).
    """
    found: list[Range] = []
    for start, end, members in spans(ranges, STATUS_GAP):
        if check is not None:
            check()
        found.extend(clipped(merge_extents(client.block_status(ALLOCATION, start,
                                                               end - start)), members))
    split = split_point(found, sum(n for _, n, is_data in found if is_data))
    zeros: deque[Extent] = deque()

    def reads() -> Iterator[tuple[int, int]]:
        for _, (off, n, is_data) in in_turns(clip(found, 0, split), clip(found, split, END)):
            if is_data:
                yield off, n
            else:
                counters.bytes_zero += n
                zeros.append(Extent(off, n, None))

    for roff, buf, _holes in client.read_ranges(reads(), depth=depth):
        while zeros:
            yield zeros.popleft()
        if check is not None:
            check()
        counters.bytes_read += len(buf)
        counters.reads += 1
        yield Extent(roff, len(buf), buf)
    while zeros:
        yield zeros.popleft()
