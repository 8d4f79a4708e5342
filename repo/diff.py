"""What changed between two snapshots of a VM: per disk, the byte ranges whose chunks differ."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .manifest import split_page
from .repository import Repository
from .snapshots import Snapshot


@dataclass
class DiskDiff:
    name: str
    #: ``same``, ``changed``, ``added`` (only in the newer), ``removed``, ``resized``.
    state: str
    size_a: int | None = None
    size_b: int | None = None
    ranges: list[tuple[int, int]] = field(default_factory=list)

    @property
    def changed_bytes(self) -> int:
        return sum(end - start for start, end in self.ranges)

    def as_dict(self) -> dict[str, Any]:
        return {"disk": self.name, "state": self.state, "size_a": self.size_a,
                "size_b": self.size_b, "changed_bytes": self.changed_bytes,
                "ranges": [[s, e] for s, e in self.ranges]}


def diff(repo: Repository, a: Snapshot, b: Snapshot) -> list[DiskDiff]:
    """Per disk of either snapshot: how the disk differs from ``a`` to ``b``."""
    out = []
    names = [d.name for d in a.disks] + [d.name for d in b.disks if a.disk(d.name) is None]
    for name in names:
        da, db = a.disk(name), b.disk(name)
        if da is None or db is None:
            out.append(DiskDiff(name, "added" if da is None else "removed",
                                da.size if da else None, db.size if db else None))
            continue
        if da.size != db.size:
            out.append(DiskDiff(name, "resized", da.size, db.size, [(0, max(da.size, db.size))]))
            continue
        ma, mb = repo.manifest(da.root), repo.manifest(db.root)
        result = DiskDiff(name, "same", da.size, db.size)
        if da.root != db.root:
            for page_no, (pa, pb) in enumerate(zip(ma.page_ids, mb.page_ids, strict=True)):
                if pa == pb:
                    continue
                first, count = ma.page_span(page_no)
                ids_a = split_page(repo.page(ma, page_no), count, f"page {page_no}")
                ids_b = split_page(repo.page(mb, page_no), count, f"page {page_no}")
                for slot, (x, y) in enumerate(zip(ids_a, ids_b, strict=True)):
                    if x == y:
                        continue
                    start = (first + slot) * ma.chunk_size
                    end = start + ma.chunk_length(first + slot)
                    if result.ranges and result.ranges[-1][1] == start:
                        result.ranges[-1] = (result.ranges[-1][0], end)
                    else:
                        result.ranges.append((start, end))
            result.state = "changed" if result.ranges else "same"
        out.append(result)
    return out
