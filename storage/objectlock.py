"""Object lock: stores that keep objects from being deleted or overwritten until a date.

A backend that can (S3 with Object Lock) returns an :class:`ObjectLock` from
:meth:`~vmrepo.storage.base.Backend.object_lock`. Once :meth:`ObjectLock.apply`
was called with a :class:`Retention`, every object the backend writes, except
under the exempt prefixes, is retained for ``days`` from its writing; deleting
a retained object only hides it (its bytes stay until the date, then
:meth:`ObjectLock.purge` removes them); :meth:`ObjectLock.extend` pushes an
object's date further out. Nothing here knows what the objects are: the
caller names the exempt prefixes and what to extend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime

MODES = ("governance", "compliance")


@dataclass(frozen=True)
class Retention:
    """How long new objects are retained, and which keys are written without retention."""

    days: int
    mode: str = "governance"
    exempt: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"object lock mode must be one of {', '.join(MODES)}, "
                             f"not {self.mode!r}")
        if not 1 <= self.days <= 36500:
            raise ValueError(f"object lock days must be between 1 and 36500, not {self.days}")

    def covers(self, key: str) -> bool:
        return not key.startswith(self.exempt)


@dataclass
class PurgeReport:
    """What :meth:`ObjectLock.purge` removed, and what is still retained."""

    versions_deleted: int = 0
    bytes_deleted: int = 0
    versions_retained: int = 0
    bytes_retained: int = 0
    #: When the soonest still retained version may go.
    next_release: datetime | None = None


class ObjectLock(ABC):
    """The object lock of one store (see the module docstring)."""

    @abstractmethod
    def enable(self) -> None:
        """Turn object lock on for the store (versioning included), where it is not yet."""

    @abstractmethod
    def apply(self, retention: Retention) -> None:
        """Retain every object written from now on as ``retention`` says; StorageError if
        the store has no object lock."""

    @abstractmethod
    def retained_until(self, key: str) -> datetime | None:
        """The date until which the object's current version is retained (None: not, or
        no longer, retained)."""

    @abstractmethod
    def extend(self, key: str, until: datetime) -> None:
        """Retain the object's current version until ``until`` (never shortens)."""

    @abstractmethod
    def purge(self, prefix: str, now: datetime) -> PurgeReport:
        """Delete the hidden and replaced versions under ``prefix`` whose retention passed."""
