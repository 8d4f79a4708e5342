"""Disk manifests: a two-level tree naming every chunk of a disk.

A *page* is a blob holding the 32-byte ids of ``page_entries`` consecutive
chunks (the last page may hold fewer); an all-zero id marks an all-zero
chunk. The *root* is a blob (msgpack) with the disk size, the chunk size,
the page size and the ids of all pages in order. Pages are deduplicated like
chunks, so a snapshot that changed little writes few new pages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgpack

from .errors import IntegrityError
from .format import ID_SIZE, ZERO_ID

#: Stores a page or root blob and returns its id.
StoreBlob = Callable[[bytes], bytes]


def chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


@dataclass(frozen=True)
class Manifest:
    """A decoded manifest root."""

    size: int
    chunk_size: int
    page_entries: int
    page_ids: tuple[bytes, ...]

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def page_span(self, page_no: int) -> tuple[int, int]:
        """First chunk index and number of chunks of page ``page_no``."""
        first = page_no * self.page_entries
        return first, min(self.page_entries, self.chunks - first)

    def encode(self) -> bytes:
        out: bytes = msgpack.packb(
            {
                "v": 1,
                "size": self.size,
                "chunk_size": self.chunk_size,
                "page_entries": self.page_entries,
                "pages": b"".join(self.page_ids),
            },
            use_bin_type=True,
        )
        return out

    @classmethod
    def decode(cls, raw: bytes, what: str) -> Manifest:
        try:
            rec = msgpack.unpackb(raw, raw=False)
            if rec["v"] != 1:
                raise ValueError(f"version {rec['v']}")
            pages = bytes(rec["pages"])
            m = cls(
                int(rec["size"]), int(rec["chunk_size"]), int(rec["page_entries"]),
                tuple(pages[i : i + ID_SIZE] for i in range(0, len(pages), ID_SIZE)),
            )
        except (ValueError, KeyError, TypeError, msgpack.ExtraData) as exc:
            raise IntegrityError(f"{what}: malformed manifest root ({exc})", key=what) from exc
        expected = (m.chunks + m.page_entries - 1) // m.page_entries if m.page_entries else -1
        if m.size < 0 or m.chunk_size <= 0 or len(m.page_ids) != expected:
            raise IntegrityError(f"{what}: manifest root does not add up", key=what)
        return m


def split_page(page: bytes, expected: int, what: str) -> list[bytes]:
    """Split a page blob into chunk ids, checking its length."""
    if len(page) != expected * ID_SIZE:
        raise IntegrityError(f"{what}: page holds {len(page)} bytes, expected "
                             f"{expected * ID_SIZE}", key=what)
    return [page[i : i + ID_SIZE] for i in range(0, len(page), ID_SIZE)]


class ManifestBuilder:
    """Collects chunk ids for one disk and stores the pages and root.

    Without a base every chunk starts as a zero chunk; with a base (a
    changes-only pass) chunks not set keep the base's id and pages never
    touched keep the base's page id without being read. Pages of a full pass
    are stored as soon as all their chunks are set, so memory stays bounded.
    """

    def __init__(self, size: int, chunk_size: int, page_entries: int, store_page: StoreBlob,
                 load_page: Callable[[int], bytes] | None = None,
                 base: Manifest | None = None) -> None:
        if base is not None and (base.size != size or base.chunk_size != chunk_size
                                 or base.page_entries != page_entries):
            raise ValueError("base manifest has another geometry")
        self.shape = Manifest(size, chunk_size, page_entries, ())
        self._store_page = store_page
        self._load_page = load_page
        self._base = base
        self._pages: dict[int, bytearray] = {}
        self._set_flags: dict[int, bytearray] = {}
        self._set_count: dict[int, int] = {}
        self._done: dict[int, bytes] = {}
        self.pages_written = 0

    def set(self, index: int, chunk_id: bytes) -> None:
        page_no, slot = divmod(index, self.shape.page_entries)
        page, count = self._page(page_no, index)
        page[slot * ID_SIZE : (slot + 1) * ID_SIZE] = chunk_id
        flags = self._set_flags[page_no]
        if not flags[slot]:
            flags[slot] = 1
            self._set_count[page_no] += 1
            if self._set_count[page_no] == count:
                self._flush(page_no)

    def set_zeros(self, first: int, end: int) -> None:
        """Chunks ``first`` to ``end - 1`` are zero chunks (as a ``set`` of each to
        ``ZERO_ID`` would say, page by page: a hole of a terabyte costs no more than its
        pages)."""
        pe = self.shape.page_entries
        index = first
        while index < end:
            page_no, slot = divmod(index, pe)
            page_first, count = self.shape.page_span(page_no)
            stop = min(end, page_first + count)
            n = stop - index
            if n == count and self._base is None and page_no not in self._pages \
                    and page_no not in self._done:
                index = stop  # a page a full pass never touches is stored as zeros at finish
                continue
            page, _ = self._page(page_no, index)
            page[slot * ID_SIZE : (slot + n) * ID_SIZE] = ZERO_ID * n
            flags = self._set_flags[page_no]
            self._set_count[page_no] += n - flags.count(1, slot, slot + n)
            flags[slot : slot + n] = b"\x01" * n
            if self._set_count[page_no] == count:
                self._flush(page_no)
            index = stop

    def _page(self, page_no: int, index: int) -> tuple[bytearray, int]:
        """Page ``page_no`` being filled (made on first use) and its number of chunks."""
        if page_no in self._done:
            raise ValueError(f"chunk {index} set after its page was stored")
        page = self._pages.get(page_no)
        _, count = self.shape.page_span(page_no)
        if page is None:
            if self._base is not None and self._load_page is not None:
                page = bytearray(self._load_page(page_no))
            else:
                page = bytearray(count * ID_SIZE)
            self._pages[page_no] = page
            self._set_flags[page_no] = bytearray(count)
            self._set_count[page_no] = 0
        return page, count

    def _flush(self, page_no: int) -> None:
        page = self._pages.pop(page_no)
        del self._set_flags[page_no], self._set_count[page_no]
        self._done[page_no] = self._store_page(bytes(page))
        self.pages_written += 1

    def finish(self) -> Manifest:
        """Store the remaining pages; return the manifest (the caller stores its root)."""
        for page_no in sorted(self._pages):
            self._flush(page_no)
        pages = (self.shape.chunks + self.shape.page_entries - 1) // self.shape.page_entries
        ids = []
        for page_no in range(pages):
            pid = self._done.get(page_no)
            if pid is None:
                if self._base is not None:
                    pid = self._base.page_ids[page_no]
                else:
                    _, count = self.shape.page_span(page_no)
                    pid = self._store_page(ZERO_ID * count)
                    self.pages_written += 1
            ids.append(pid)
        s = self.shape
        return Manifest(s.size, s.chunk_size, s.page_entries, tuple(ids))


def iter_chunks(manifest: Manifest, load_page: Callable[[int], bytes],
                pages: Iterator[int] | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(chunk_index, chunk_id)`` for the given pages (default: all)."""
    for page_no in pages if pages is not None else range(len(manifest.page_ids)):
        first, count = manifest.page_span(page_no)
        ids = split_page(load_page(page_no), count, f"page {page_no}")
        for slot, cid in enumerate(ids):
            yield first + slot, cid
