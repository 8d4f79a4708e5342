"""What the repository holds: sizes, dedup and compression ratios, what each snapshot adds.

* *logical* bytes: what the snapshots' disks hold, all-zero chunks excepted,
  summed over every snapshot (what restoring all of them would write);
* *unique* bytes: the plaintext of the distinct blobs the snapshots reference;
* *stored* bytes: what those blobs take in the repository (compressed);
* per snapshot, *added* bytes (what it stored when it was taken, from its
  record) and *exclusive* bytes (blobs no other snapshot references: what
  forgetting it alone would free).

Counting runs over every manifest with one counter byte per indexed blob
(numbered by :class:`~vmrepo.index.Ordinals`), so memory grows with the
number of blobs, not with their ids.
"""

from __future__ import annotations

import array
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .format import INDEX_PREFIX, PACK_PREFIX, SNAPSHOT_PREFIX, ZERO_ID
from .manifest import Manifest, iter_chunks
from .repository import Repository
from .snapshots import Snapshot


@dataclass
class SnapshotFigures:
    id: str
    vm: str
    logical: int = 0
    added: int = 0
    exclusive_raw: int = 0
    exclusive_stored: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RepositoryFigures:
    snapshots: int = 0
    packs: int = 0
    pack_bytes: int = 0
    index_segments: int = 0
    index_bytes: int = 0
    snapshot_record_bytes: int = 0
    logical: int = 0
    unique_raw: int = 0
    unique_stored: int = 0
    blobs_referenced: int = 0
    missing: int = 0
    per_snapshot: list[SnapshotFigures] = field(default_factory=list)

    @property
    def dedup_ratio(self) -> float:
        return self.logical / self.unique_raw if self.unique_raw else 0.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_raw / self.unique_stored if self.unique_stored else 0.0

    @property
    def unreferenced_bytes(self) -> int:
        return max(0, self.pack_bytes - self.unique_stored)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "per_snapshot"}
        out.update(dedup_ratio=round(self.dedup_ratio, 3),
                   compression_ratio=round(self.compression_ratio, 3),
                   unreferenced_bytes=self.unreferenced_bytes,
                   per_snapshot=[s.as_dict() for s in self.per_snapshot])
        return out


def _blobs_of(repo: Repository, snap: Snapshot) -> list[tuple[bytes, Manifest]]:
    return [(d.root, repo.manifest(d.root)) for d in snap.disks]


def gather(repo: Repository, snaps: Sequence[Snapshot]) -> RepositoryFigures:
    """Figures of the whole repository (all of ``snaps``)."""
    figs = RepositoryFigures(snapshots=len(snaps))
    for info in repo.store.listing(PACK_PREFIX):
        figs.packs += 1
        figs.pack_bytes += info.size
    for info in repo.store.listing(INDEX_PREFIX):
        figs.index_segments += 1
        figs.index_bytes += info.size
    figs.snapshot_record_bytes = sum(i.size for i in repo.store.listing(SNAPSHOT_PREFIX))
    ordinals = repo.index.ordinals()
    count = bytearray(ordinals.size)  # snapshots referencing each blob, up to 255
    last = array.array("i", [-1]) * ordinals.size  # the last snapshot that counted it
    raw = array.array("I", [0]) * ordinals.size
    stored = array.array("I", [0]) * ordinals.size

    def each_blob(s: int, snap: Snapshot, fig: SnapshotFigures | None) -> list[int]:
        numbers = []
        for root, manifest in _blobs_of(repo, snap):
            ids = [root, *manifest.page_ids]
            for index, cid in iter_chunks(manifest, functools.partial(repo.page, manifest)):
                if cid != ZERO_ID:
                    ids.append(cid)
                    if fig is not None:
                        fig.logical += manifest.chunk_length(index)
            for bid in ids:
                found = ordinals.of(bid)
                if found is None:
                    figs.missing += 1
                    continue
                n, loc = found
                raw[n], stored[n] = loc.raw_length, loc.length
                if last[n] != s:
                    last[n] = s
                    numbers.append(n)
        return numbers

    for s, snap in enumerate(snaps):
        fig = SnapshotFigures(snap.id, snap.vm, added=sum(
            int(d.stats.get("bytes_stored", 0)) + int(d.stats.get("bytes_manifest", 0))
            for d in snap.disks))
        figs.per_snapshot.append(fig)
        for n in each_blob(s, snap, fig):
            if count[n] < 255:
                count[n] += 1
        figs.logical += fig.logical
    for n in range(ordinals.size):
        if count[n]:
            figs.blobs_referenced += 1
            figs.unique_raw += raw[n]
            figs.unique_stored += stored[n]
    last = array.array("i", [-1]) * ordinals.size
    for s, (snap, fig) in enumerate(zip(snaps, figs.per_snapshot, strict=True)):
        for n in each_blob(len(snaps) + s, snap, None):
            if count[n] == 1:
                fig.exclusive_raw += raw[n]
                fig.exclusive_stored += stored[n]
    return figs
