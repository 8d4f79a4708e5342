"""The one table from errors to exit codes (documented in docs/exit-codes.md)."""

from __future__ import annotations

from vmrepo.sources.errors import SourceConfigError, SourceError
from vmrepo.sources.nbd.errors import NbdError
from vmrepo.storage.errors import InvalidLocation, StorageError

from . import errors as e

OK = 0
FAILURE = 1
USAGE = 2
CONFIG = 3
NO_SNAPSHOT = 4
RESTORE = 5
OUTPUT = 6
INCOMPLETE = 7
SOME_FAILED = 8
NO_REPOSITORY = 10
REPOSITORY_EXISTS = 11
LOCKED = 12
INCOMPATIBLE = 13
INTEGRITY = 14
LOCK_LOST = 15
WRONG_PASSPHRASE = 16
NO_PASSPHRASE = 17
SOURCE = 20
STORAGE = 21
INTERNAL = 70
INTERRUPTED = 130

#: First match wins, so subclasses come before their bases.
TABLE: list[tuple[type[BaseException], int]] = [
    (e.SpecError, USAGE),
    (e.ConfigError, CONFIG),
    (SourceConfigError, CONFIG),
    (e.SnapshotNotFound, NO_SNAPSHOT),
    (e.AmbiguousSnapshot, NO_SNAPSHOT),
    (e.RestoreError, RESTORE),
    (e.RestoreIncomplete, INCOMPLETE),
    (e.OutputError, OUTPUT),
    (e.RepositoryNotFound, NO_REPOSITORY),
    (e.RepositoryExists, REPOSITORY_EXISTS),
    (e.RepositoryLocked, LOCKED),
    (e.LockLost, LOCK_LOST),
    (e.WrongPassphrase, WRONG_PASSPHRASE),
    (e.NoPassphrase, NO_PASSPHRASE),
    (e.KeyNotFound, USAGE),
    (e.KeyRefused, USAGE),
    (e.ExtentError, SOURCE),
    (e.IncompatibleRepository, INCOMPATIBLE),
    (e.IntegrityError, INTEGRITY),
    (SourceError, SOURCE),
    (NbdError, SOURCE),
    (InvalidLocation, CONFIG),
    (StorageError, STORAGE),
    (e.Interrupted, INTERRUPTED),
    (e.SomeFailed, SOME_FAILED),
    (e.VmrepoError, FAILURE),
]


def exit_code(exc: BaseException) -> int | None:
    """The exit code of a foreseeable error, or None for a bug."""
    for cls, code in TABLE:
        if isinstance(exc, cls):
            return code
    return None
