"""Rewriting the index without some packs: segments merged, superseded ones deleted.

Used by prune's sweep (the packs it deletes) and by repair (damaged packs it drops). The
rules are docs/format.md §6 (supersedes) and §13.2: new segments first, each superseding
only segments all of whose remaining entries it holds; then the superseded segments are
deleted; the packs go after that, by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vmrepo.storage.errors import ObjectNotFound

from .format import INDEX_PREFIX, index_key, parse_hex_name
from .segments import ENTRY, MAX_SEGMENT_ENTRIES, Segment, encode_packed
from .store import RepoStore

#: Segments with fewer entries are merged into the segments a rewrite writes.
SMALL_SEGMENT = 1 << 14


def drop_packs(store: RepoStore, delete: set[bytes],
               check: Callable[[], None] | None = None) -> tuple[int, int]:
    """Replace the segments naming packs in ``delete`` (and the small ones) by segments
    without them, then delete the superseded segments; return how many segments were
    replaced and written. Each new segment supersedes only segments whose every remaining
    entry it holds, so a crash between writes loses no entry."""
    replaced = written = 0
    listing = store.listing(INDEX_PREFIX, lambda k: parse_hex_name(k, INDEX_PREFIX) is not None)
    present = {bytes.fromhex(i.key[len(INDEX_PREFIX):]) for i in listing}
    superseded: set[bytes] = set()
    plan: list[tuple[bytes, int]] = []  # (segment, entries it keeps)
    touched = 0
    for sid in sorted(present):
        try:
            seg = store.load_segment(sid)
        except ObjectNotFound:
            continue
        superseded |= set(seg.supersedes)
        if delete.intersection(seg.packs):
            plan.append((sid, _kept_entries(seg, delete)))
            touched += 1
        elif len(seg) < SMALL_SEGMENT:
            plan.append((sid, len(seg)))
    plan = [(sid, keep) for sid, keep in plan if sid not in superseded]
    if not touched and len(plan) < 2:
        plan = []  # nothing to take out of the index and nothing worth merging
    for group in _groups(plan):
        if check is not None:
            check()
        segs = [(sid, store.load_segment(sid)) for sid in group]
        if sum(len(s) for _, s in segs) or len(group) > 1:
            ids, sizes, entries = _merged(segs, delete)
            if entries:
                key, raw = encode_packed(store.codec, store.hasher, ids, sizes, entries,
                                         supersedes=sorted(group))
                store.put_segment(key, raw)
                written += 1
        for sid in group:
            store.delete(index_key(sid))
            replaced += 1
    for sid in sorted(superseded & present):  # leftovers of an interrupted rewrite
        store.delete(index_key(sid))
    return replaced, written


def _kept_entries(seg: Segment, delete: set[bytes]) -> int:
    gone = {ref for ref, pid in enumerate(seg.packs) if pid in delete}
    return sum(1 for rec in seg.records() if rec[1] not in gone)


def _groups(plan: list[tuple[bytes, int]]) -> Iterable[list[bytes]]:
    group: list[bytes] = []
    size = 0
    for sid, keep in plan:
        if group and size + keep > MAX_SEGMENT_ENTRIES:
            yield group
            group, size = [], 0
        group.append(sid)
        size += keep
    if group:
        yield group


def _merged(segs: list[tuple[bytes, Segment]], delete: set[bytes]
            ) -> tuple[list[bytes], list[int | None], bytes]:
    """Packs, sizes and sorted entries of ``segs`` without the packs in ``delete``."""
    numbers: dict[bytes, int] = {}
    sizes: list[int | None] = []
    records: list[bytes] = []
    for _, seg in segs:
        refs: list[int | None] = []
        for pid, size in zip(seg.packs, seg.pack_sizes, strict=True):
            if pid in delete:
                refs.append(None)
                continue
            if pid not in numbers:
                numbers[pid] = len(numbers)
                sizes.append(size)
            refs.append(numbers[pid])
        for bid, ref, off, length, raw, btype in seg.records():
            new = refs[ref]
            if new is not None:
                records.append(ENTRY.pack(bid, new, off, length, raw, btype))
    records.sort()
    return list(numbers), sizes, b"".join(records)
