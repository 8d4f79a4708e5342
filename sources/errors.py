"""Source errors.

::

    SourceError
     ├── SourceConfigError   the VM's source settings are wrong
     ├── DiskUnreadable      a disk cannot be opened or read
     └── SourceUnavailable   the VM or its control channel cannot be reached
"""

from __future__ import annotations


class SourceError(Exception):
    """Base of all source errors; ``disk`` names the disk concerned, if any."""

    def __init__(self, message: str, disk: str | None = None) -> None:
        super().__init__(message)
        self.disk = disk


class SourceConfigError(SourceError):
    """The source settings of a VM are missing or invalid."""


class DiskUnreadable(SourceError):
    """A disk could not be opened, examined or read."""


class SourceUnavailable(SourceError):
    """The VM or the channel used to control it cannot be reached."""
