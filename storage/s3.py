"""Amazon S3 backend (and S3-compatible stores: Ceph RGW, MinIO, ...), on boto3.

``s3://BUCKET/PREFIX`` keeps each object under ``PREFIX/KEY`` in ``BUCKET``;
the prefix is optional and may contain slashes. The ``[storage]`` table (or a
``[remote.NAME]``) may set ``endpoint`` (an ``http://`` or ``https://`` URL),
``region``, ``addressing_style`` (``path``, ``virtual`` or ``auto``),
``profile``, ``concurrency`` (requests in parallel, default 16),
``connect_timeout`` and ``read_timeout`` (seconds) and ``conditional_writes``
(below). Whatever it leaves out boto3 takes from the standard AWS environment
and files (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``,
``AWS_DEFAULT_REGION``, ``~/.aws/...``). Credentials are boto3's business: this
module never reads, logs or keeps them, and no message it makes carries them
(nor the server's own text of a refused request).

* ``put`` is one PutObject, atomic on S3, with a checksum of the body the
  store checks against what it received (a body damaged on the way is
  refused): ``checksum = "crc32"`` (the default; the ``x-amz-checksum-crc32``
  header, verified by AWS S3, MinIO and Ceph RGW from Squid on, and five times
  cheaper to compute than MD5) or ``"md5"`` (Content-MD5, verified by every
  S3-compatible store, older Ceph RGW included).
* ``create`` is a PutObject with ``If-None-Match: *`` where the store honours
  it: 412 means the object exists, 409 (a concurrent conditional write) is
  transient. Some stores reject the header (501), some silently ignore it:
  the first ``create`` of a backend finds out by a probe (two conditional puts
  of ``tmp/create-probe-<random>``, the second must fail; then it is deleted)
  unless ``conditional_writes = true/false`` says. Without conditional writes
  ``create`` asks HeadObject, then puts, and ``atomic_create`` becomes False:
  two racing creators may both succeed. vmrepo's callers tolerate that: locks
  write unique keys and list again after writing; ``init`` writes the config.
* ``get`` of a range is a ranged GetObject. S3 answers a range running past
  the end with fewer bytes, so the length received is checked: an object
  shorter than the range is a StorageError, a body cut short a TransientError.
* Retrying is not boto3's job here (its own retries are off) but that of the
  RetryingBackend wrapper: every failure that may pass on a retry raises
  TransientError (throttling, 500/502/503/504, timeouts, resets, short bodies).
  Missing objects and buckets raise ObjectNotFound, refused access
  StoragePermission, quotas StorageFull, anything else BackendUnavailable.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
import secrets
import threading
import time
import zlib
from collections.abc import Generator, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
)

from .base import (
    Backend,
    Buffer,
    ObjectInfo,
    Payload,
    Span,
    check_range,
    payload_parts,
    spans_range,
    validate_key,
    validate_prefix,
)
from .errors import (
    BackendUnavailable,
    InvalidLocation,
    InvalidSetting,
    ObjectExists,
    ObjectNotFound,
    StorageError,
    TransientError,
)
from .s3errors import code_of, one_line, precondition_failed, status_of, translate
from .s3lock import S3ObjectLock

log = logging.getLogger(__name__)

#: What a store that does not know ``If-None-Match`` on PutObject answers.
_UNSUPPORTED = frozenset({"NotImplemented", "InvalidArgument"})
_BUCKET_RE = re.compile(r"[A-Za-z0-9._-]{1,255}")
#: Attempts at reaching the bucket when the backend is opened.
OPEN_ATTEMPTS = 5
#: What ``addressing_style`` may be (botocore's names).
ADDRESSING_STYLES = ("auto", "path", "virtual")
#: The body checksums ``checksum`` may name.
CHECKSUMS = ("crc32", "md5")
#: The most a ``get_spans`` reads from a response body at once (and so holds).
READ_WINDOW = 4 << 20


def _epoch(when: Any) -> float | None:
    return when.timestamp() if isinstance(when, datetime) else None


def _etag(tag: Any) -> str | None:
    return str(tag).strip('"') if tag else None


class _PartsReader(io.RawIOBase):
    """A request body made of several buffers, sent without joining them (a pack's parts
    would otherwise be copied into one more buffer of the pack's size)."""

    def __init__(self, parts: list[memoryview]) -> None:
        self._parts = [p for p in parts if p.nbytes]  # an empty part would read as the end
        self._at = 0
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if (offset, whence) not in ((0, io.SEEK_SET), (self._pos, io.SEEK_SET)):
            raise OSError("only a rewind is supported")
        if offset == 0:
            self._at = self._pos = 0
        return self._pos

    def read(self, size: int = -1) -> bytes:
        """The next part whole (the HTTP client sends what it gets, so a part is one send)."""
        if self._at >= len(self._parts):
            return b""
        part = self._parts[self._at]
        self._at += 1
        self._pos += part.nbytes
        return part  # type: ignore[return-value] # a memoryview: sendall takes it as it is


class S3Backend(Backend):
    """Objects in an S3 bucket, under an optional prefix."""

    local = False
    read_window = READ_WINDOW
    option_keys = frozenset({"endpoint", "region", "addressing_style", "profile",
                             "concurrency", "connect_timeout", "read_timeout",
                             "conditional_writes", "checksum"})

    def __init__(self, bucket: str, prefix: str = "", *, create: bool = False,
                 endpoint: str | None = None, region: str | None = None,
                 addressing_style: str | None = None, profile: str | None = None,
                 concurrency: int = 16, connect_timeout: float = 10.0,
                 read_timeout: float = 60.0, conditional_writes: bool | None = None,
                 checksum: str = "crc32") -> None:
        if not _BUCKET_RE.fullmatch(bucket):
            raise StorageError(f"invalid S3 bucket name {bucket!r}")
        if checksum not in CHECKSUMS:
            names = " or ".join(f'"{c}"' for c in CHECKSUMS)
            raise InvalidSetting(f"checksum must be {names}, not {checksum!r}", "checksum")
        self.checksum = checksum
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._base = f"{self.prefix}/" if self.prefix else ""
        self.location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.concurrency = concurrency
        #: None until the first create (or the option) settles whether If-None-Match works.
        self._conditional = conditional_writes
        self.atomic_create = conditional_writes is not False
        self._probe_lock = threading.Lock()
        self._lock = S3ObjectLock(self)
        try:
            config = Config(max_pool_connections=concurrency, connect_timeout=connect_timeout,
                            read_timeout=read_timeout,
                            retries={"total_max_attempts": 1, "mode": "standard"},  # ours
                            # Content-MD5, not CRC trailers (aws-chunked) many stores refuse.
                            request_checksum_calculation="when_required",
                            response_checksum_validation="when_required",
                            # The body's checksum header (verified by the store) protects
                            # it; signing its SHA-256 too (botocore's default on http)
                            # would cost more CPU than compressing it.
                            s3={"payload_signing_enabled": False,
                                **({"addressing_style": addressing_style}
                                   if addressing_style else {})})
            session = boto3.session.Session(profile_name=profile)
            self._client: Any = session.client("s3", endpoint_url=endpoint,
                                               region_name=region, config=config)
        except (BotoCoreError, ValueError) as exc:
            raise BackendUnavailable(f"cannot open {self.location}: "
                                     f"{one_line(str(exc))}") from None
        try:
            self._open_bucket(create)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_url(cls, url: str, create: bool = False,
                 options: Mapping[str, Any] | None = None) -> S3Backend:
        """Open ``s3://BUCKET/PREFIX`` with the storage settings in ``options``
        (InvalidSetting for a bad one)."""
        parts = urlsplit(url)
        if "@" in parts.netloc:  # never echo what may be credentials
            raise InvalidLocation("an S3 URL takes no user or password (credentials come "
                                  "from the AWS environment, ~/.aws or a profile)")
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise InvalidLocation(f"not an S3 URL: {url!r} (expected s3://BUCKET/PREFIX)")
        opts = dict(options or {})
        unknown = sorted(set(opts) - cls.option_keys)
        if unknown:
            raise InvalidSetting(f"unknown S3 setting {unknown[0]!r}", unknown[0])
        style = _opt(opts, "addressing_style", str)
        if style is not None and style not in ADDRESSING_STYLES:
            raise InvalidSetting(f"addressing_style must be one of "
                                 f"{', '.join(ADDRESSING_STYLES)}, not {style!r}",
                                 "addressing_style")
        endpoint = _opt(opts, "endpoint", str)
        if endpoint is not None:
            where = urlsplit(endpoint)
            if where.scheme not in ("http", "https") or not where.hostname:
                raise InvalidSetting(f"endpoint must be an http:// or https:// URL, not "
                                     f"{endpoint!r}", "endpoint")
        return cls(parts.netloc, parts.path, create=create,
                   endpoint=endpoint, region=_opt(opts, "region", str),
                   addressing_style=style,
                   profile=_opt(opts, "profile", str),
                   concurrency=_opt(opts, "concurrency", int) or 16,
                   connect_timeout=_opt(opts, "connect_timeout", float) or 10.0,
                   read_timeout=_opt(opts, "read_timeout", float) or 60.0,
                   conditional_writes=_opt(opts, "conditional_writes", bool),
                   checksum=_opt(opts, "checksum", str) or "crc32")

    def _open_bucket(self, create: bool) -> None:
        for attempt in range(OPEN_ATTEMPTS):  # before the retry wrapper exists: retry here
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except Exception as exc:
                err = translate(exc, None, f"cannot open bucket s3://{self.bucket}")
                if isinstance(err, TransientError) and attempt + 1 < OPEN_ATTEMPTS:
                    time.sleep(0.2 * 2 ** attempt)
                    continue
                if not isinstance(err, ObjectNotFound):
                    raise err from None
                break
        if not create:
            raise ObjectNotFound(f"no bucket {self.bucket} at "
                                 f"{self._client.meta.endpoint_url}") from None
        args: dict[str, Any] = {"Bucket": self.bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**args)
        except ClientError as exc:
            if code_of(exc) != "BucketAlreadyOwnedByYou":
                raise translate(exc, None, f"cannot create bucket {self.bucket}") from None
            log.debug("bucket %s exists already (created concurrently)", self.bucket)
        except Exception as exc:
            raise translate(exc, None, f"cannot create bucket {self.bucket}") from None

    def _name(self, key: str) -> str:
        return self._base + validate_key(key)

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._base}{key}"

    # What the object lock (s3lock) works with.
    name = _name
    where = _where

    @property
    def client(self) -> Any:
        return self._client

    @property
    def base(self) -> str:
        return self._base

    def object_lock(self) -> S3ObjectLock:
        return self._lock

    def _put_object(self, name: str, data: Payload, if_none_match: bool) -> None:
        """One PutObject with the body's checksum; boto3's exceptions pass through."""
        parts = payload_parts(data)
        body: bytes | _PartsReader = data if isinstance(data, bytes) else _PartsReader(parts)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": name, "Body": body,
                                "ContentLength": sum(p.nbytes for p in parts)}
        if self.checksum == "md5":
            digest = hashlib.md5(usedforsecurity=False)
            for part in parts:
                digest.update(part)
            args["ContentMD5"] = base64.b64encode(digest.digest()).decode("ascii")
        else:
            crc = 0
            for part in parts:
                crc = zlib.crc32(part, crc)
            args["ChecksumCRC32"] = base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")
        if if_none_match:
            args["IfNoneMatch"] = "*"
        lock = self._lock.put_args(name[len(self._base):])
        if lock and "ChecksumCRC32" in args:  # object lock wants the algorithm named too
            args["ChecksumAlgorithm"] = "CRC32"
        args.update(lock)
        self._client.put_object(**args)

    def put(self, key: str, data: Payload) -> None:
        name = self._name(key)
        try:
            self._put_object(name, data, if_none_match=False)
        except Exception as exc:
            raise translate(exc, key, f"cannot write {self._where(key)}") from None

    def create(self, key: str, data: Payload) -> None:
        name = self._name(key)
        if not self._conditional_writes():
            if self.exists(key):
                raise ObjectExists(f"{key} exists", key=key)
            self.put(key, data)
            return
        try:
            self._put_object(name, data, if_none_match=True)
        except Exception as exc:
            if precondition_failed(exc):
                raise ObjectExists(f"{key} exists", key=key) from None
            raise translate(exc, key, f"cannot create {self._where(key)}") from None

    def _conditional_writes(self) -> bool:
        """Whether the store honours If-None-Match; probed once, at the first create."""
        if self._conditional is None:
            with self._probe_lock:
                if self._conditional is None:
                    self._conditional = self._probe()
                    self.atomic_create = self._conditional
                    if not self._conditional:
                        log.info("%s ignores conditional writes: create checks, then writes",
                                 self.location)
        return self._conditional

    def _probe(self) -> bool:
        key = f"tmp/create-probe-{secrets.token_hex(8)}"
        name = self._name(key)
        try:
            for attempt in (1, 2):
                try:
                    self._put_object(name, b"probe", if_none_match=True)
                except ClientError as exc:
                    if attempt == 2 and precondition_failed(exc):
                        return True
                    if code_of(exc) in _UNSUPPORTED or status_of(exc) == 501:
                        return False
                    raise
            return False  # the second put went through: the header was ignored
        except Exception as exc:
            raise translate(exc, key, f"cannot probe conditional writes with "
                                       f"{self._where(key)}") from None
        finally:
            try:
                if self._lock.retention is not None:  # versioned: remove every version
                    self._lock.delete(key)
                else:
                    self._client.delete_object(Bucket=self.bucket, Key=name)
            except Exception as exc:  # noqa: BLE001 - a leftover probe does no harm
                log.debug("cannot delete %s: %s", self._where(key), one_line(str(exc)))

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        name = self._name(key)
        what = f"cannot read {self._where(key)}"
        if offset < 0 or (length is not None and length < 0):
            raise StorageError(f"invalid range {offset}+{length} of {key}", key=key)
        if length == 0:
            check_range(key, self.stat(key).size, offset, 0)
            return b""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": name}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            args["Range"] = f"bytes={offset}-{end}"
        try:
            resp = self._client.get_object(**args)
            body = resp["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
        except Exception as exc:
            # A range from at or past the end: nothing to read there, or an error.
            if isinstance(exc, ClientError) and code_of(exc) == "InvalidRange" and \
                    check_range(key, self.stat(key).size, offset, length) == 0:
                return b""
            raise translate(exc, key, what) from None
        sent = resp.get("ContentLength")
        if sent is not None and len(data) != int(sent):
            raise TransientError(f"{what}: body cut short ({len(data)} of {sent} bytes)",
                                 key=key)
        total = str(resp.get("ContentRange", "")).rpartition("/")[2] or str(sent)
        if "Range" in args and not resp.get("ContentRange"):  # the store sent it all
            data = data[offset : None if length is None else offset + length]
        if length is not None and len(data) != length:
            raise StorageError(f"range {offset}+{length} outside object {key} of {total} "
                               "bytes", key=key)
        return data

    def get_spans(self, key: str, spans: Sequence[Span]) -> Generator[Buffer, None, None]:
        """One ranged GET, its body read in windows of up to :data:`READ_WINDOW` bytes
        cut at span boundaries (a pack's worth of blobs is never held at once)."""
        if not spans:
            return
        start, end = spans_range(spans)
        what = f"cannot read {self._where(key)}"
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=self._name(key),
                                           Range=f"bytes={start}-{end - 1}")
        except Exception as exc:
            if isinstance(exc, ClientError) and code_of(exc) == "InvalidRange":
                check_range(key, self.stat(key).size, start, end - start)
            raise translate(exc, key, what) from None
        body = resp["Body"]
        try:
            # A store that ignores the range sends the whole object, from 0.
            pos = start if resp.get("ContentRange") else 0
            sent = int(resp.get("ContentLength", end - pos))
            if pos + sent < end:
                total = str(resp.get("ContentRange", "")).rpartition("/")[2] or str(sent)
                raise StorageError(f"range {start}+{end - start} outside object {key} of "
                                   f"{total} bytes", key=key)
            for window in _windows(spans, self.read_window):
                w_start = window[0][0]
                w_end = window[-1][0] + window[-1][1]
                _skip(body, w_start - pos, key, what)
                data = memoryview(body.read(w_end - w_start) if w_end > w_start else b"")
                if len(data) != w_end - w_start:
                    raise TransientError(f"{what}: body cut short", key=key)
                pos = w_end
                for off, n in window:
                    yield data[off - w_start : off - w_start + n]
                del data  # one window at a time: this one goes before the next is read
        except StorageError:
            raise
        except Exception as exc:
            raise translate(exc, key, what) from None
        finally:
            body.close()

    def stat(self, key: str) -> ObjectInfo:
        name = self._name(key)
        try:
            resp = self._client.head_object(Bucket=self.bucket, Key=name)
        except Exception as exc:
            raise translate(exc, key, f"cannot stat {self._where(key)}") from None
        if resp.get("ContentLength") is None:  # an answer cut short in its headers
            raise TransientError(f"cannot stat {self._where(key)}: no size in the answer",
                                 key=key)
        return ObjectInfo(key, int(resp["ContentLength"]), _epoch(resp.get("LastModified")),
                          _etag(resp.get("ETag")))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        what = f"cannot list {self._where(prefix)}"
        # Only the store's failures land here: the caller's own never enter this generator.
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=self._base + prefix):
                for item in page.get("Contents", ()):
                    full = str(item["Key"])
                    name = full[len(self._base):]
                    if full.startswith(self._base) and name:
                        yield ObjectInfo(name, int(item["Size"]),
                                         _epoch(item.get("LastModified")), _etag(item.get("ETag")))
        except Exception as exc:
            raise translate(exc, None, what) from None

    def delete(self, key: str) -> None:
        if self._lock.retention is not None:  # a versioned bucket: every version goes
            self._lock.delete(key)
            return
        name = self._name(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=name)
        except Exception as exc:
            if isinstance(exc, ClientError) and code_of(exc) == "NoSuchKey":
                log.debug("delete of absent %s: the store says %s", self._where(key), code_of(exc))
                return
            raise translate(exc, key, f"cannot delete {self._where(key)}") from None

    def close(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()


def _windows(spans: Sequence[Span], size: int) -> Iterator[Sequence[Span]]:
    """Consecutive spans grouped so that each group covers at most ``size`` bytes (or one
    span, if larger)."""
    i = 0
    while i < len(spans):
        j = i + 1
        while j < len(spans) and spans[j][0] + spans[j][1] - spans[i][0] <= size:
            j += 1
        yield spans[i:j]
        i = j


def _skip(body: Any, n: int, key: str, what: str) -> None:
    """Read and drop ``n`` bytes of a response body."""
    while n > 0:
        got = len(body.read(min(n, 1 << 20)))
        if not got:
            raise TransientError(f"{what}: body cut short", key=key)
        n -= got


def _opt(opts: Mapping[str, Any], name: str, kind: type[Any]) -> Any:
    """Setting ``name`` checked to be of ``kind`` (ints pass as floats), or None."""
    value = opts.get(name)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        wanted = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, "text")
        raise InvalidSetting(f"{name} must be {wanted}, not {value!r}", name)
    if kind in (int, float) and value <= 0:
        raise InvalidSetting(f"{name} must be positive, not {value!r}", name)
    return value
