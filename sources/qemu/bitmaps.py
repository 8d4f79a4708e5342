"""The dirty-bitmap rules that keep incremental snapshots correct (pure functions).

vmrepo names each of its bitmaps after the repository and the snapshot whose
point in time the bitmap starts at: ``vmrepo-<repo16>-<snap32>`` (the first
16 hex digits of the repository id, the first 32 of the snapshot id).
Temporary frozen copies used during one backup are ``vmrepo-<repo16>-tmp-<snap32>``.

Every snapshot creates the bitmap named after itself, atomically with the
start of its backup, and reads changes from an older bitmap without
clearing it (so a failed backup loses nothing). After a commit, a disk keeps
two bitmaps of this repository: the newest (for incrementals) and the one of
the latest full snapshot (for differentials).

A disk is read incrementally only when the bitmap named after the snapshot
it builds on is present, persistent, enabled, consistent, not busy, of the
repository's chunk size, and the disk kept its size; otherwise it falls back
to a full read with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..base import Mode, PriorSnapshot, Wanted
from ..units import human_bytes

PREFIX = "vmrepo-"
_NAME_RE = re.compile(r"vmrepo-([0-9a-f]{16})-(tmp-)?([0-9a-f]{32})")


def bitmap_name(repository_id: str, snapshot_id: str) -> str:
    return f"{PREFIX}{repository_id[:16]}-{snapshot_id[:32]}"


def temp_bitmap_name(repository_id: str, snapshot_id: str) -> str:
    return f"{PREFIX}{repository_id[:16]}-tmp-{snapshot_id[:32]}"


@dataclass(frozen=True)
class ParsedName:
    repository: str
    snapshot: str
    temporary: bool


def parse_name(name: str) -> ParsedName | None:
    m = _NAME_RE.fullmatch(name)
    if not m:
        return None
    return ParsedName(m.group(1), m.group(3), bool(m.group(2)))


@dataclass(frozen=True)
class BitmapInfo:
    """A dirty bitmap as QEMU reports it."""

    name: str
    granularity: int
    count: int
    recording: bool
    busy: bool
    persistent: bool
    inconsistent: bool

    @classmethod
    def from_qmp(cls, d: Mapping[str, Any]) -> BitmapInfo:
        return cls(str(d.get("name", "")), int(d.get("granularity", 0)), int(d.get("count", 0)),
                   bool(d.get("recording", False)), bool(d.get("busy", False)),
                   bool(d.get("persistent", False)), bool(d.get("inconsistent", False)))


@dataclass(frozen=True)
class Plan:
    """How one disk is read in this snapshot."""

    mode: Mode
    reason: str
    #: The bitmap whose dirty bits are read (changes only).
    source_bitmap: str | None = None
    #: The snapshot the unchanged areas come from (changes only).
    base_snapshot: str | None = None
    #: True when changes were wanted but the disk must be read in full.
    fallback: bool = False


def _mine(bitmaps: Iterable[BitmapInfo], repository_id: str) -> list[tuple[BitmapInfo, ParsedName]]:
    out = []
    for b in bitmaps:
        parsed = parse_name(b.name)
        if parsed and parsed.repository == repository_id[:16]:
            out.append((b, parsed))
    return out


def plan_disk(*, size: int, bitmaps: Sequence[BitmapInfo], repository_id: str, chunk_size: int,
              history: Sequence[PriorSnapshot], wanted: Wanted) -> Plan:
    """Decide between a full read and a read of changes for one disk."""
    if wanted == "full":
        return Plan("full", "full snapshot requested")
    if not history:
        return Plan("full", "first snapshot of this disk")
    if wanted == "differential":
        base = next((h for h in history if h.full), None)
        if base is None:
            return Plan("full", "no full snapshot of this disk to build a differential on",
                        fallback=True)
        kind = "differential"
    else:
        base = history[0]
        kind = "incremental"

    def fall(why: str) -> Plan:
        return Plan("full", f"full instead of {kind}: {why}", fallback=True)

    if base.size != size:
        return fall(f"disk resized from {human_bytes(base.size)} to {human_bytes(size)}")
    name = bitmap_name(repository_id, base.snapshot_id)
    found = next((b for b in bitmaps if b.name == name), None)
    if found is None:
        known = {h.snapshot_id[:32] for h in history}
        ours = [(b, n) for b, n in _mine(bitmaps, repository_id) if not n.temporary]
        gone = [b.name for b, n in ours if n.snapshot not in known]
        if gone:
            return fall(f"bitmap {gone[0]} starts from a snapshot that is no longer in the "
                        f"repository, and the bitmap of snapshot {base.snapshot_id[:8]} is "
                        "missing")
        mine = {b.name for b, _ in _mine(bitmaps, repository_id)}
        foreign = [b.name for b in bitmaps if b.name.startswith(PREFIX) and b.name not in mine]
        if foreign:
            return fall(f"bitmap {name} is missing; the disk has only bitmaps of other "
                        f"repositories ({', '.join(sorted(foreign))})")
        return fall(f"bitmap {name} of snapshot {base.snapshot_id[:8]} is missing")
    if found.inconsistent:
        return fall(f"bitmap {name} is inconsistent (QEMU stopped uncleanly)")
    if found.busy:
        return fall(f"bitmap {name} is busy (in use by another job or export)")
    if not found.recording:
        return fall(f"bitmap {name} is disabled and may have missed writes")
    if not found.persistent:
        return fall(f"bitmap {name} is not persistent, so it was not made by vmrepo")
    if found.granularity != chunk_size:
        return fall(f"bitmap {name} has granularity {found.granularity}, the repository's "
                    f"chunk size is {chunk_size}")
    return Plan("changes", f"changes since snapshot {base.snapshot_id[:8]} "
                f"({human_bytes(found.count)} dirty)", name, base.snapshot_id)


def stale_bitmaps(bitmaps: Sequence[BitmapInfo], repository_id: str,
                  committed: Iterable[str]) -> list[str]:
    """This repository's bitmaps a new snapshot should remove before it starts.

    Temporary bitmaps, inconsistent ones, and those named after snapshots that
    are not committed (left by an interrupted run, or forgotten since).
    """
    known = {s[:32] for s in committed}
    return [b.name for b, n in _mine(bitmaps, repository_id)
            if n.temporary or b.inconsistent or n.snapshot not in known]


def superseded_bitmaps(bitmaps: Sequence[BitmapInfo], repository_id: str,
                       keep: Iterable[str]) -> list[str]:
    """This repository's bitmaps to remove once a snapshot has committed."""
    keep_set = set(keep)
    return [b.name for b, _ in _mine(bitmaps, repository_id) if b.name not in keep_set]
