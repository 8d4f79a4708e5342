"""Source errors.

::

    SourceError
     ├── SourceConfigError   the VM's source settings are wrong
     ├── DiskUnreadable      a disk cannot be opened or read
     └── SourceUnavailable   the VM or its control channel cannot be reached
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


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


@contextlib.contextmanager
def ignored(log: logging.Logger, what: str, *errors: type[BaseException]) -> Iterator[None]:
    """Suppress ``errors`` in the block, leaving a debug line that says what was ignored."""
    try:
        yield
    except errors as exc:
        log.debug("%s: ignored %s: %s", what, type(exc).__name__, exc)
