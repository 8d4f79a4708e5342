"""What snapshots reference: every blob of their manifests (roots, pages, non-zero chunks)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator

from .format import ZERO_ID
from .index import Ordinals
from .manifest import iter_chunks
from .repository import Repository
from .snapshots import Snapshot


def blobs_of(repo: Repository, snap: Snapshot, seen_pages: set[bytes] | None = None
             ) -> Iterator[bytes]:
    """Every blob id ``snap`` references (with repeats). With ``seen_pages``, the chunks of a
    page already in it are not listed again (and the pages listed are added): snapshots
    of a disk that changed little share most pages."""
    for disk in snap.disks:
        yield disk.root
        manifest = repo.manifest(disk.root)
        yield from manifest.page_ids
        pages: list[int] | range = range(len(manifest.page_ids))
        if seen_pages is not None:
            pages = [n for n, pid in enumerate(manifest.page_ids) if pid not in seen_pages]
            seen_pages.update(manifest.page_ids)
        for _, cid in iter_chunks(manifest, functools.partial(repo.page, manifest), iter(pages)):
            if cid != ZERO_ID:
                yield cid


def mark_referenced(repo: Repository, snaps: Iterable[Snapshot], ordinals: Ordinals,
                    on_missing: Callable[[Snapshot, bytes], None]) -> bytearray:
    """One byte per indexed blob (by ordinal): 1 where some snapshot references it."""
    referenced = bytearray(ordinals.size)
    seen: set[bytes] = set()
    for snap in snaps:
        for bid in blobs_of(repo, snap, seen):
            found = ordinals.of(bid)
            if found is None:
                on_missing(snap, bid)
            else:
                referenced[found[0]] = 1
    return referenced
