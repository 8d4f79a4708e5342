"""Storage errors, one tree callers can act on by type.

::

    StorageError
     ├── InvalidKey          a key outside the allowed alphabet or shape
     ├── InvalidLocation     a URL or storage setting that names no usable store
     │    └── InvalidSetting a storage setting's value is unusable (names the setting)
     ├── ObjectNotFound      get/stat/delete of a key that does not exist
     ├── ObjectExists        create of a key that exists
     ├── StoragePermission   the backend refused access (permissions, read-only medium)
     ├── StorageFull         no space or quota left
     └── BackendUnavailable  the backend cannot be reached or failed an I/O (permanent)
          └── TransientError a failure that may succeed if retried: timeouts, throttling
                             (503 SlowDown), server errors, connection resets

Only :class:`TransientError` is worth retrying; the retry wrapper
(:mod:`vmrepo.storage.retry`) retries nothing else.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of all storage errors; ``key`` names the object concerned, if any."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class InvalidKey(StorageError):
    """A key that is not relative, lowercase and of ``[a-z0-9/._-]``."""


class InvalidLocation(StorageError):
    """A repository URL or storage setting that names no usable store: a mistake in the
    command line or the config, not a failure of the store."""


class InvalidSetting(InvalidLocation):
    """A storage setting from the config with a value the backend cannot use; the message
    names the setting but not the table it came from (the caller knows that)."""

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


class ObjectNotFound(StorageError):
    """The object does not exist."""


class ObjectExists(StorageError):
    """A create-if-absent found the object already present."""


class StoragePermission(StorageError):
    """The backend refused access to the object or location."""


class StorageFull(StorageError):
    """No space or quota left on the backend."""


class BackendUnavailable(StorageError):
    """The backend could not be reached or an I/O operation failed."""


class TransientError(BackendUnavailable):
    """A failure that may go away: retrying the same request can succeed."""
