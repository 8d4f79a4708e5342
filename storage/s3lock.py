"""S3 Object Lock for :class:`~vmrepo.storage.s3.S3Backend` (see :mod:`vmrepo.storage.objectlock`).

* ``enable`` turns on versioning and Object Lock (AWS allows it on existing
  buckets since 2023; MinIO and Ceph RGW only at bucket creation, so there the
  bucket must be created with it).
* ``apply`` checks the bucket's lock configuration; from then on each PutObject
  outside the exempt prefixes carries ``ObjectLockMode`` and
  ``ObjectLockRetainUntilDate`` = now + days.
* Deleting (:meth:`S3ObjectLock.delete`) removes every version of the key the
  store lets go; if one is still retained, a delete marker hides the key and
  the retained version waits for :meth:`S3ObjectLock.purge`.
* Dates are read with HeadObject (``ObjectLockRetainUntilDate``) and extended
  with PutObjectRetention in the same mode.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from .errors import StorageError, StoragePermission
from .objectlock import ObjectLock, PurgeReport, Retention
from .s3errors import code_of, translate

if TYPE_CHECKING:
    from .s3 import S3Backend

log = logging.getLogger(__name__)


class S3ObjectLock(ObjectLock):
    """Object Lock of one bucket, seen through one backend's prefix."""

    def __init__(self, backend: S3Backend) -> None:
        self.b = backend
        self.retention: Retention | None = None

    def _call(self, what: str, key: str | None, fn: Any, **args: Any) -> Any:
        try:
            return fn(Bucket=self.b.bucket, **args)
        except Exception as exc:
            raise translate(exc, key, what) from None

    # -- configuration ---------------------------------------------------------

    def enable(self) -> None:
        c = self.b.client
        if self._enabled():
            return
        self._call(f"cannot turn on versioning of bucket {self.b.bucket}", None,
                   c.put_bucket_versioning, VersioningConfiguration={"Status": "Enabled"})
        self._call(f"cannot turn on Object Lock for bucket {self.b.bucket} (some stores "
                   "allow it only when the bucket is created)", None,
                   c.put_object_lock_configuration,
                   ObjectLockConfiguration={"ObjectLockEnabled": "Enabled"})

    def _enabled(self) -> bool:
        try:
            resp = self.b.client.get_object_lock_configuration(Bucket=self.b.bucket)
        except Exception as exc:  # noqa: BLE001 - absent configuration is an answer
            code = code_of(exc) if isinstance(exc, ClientError) else ""
            if code in ("ObjectLockConfigurationNotFoundError", "NoSuchObjectLockConfiguration"):
                return False
            raise translate(exc, None, f"cannot read the Object Lock configuration of "
                                        f"bucket {self.b.bucket}") from None
        return bool(resp.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled")

    def apply(self, retention: Retention) -> None:
        if not self._enabled():
            raise StorageError(f"bucket {self.b.bucket} has no Object Lock, which this "
                               "repository requires (created with --object-lock-days)")
        self.retention = retention

    def put_args(self, key: str) -> dict[str, Any]:
        """The retention arguments of a PutObject of ``key``."""
        r = self.retention
        if r is None or not r.covers(key):
            return {}
        return {"ObjectLockMode": r.mode.upper(),
                "ObjectLockRetainUntilDate": datetime.now(UTC) + timedelta(days=r.days)}

    # -- dates -----------------------------------------------------------------

    def retained_until(self, key: str, version: str | None = None) -> datetime | None:
        args: dict[str, Any] = {"Key": self.b.name(key)}
        if version is not None:
            args["VersionId"] = version
        resp = self._call(f"cannot read the retention of {self.b.where(key)}", key,
                          self.b.client.head_object, **args)
        until = resp.get("ObjectLockRetainUntilDate")
        if not isinstance(until, datetime) or until <= datetime.now(UTC):
            return None
        return until

    def _has_retention(self, key: str, version: str) -> bool:
        resp = self._call(f"cannot read the retention of {self.b.where(key)}", key,
                          self.b.client.head_object, Key=self.b.name(key), VersionId=version)
        return isinstance(resp.get("ObjectLockRetainUntilDate"), datetime)

    def extend(self, key: str, until: datetime) -> None:
        r = self.retention
        if r is None:
            raise StorageError("object lock is not applied to this backend")
        current = self.retained_until(key)
        if current is not None and current >= until:
            return
        self._call(f"cannot extend the retention of {self.b.where(key)}", key,
                   self.b.client.put_object_retention, Key=self.b.name(key),
                   Retention={"Mode": r.mode.upper(), "RetainUntilDate": until})

    # -- deleting --------------------------------------------------------------

    def _versions(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every version and delete marker under ``prefix`` (keys relative to the backend),
        as dicts with Key, VersionId, IsLatest, Size (None for markers)."""
        what = f"cannot list the versions under {self.b.where(prefix)}"
        try:
            for page in self.b.client.get_paginator("list_object_versions").paginate(
                    Bucket=self.b.bucket, Prefix=self.b.base + prefix):
                for v in page.get("Versions", ()):
                    yield {**v, "Key": v["Key"][len(self.b.base):]}
                for m in page.get("DeleteMarkers", ()):
                    yield {**m, "Key": m["Key"][len(self.b.base):], "Size": None}
        except Exception as exc:
            raise translate(exc, None, what) from None

    def delete(self, key: str) -> None:
        """Remove every version of ``key`` the store lets go; hide it if one is retained."""
        hidden = False
        retained = False
        for v in [v for v in self._versions(key) if v["Key"] == key]:
            try:
                self._delete_version(key, v["VersionId"])
            except StoragePermission:
                # Retained (by the store's clock, which may differ from ours), or refused.
                if v["Size"] is None or not self._has_retention(key, v["VersionId"]):
                    raise
                retained = True
                hidden = hidden or not v["IsLatest"]
        if retained and not hidden:
            self._call(f"cannot delete {self.b.where(key)}", key, self.b.client.delete_object,
                       Key=self.b.name(key))
            log.debug("%s is retained: hidden by a delete marker", self.b.where(key))

    def purge(self, prefix: str, now: datetime) -> PurgeReport:
        report = PurgeReport()
        by_key: dict[str, list[dict[str, Any]]] = {}
        for v in self._versions(prefix):
            by_key.setdefault(v["Key"], []).append(v)
        for key, versions in by_key.items():
            kept = 0
            for v in versions:
                if v["IsLatest"] and v["Size"] is not None:
                    continue  # the object itself
                if v["Size"] is None:
                    continue  # markers last
                until = self.retained_until(key, v["VersionId"])
                if until is not None and until > now:
                    kept += 1
                    report.versions_retained += 1
                    report.bytes_retained += int(v["Size"])
                    if report.next_release is None or until < report.next_release:
                        report.next_release = until
                    continue
                self._delete_version(key, v["VersionId"])
                report.versions_deleted += 1
                report.bytes_deleted += int(v["Size"])
            for m in versions:  # a marker goes once it hides nothing, or is not the latest
                if m["Size"] is None and (not m["IsLatest"] or not kept):
                    self._delete_version(key, m["VersionId"])
        return report

    def _delete_version(self, key: str, version: str) -> None:
        self._call(f"cannot delete {self.b.where(key)}", key, self.b.client.delete_object,
                   Key=self.b.name(key), VersionId=version)
