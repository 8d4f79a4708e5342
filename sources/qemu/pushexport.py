"""The receiving end of QEMU's push: an NBD export that turns writes into extents.

QEMU's backup job writes the disk into this export (WRITE and
WRITE_ZEROES, out of order, in pieces). Each request is queued as an
:class:`~vmrepo.sources.base.Extent` before it is acknowledged, and the
queue holds at most ``budget`` bytes, so a slow consumer slows QEMU down
instead of growing memory. Zeroes that continue the zeroes queued last join
them, so a hole sent as a hundred thousand requests reaches the consumer as
a few extents. The consumer drains :meth:`PushExport.extents`
until :meth:`end` is called.
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
            last = self._queue[-1] if self._queue else None
            if extent.data is None and isinstance(last, Extent) and last.data is None \
                    and last.offset + last.length == extent.offset:
                # QEMU sends a hole as many write-zeroes of 1 MiB: one extent for the run.
                self._queue[-1] = Extent(last.offset, last.length + extent.length, None)
            else:
                self._queue.append(extent)
            self._queued += cost
            self.bytes_received += extent.length
            self.requests += 1
            self._cond.notify_all()

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
                while not self._queue and not self._aborted:
                    self._cond.wait()
                if self._aborted:
                    raise SourceError(f"disk {self.name}: the backup was aborted", self.name)
                item = self._queue.popleft()
                if isinstance(item, Extent) and item.data is not None:
                    self._queued -= item.length
                self._cond.notify_all()
            if item is _END:
                if self._error is not None:
                    raise self._error
                return
            assert isinstance(item, Extent)
            yield item
