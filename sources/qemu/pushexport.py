"""The receiving end of QEMU's push: an NBD export that turns writes into extents.

QEMU's backup job writes the disk into this export (WRITE and
WRITE_ZEROES, out of order, in pieces). Each request is queued as an
:class:`~vmrepo.sources.base.Extent` before it is acknowledged, and the
queue holds at most ``budget`` bytes, so a slow consumer slows QEMU down
instead of growing memory. Zeroes cost no memory and are not queued in
order: they join the runs of zeroes already waiting that they touch (QEMU
sends a hole as a write-zeroes request per MiB, from many workers at once),
and the consumer takes every waiting run at once, so a hole sent as a
hundred thousand requests reaches it as a few extents. Writes that overlap
each other are not the backup job's (it writes each cluster once): the
consumer's chunk assembler refuses them, whatever their order. The consumer
drains :meth:`PushExport.extents` until :meth:`end` is called.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator

from ..base import Extent
from ..errors import SourceError
from ..nbd import protocol as p
from ..nbd.server import Export, ExportError

_END = object()
#: Zeroes wake the consumer once this many have come (data and the end wake it at once).
ZEROES_WAKE = 256 << 20


class PushExport(Export):
    """A write-only export of ``size`` bytes feeding one disk stream."""

    def __init__(self, name: str, size: int, budget: int = 16 << 20) -> None:
        self.name = name
        self.size = size
        self.writable = True
        self.budget = budget
        self.bytes_received = 0
        self.requests = 0
        self._queue: deque[object] = deque()
        self._queued = 0
        #: Runs of zeroes waiting, by start (their end) and by end (their start).
        self._zero_runs: dict[int, int] = {}
        self._zero_ends: dict[int, int] = {}
        self._zero_bytes = 0  # zeroes put since the consumer was last woken for them
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._aborted = False
        self._ended = False

    def _put(self, extent: Extent) -> None:
        cost = extent.length if extent.data is not None else 0
        with self._cond:
            while (not self._aborted and self._queued and self._queued + cost > self.budget):
                self._cond.wait()
            if self._aborted or self._ended:
                raise ExportError(p.EIO, "backup target is closed")
            self.bytes_received += extent.length
            self.requests += 1
            if extent.data is None and self._add_zero_run(extent.offset,
                                                          extent.offset + extent.length):
                self._zero_bytes += extent.length
                if self._zero_bytes < ZEROES_WAKE:
                    return  # the consumer need not wake for every MiB of a hole
                self._zero_bytes = 0
            else:
                self._queue.append(extent)
                self._queued += cost
            self._cond.notify_all()

    def _add_zero_run(self, start: int, end: int) -> bool:
        """Zeroes from ``start`` to ``end``, joined with the waiting runs they touch; False
        (nothing changed) if a waiting run starts or ends where they do: they overlap it,
        and go to the consumer in order, which reports the overlap."""
        if start >= end or start in self._zero_runs or end in self._zero_ends:
            return False
        if start in self._zero_ends:
            before = self._zero_ends.pop(start)
            del self._zero_runs[before]
            start = before
        if end in self._zero_runs:
            after = self._zero_runs.pop(end)
            del self._zero_ends[after]
            end = after
        self._zero_runs[start] = end
        self._zero_ends[end] = start
        return True

    def pwrite(self, offset: int, data: bytes) -> None:
        self._put(Extent(offset, len(data), data))

    def write_zeroes(self, offset: int, length: int) -> None:
        self._put(Extent(offset, length, None))

    def end(self, error: BaseException | None = None) -> None:
        """No more data: the stream ends, raising ``error`` if given."""
        with self._cond:
            if self._ended:
                return
            self._ended = True
            self._error = error
            self._queue.append(_END)
            self._cond.notify_all()

    def abort(self) -> None:
        """Refuse further writes and wake every waiter (the snapshot failed)."""
        with self._cond:
            self._aborted = True
            self._queue.clear()
            self._queued = 0
            self._cond.notify_all()

    @property
    def ended(self) -> bool:
        return self._ended

    def extents(self) -> Iterator[Extent]:
        while True:
            with self._cond:
                while not self._queue and not self._zero_runs and not self._aborted:
                    self._cond.wait()
                if self._aborted:
                    raise SourceError(f"disk {self.name}: the backup was aborted", self.name)
                runs = sorted(self._zero_runs.items())
                self._zero_runs.clear()
                self._zero_ends.clear()
                item = None
                if not runs:
                    item = self._queue.popleft()
                    if isinstance(item, Extent) and item.data is not None:
                        self._queued -= item.length
                    self._cond.notify_all()
            for start, end in runs:  # every run queued before the end, so before it
                yield Extent(start, end - start, None)
            if item is None:
                continue
            if item is _END:
                if self._error is not None:
                    raise self._error
                return
            assert isinstance(item, Extent)
            yield item
