"""The source interface: what a source plugin gives the core for one snapshot.

A snapshot of a VM goes through one :class:`Source` object:

1. ``begin(context)`` fixes the point in time and returns one
   :class:`DiskStream` per disk. The context tells the source the
   repository's chunk size and identity and, per disk, the snapshots already
   committed, so that a source with change tracking can decide between a
   full read and a read of changes only.
2. The core drains each stream's ``extents()``. Extents never overlap and
   may arrive in any order and in pieces of any size. An extent with
   ``data is None`` is a run of zeros. In a *full* stream, areas no extent
   covers are zeros; in a *changes* stream they are unchanged since the
   snapshot named by ``base_snapshot``.
3. ``finish(committed)`` is called exactly once: with ``True`` after the
   snapshot record is durable, with ``False`` after any failure. On
   ``False`` the source must arrange that its next snapshot still sees every
   change since the last committed one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["full", "changes"]
#: Extent payloads: bytes, or a bytearray a reader received into (not reused after).
Data = bytes | bytearray
Wanted = Literal["auto", "full", "differential"]


@dataclass(frozen=True)
class Extent:
    """A byte range of a disk: ``data`` holds its bytes, or is None for zeros."""

    offset: int
    length: int
    data: Data | None = None


@dataclass(frozen=True)
class PriorSnapshot:
    """A committed snapshot of one disk, as the core tells a source about it."""

    snapshot_id: str
    size: int
    full: bool


@dataclass(frozen=True)
class BackupContext:
    """What the core tells a source when a snapshot begins."""

    repository_id: str
    chunk_size: int
    snapshot_id: str
    wanted: Wanted = "auto"
    #: Per disk name, committed snapshots of that disk, newest first.
    history: Mapping[str, list[PriorSnapshot]] = field(default_factory=dict)


class DiskStream(ABC):
    """One disk of a snapshot in progress."""

    name: str
    size: int
    mode: Mode
    #: Why the disk is read this way, e.g. "full: no bitmap yet".
    reason: str
    #: For ``mode == "changes"``: the snapshot whose content fills the gaps.
    base_snapshot: str | None = None

    @abstractmethod
    def extents(self) -> Iterator[Extent]:
        """Yield the disk's extents, non-overlapping, in any order."""

    def report(self) -> dict[str, Any]:
        """Figures the source measured for this disk, stored in the record."""
        return {}

    def work_bytes(self) -> int:
        """How many bytes of data this pass will read, as well as the source can tell before
        (zeros and holes do not count; the whole disk unless the source knows better)."""
        return self.size


class ChangeTracking(ABC):
    """A source that keeps change-tracking state (dirty bitmaps) in the VM."""

    @abstractmethod
    def list_bitmaps(self) -> list[dict[str, Any]]:
        """vmrepo's bitmaps on the VM, each with ``node``, ``name``, ``repository`` and state."""

    @abstractmethod
    def remove_bitmaps(self, repository_id: str | None) -> list[dict[str, Any]]:
        """Remove the bitmaps of one repository (``None``: of every repository)."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection to the VM."""


class Source(ABC):
    """A source plugin bound to one VM's settings."""

    #: The plugin name, as used in the config's ``source = "..."``.
    plugin: str = ""
    #: The keys a VM's table may hold for this plugin (besides the core's own, ``source``).
    settings_keys: frozenset[str] = frozenset()

    @classmethod
    @abstractmethod
    def from_config(cls, vm: str, settings: Mapping[str, Any]) -> Source:
        """Build the source of VM ``vm`` from its config table.

        Raises :class:`~vmrepo.sources.errors.SourceConfigError` when the
        settings are incomplete or wrong.
        """

    @abstractmethod
    def begin(self, context: BackupContext) -> list[DiskStream]:
        """Fix the point in time and return the disks to read."""

    @abstractmethod
    def finish(self, committed: bool) -> None:
        """Commit or roll back the source's change tracking; called exactly once."""

    def info(self) -> dict[str, Any]:
        """What the source reports about the VM, stored in the snapshot record."""
        return {}
