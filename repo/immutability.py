"""Immutable repositories: S3 Object Lock applied to what vmrepo writes, and kept ahead.

A repository created with ``--object-lock-days N`` requires the feature
``object-lock`` (docs/format.md §4): every object vmrepo writes, except locks
and marks (which must be deletable), is retained for N days from its writing,
in governance or compliance mode. Whoever holds the credentials can hide an
object (a delete marker) but not destroy it before its date.

Retention must outlive the data's usefulness: :func:`extend_retention`
pushes the date of every object a repository still holds out to *now + N
days* once fewer than N/2 days are left, so copy and prune runs (which call
it) at least every N/2 days keep every kept snapshot immutable. The dates
vmrepo set or read are remembered in the local cache, so a run asks the
store only about objects whose known date is getting near.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import msgpack
from vmrepo.storage.base import Backend
from vmrepo.storage.objectlock import ObjectLock, Retention

from .config import RepoConfig
from .errors import IncompatibleRepository
from .format import CONFIG_KEY, INDEX_PREFIX, LOCK_PREFIX, MARK_PREFIX, PACK_PREFIX, SNAPSHOT_PREFIX

log = logging.getLogger(__name__)

#: Keys written without retention: locks and marks are deleted as a matter of course.
EXEMPT = (LOCK_PREFIX, MARK_PREFIX, "tmp/")
#: What a repository holds that must stay immutable.
HELD = (CONFIG_KEY, SNAPSHOT_PREFIX, INDEX_PREFIX, PACK_PREFIX)


def retention_of(config: RepoConfig) -> Retention | None:
    if config.object_lock_days is None:
        return None
    return Retention(config.object_lock_days, config.object_lock_mode, EXEMPT)


def apply_object_lock(backend: Backend, config: RepoConfig, enable: bool = False
                      ) -> ObjectLock | None:
    """Make ``backend`` write with the retention ``config`` asks for (turning object lock
    on first with ``enable``, at ``init``); None for a repository without it."""
    retention = retention_of(config)
    if retention is None:
        return None
    lock = backend.object_lock()
    if lock is None:
        raise IncompatibleRepository(
            f"{backend.location}: the repository requires S3 Object Lock, which this store "
            "does not have", features=["object-lock"])
    if enable:
        lock.enable()
    lock.apply(retention)
    return lock


@dataclass
class ExtendReport:
    checked: int = 0
    extended: int = 0
    #: The date extended objects are now retained until.
    until: datetime | None = None


class _Known:
    """Retention dates vmrepo set or read, kept in the cache directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.dates: dict[str, float] = dict(msgpack.unpackb(path.read_bytes()))
        except (OSError, ValueError, TypeError, msgpack.ExtraData):
            self.dates = {}

    def save(self, keys: set[str]) -> None:
        doc = {k: v for k, v in self.dates.items() if k in keys}
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_bytes(msgpack.packb(doc))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.debug("cannot keep the retention dates in %s: %s", self.path, exc)


def extend_retention(backend: Backend, config: RepoConfig, cache_dir: Path,
                     now: datetime, skip: frozenset[str] = frozenset()) -> ExtendReport:
    """Extend the retention of everything the repository holds that has fewer than half
    its days left (see the module docstring), except the keys in ``skip`` (packs a prune
    condemned: their retention must run out so that they can be deleted)."""
    report = ExtendReport()
    lock = backend.object_lock()
    days = config.object_lock_days
    if lock is None or days is None:
        return report
    period = timedelta(days=days)
    horizon = (now + period / 2).timestamp()
    known = _Known(cache_dir / "retention")
    seen: set[str] = set()
    for prefix in HELD:
        for info in backend.list(prefix):
            if (prefix == CONFIG_KEY and info.key != CONFIG_KEY) or info.key in skip:
                continue
            seen.add(info.key)
            report.checked += 1
            written = (info.mtime or 0) + period.total_seconds()
            if max(known.dates.get(info.key, 0.0), written) >= horizon:
                continue
            until = now + period
            lock.extend(info.key, until)
            known.dates[info.key] = until.timestamp()
            report.extended += 1
            report.until = until
    known.save(seen)
    if report.extended:
        log.info("extended the retention of %d objects to %s", report.extended, report.until)
    return report
