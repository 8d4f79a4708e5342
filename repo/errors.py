"""Errors of the vmrepo core, each carrying the data a caller needs.

::

    VmrepoError
     ├── RepositoryNotFound     no repository at the location
     ├── RepositoryExists       init over an existing repository
     ├── IncompatibleRepository newer format or a required feature we lack
     ├── IntegrityError         an object failed its checks (hash, magic, shape)
     ├── RepositoryLocked       a conflicting lock is held
     ├── LockLost               our own lock could not be refreshed: the operation stopped
     ├── SpecError              a malformed VM@WHEN spec
     ├── SnapshotNotFound       a spec matched nothing (carries the candidates)
     ├── AmbiguousSnapshot      a spec matched several (carries the candidates)
     ├── ConfigError            config file missing, unreadable or invalid; unknown VM
     ├── RestoreError           output exists, sizes differ, backing image differs, qemu-img failed
     ├── RestoreIncomplete      a salvage restore wrote zeros where data was damaged
     ├── OutputError            the output cannot be written: no space, read-only, permission, I/O
     ├── ExtentError            a source sent an extent outside its disk or overlapping another
     ├── SomeFailed             a command over several VMs failed for some of them
     ├── WrongPassphrase        no key of an encrypted repository opens with the passphrase
     ├── NoPassphrase           an encrypted repository needs a passphrase and none can be read
     ├── KeyNotFound            no key (or several) matches the id given
     ├── KeyRefused             a key change that would lock people out, repeat a key or
     │                          put a key file inside the repository
     └── Interrupted            the operation was stopped by a signal

Storage and source errors come from their own packages and are not wrapped.
"""

from __future__ import annotations

from collections.abc import Sequence


class VmrepoError(Exception):
    """Base of the core's errors."""


class RepositoryNotFound(VmrepoError):
    def __init__(self, location: str, hint: str = "run `vmrepo init` first") -> None:
        super().__init__(f"no repository at {location} ({hint})")
        self.location = location


class RepositoryExists(VmrepoError):
    """``init`` over a repository, or over a location that holds something else."""

    def __init__(self, location: str, not_empty: Sequence[str] = ()) -> None:
        if not_empty:
            super().__init__(f"{location} is not empty and not a vmrepo repository (it holds "
                             f"{', '.join(not_empty)}...): choose an empty or new location")
        else:
            super().__init__(f"a repository already exists at {location}")
        self.location = location
        self.not_empty = list(not_empty)


class IncompatibleRepository(VmrepoError):
    def __init__(self, message: str, version: int | None = None,
                 features: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.version = version
        self.features = list(features)


class IntegrityError(VmrepoError):
    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class RepositoryLocked(VmrepoError):
    def __init__(self, message: str, holders: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.holders = list(holders)


class LockLost(VmrepoError):
    def __init__(self, message: str, lock: str | None = None) -> None:
        super().__init__(message)
        self.lock = lock


class SpecError(VmrepoError):
    def __init__(self, spec: str, why: str) -> None:
        super().__init__(f"invalid snapshot spec {spec!r}: {why}")
        self.spec = spec


class SnapshotNotFound(VmrepoError):
    def __init__(self, spec: str, candidates: Sequence[str] = (),
                 message: str | None = None) -> None:
        msg = message or f"no snapshot matches {spec}"
        if candidates:
            msg += "; snapshots of this VM: " + ", ".join(candidates)
        super().__init__(msg)
        self.spec = spec
        self.candidates = list(candidates)

    @classmethod
    def of_vm(cls, vm: str) -> SnapshotNotFound:
        """A VM named (without @WHEN) that has no snapshot."""
        return cls(vm, message=f"no snapshot of VM {vm}")


class AmbiguousSnapshot(VmrepoError):
    def __init__(self, spec: str, candidates: Sequence[str]) -> None:
        super().__init__(f"{spec} matches several snapshots: " + ", ".join(candidates))
        self.spec = spec
        self.candidates = list(candidates)


class ConfigError(VmrepoError):
    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class RestoreError(VmrepoError):
    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class RestoreIncomplete(VmrepoError):
    """``restore --allow-damaged`` finished, with damaged ranges written as zeros (the
    report, JSON included, was printed)."""

    emitted = True

    def __init__(self, message: str, ranges: Sequence[tuple[str, tuple[int, int]]] = ()) -> None:
        super().__init__(message)
        self.ranges = list(ranges)


class OutputError(VmrepoError):
    """Writing a restore's output (or another file the command makes) failed; the partial
    output was removed."""

    def __init__(self, message: str, path: str | None = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


class ExtentError(VmrepoError):
    """A source broke its contract: an extent outside the disk or overlapping another."""

    def __init__(self, message: str, disk: str | None = None) -> None:
        super().__init__(message)
        self.disk = disk


class SomeFailed(VmrepoError):
    """Some of the items a command worked through failed (each was reported, and the
    command's output, JSON included, already says which)."""

    emitted = True


class WrongPassphrase(VmrepoError):
    """The passphrase opens no key of the repository (or could not be read)."""


class NoPassphrase(VmrepoError):
    """A passphrase is needed but there is neither a source nor a terminal to ask on."""


class KeyNotFound(VmrepoError):
    """No key record (or more than one) matches what was given."""


class KeyRefused(VmrepoError):
    """A key change refused: removing the only key, the last passphrase or the key in use,
    `passwd` under a key file, a new passphrase that a key already has, or a key file to be
    written inside the repository."""

    def __init__(self, message: str, key_id: str | None = None) -> None:
        super().__init__(message)
        self.key_id = key_id


class Interrupted(VmrepoError):
    def __init__(self, signal_name: str = "SIGINT") -> None:
        super().__init__(f"interrupted by {signal_name}")
        self.signal_name = signal_name
