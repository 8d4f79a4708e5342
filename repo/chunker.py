"""Cuts a stream of extents into fixed-size chunks, whatever their order and size.

Pieces that cover a whole chunk are passed on at once without copying (as
views of the extent's buffer);
pieces of a chunk are collected in a buffer until the chunk is covered.
Memory therefore stays bounded by the chunks in progress, which for QEMU's
push (requests up to 1 MiB, out of order by up to ~64 MiB) is small, plus
one bit per chunk: every chunk is taken once, so an extent that overlaps one
received before is an error in whichever order they come, never a chunk
silently holding the older bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vmrepo.sources.base import Data

from .errors import ExtentError

#: A chunk's bytes: a view of an extent's buffer, or a buffer of its own.
Piece = Data | memoryview
#: Called with (chunk_index, bytes or None for all zeros).
Emit = Callable[[int, Piece | None], None]
#: Called with (first, end): chunks first to end - 1 are all zeros.
EmitZeros = Callable[[int, int], None]


@dataclass
class Partial:
    """A chunk received in pieces; ``covered`` holds merged [start, end) ranges."""

    length: int
    buf: bytearray | None = None
    covered: list[list[int]] = field(default_factory=list)

    def add(self, start: int, end: int, data: Piece | None) -> None:
        for s, e in self.covered:
            if start < e and s < end:
                raise ExtentError(f"overlapping extent at chunk offset {start}")
        if data is not None:
            if self.buf is None:
                self.buf = bytearray(self.length)
            self.buf[start:end] = data
        self.covered.append([start, end])
        self.covered.sort()
        merged: list[list[int]] = []
        for s, e in self.covered:
            if merged and merged[-1][1] == s:
                merged[-1][1] = e
            else:
                merged.append([s, e])
        self.covered = merged

    @property
    def complete(self) -> bool:
        return self.covered == [[0, self.length]]

    def gaps(self) -> list[tuple[int, int]]:
        out, pos = [], 0
        for s, e in self.covered:
            if s > pos:
                out.append((pos, s))
            pos = e
        if pos < self.length:
            out.append((pos, self.length))
        return out


class ChunkSet:
    """Chunk indices taken so far, one bit each (a 16 TiB disk of 256 KiB chunks: 8 MiB)."""

    def __init__(self, chunks: int) -> None:
        self.bits = bytearray((chunks + 7) // 8)

    def take(self, first: int, stop: int) -> bool:
        """Take chunks ``first`` to ``stop - 1``; False (and nothing taken) if any was."""
        bits = self.bits
        lo, hi = -(-first // 8), stop // 8  # the whole bytes inside the range
        if lo < hi:
            if bits.count(0, lo, hi) != hi - lo:
                return False
            edges = [*range(first, lo * 8), *range(hi * 8, stop)]
        else:
            edges = list(range(first, stop))
        if any(bits[i >> 3] >> (i & 7) & 1 for i in edges):
            return False
        if lo < hi:
            bits[lo:hi] = b"\xff" * (hi - lo)
        for i in edges:
            bits[i >> 3] |= 1 << (i & 7)
        return True

    def take_one(self, index: int) -> bool:
        """Take one chunk; False if it was taken."""
        byte, bit = index >> 3, 1 << (index & 7)
        if self.bits[byte] & bit:
            return False
        self.bits[byte] |= bit
        return True


class ChunkAssembler:
    """Places extents by offset and emits each chunk once it is complete."""

    def __init__(self, size: int, chunk_size: int, emit: Emit,
                 emit_zeros: EmitZeros | None = None) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.chunks = (size + chunk_size - 1) // chunk_size
        self.emit = emit
        #: Takes a run of whole zero chunks at once (else each goes to ``emit``).
        self.emit_zeros = emit_zeros
        self.partials: dict[int, Partial] = {}
        #: Chunks emitted or in ``partials``: a piece of one not in ``partials`` overlaps.
        self.taken = ChunkSet(self.chunks)
        self.data_bytes = 0
        self.zero_bytes = 0

    def add(self, offset: int, length: int, data: Data | None) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ExtentError(f"extent {offset}+{length} outside disk of {self.size} bytes")
        if data is not None and len(data) != length:
            raise ExtentError(f"extent {offset}+{length} carries {len(data)} bytes")
        if data is None:
            self.zero_bytes += length
            if self.emit_zeros is not None:
                self._add_zeros(offset, length, self.emit_zeros)
                return
        else:
            self.data_bytes += length
        self._place(offset, length, None if data is None else memoryview(data))

    def _add_zeros(self, offset: int, length: int, emit_zeros: EmitZeros) -> None:
        """Zeros: the chunks they cover whole go to ``emit_zeros`` as one run, the ends
        like any piece. A chunk in the run with pieces in hand would overlap them: the
        extent then takes the common path, which says so."""
        cs, end = self.chunk_size, offset + length
        first = -(-offset // cs)
        stop = self.chunks if end >= self.size else end // cs
        if first >= stop or any(first <= i < stop for i in self.partials):
            self._place(offset, length, None)
            return
        if not self.taken.take(first, stop):
            raise self._overlap(offset, length)
        self._place(offset, first * cs - offset, None)
        emit_zeros(first, stop)
        tail = min(stop * cs, self.size)
        self._place(tail, end - tail, None)

    def _place(self, offset: int, length: int, view: memoryview | None) -> None:
        cs = self.chunk_size
        pos, end = offset, offset + length
        while pos < end:
            index = pos // cs
            cstart = index * cs
            cend = min(cstart + cs, self.size)
            n = min(end, cend) - pos
            piece = None if view is None else view[pos - offset : pos - offset + n]
            part = self.partials.get(index)
            if part is None and not self.taken.take_one(index):
                raise self._overlap(offset, length)
            if part is None and n == cend - cstart:
                self.emit(index, piece)
            else:
                if part is None:
                    part = self.partials[index] = Partial(cend - cstart)
                part.add(pos - cstart, pos - cstart + n, piece)
                if part.complete:
                    del self.partials[index]
                    self.emit(index, None if part.buf is None else bytes(part.buf))
            pos += n

    def _overlap(self, offset: int, length: int) -> ExtentError:
        return ExtentError(f"overlapping extent {offset}+{length}: the source sent part of "
                           "it before")

    def finish(self, fill: Callable[[int], bytes] | None) -> None:
        """Emit the chunks left incomplete, their gaps taken from ``fill(index)``.

        ``fill`` gives a chunk's previous content (changes-only pass); without
        it the gaps are zeros (full pass).
        """
        for index in sorted(self.partials):
            part = self.partials.pop(index)
            if fill is None:
                self.emit(index, None if part.buf is None else bytes(part.buf))
                continue
            base = fill(index)
            buf = part.buf if part.buf is not None else bytearray(part.length)
            for s, e in part.gaps():
                buf[s:e] = base[s:e]
            self.emit(index, bytes(buf))
