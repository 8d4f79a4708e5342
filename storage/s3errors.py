"""How S3 failures become storage errors: one line each, never the server's text of a refused
request (it may echo the key id), transient ones marked for retrying."""

from __future__ import annotations

import http.client

import urllib3.exceptions
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from .errors import (
    BackendUnavailable,
    ObjectNotFound,
    StorageError,
    StorageFull,
    StoragePermission,
    TransientError,
)

_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_DENIED = frozenset({"AccessDenied", "Forbidden", "403", "InvalidAccessKeyId",
                     "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                     "AllAccessDisabled", "AccountProblem"})
_TRANSIENT = frozenset({"SlowDown", "InternalError", "RequestTimeout", "ServiceUnavailable",
                        "Throttling", "ThrottlingException", "TooManyRequests",
                        "RequestTimeTooSkewed", "ConditionalRequestConflict",
                        "OperationAborted"})
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_FULL = frozenset({"QuotaExceeded", "EntityTooLarge", "XMinioStorageFull"})
_TRANSIENT_EXC = (BotoConnectionError, HTTPClientError, IncompleteReadError,
                  urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


def code_of(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def status_of(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def precondition_failed(exc: Exception) -> bool:
    """Whether a conditional write failed because the object exists."""
    return isinstance(exc, ClientError) and (code_of(exc) == "PreconditionFailed"
                                             or status_of(exc) == 412)


def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def translate(exc: BaseException, key: str | None, what: str) -> StorageError:
    """Map a boto3/botocore/urllib3 failure to the storage error tree, in one line."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, ClientError):
        code, status = code_of(exc), status_of(exc)
        label = f"HTTP {status}" if code in ("", str(status)) else f"{code} (HTTP {status})"
        if code in _DENIED or (status in (401, 403) and code not in _TRANSIENT | _FULL):
            # The server's text of a refused request may echo the key id: leave it out.
            return StoragePermission(f"{what}: access denied: {label}", key=key)
        detail = one_line(str(exc.response.get("Error", {}).get("Message", "")))
        msg = f"{what}: {label}" + (f": {detail}" if detail else "")
        if code in _NOT_FOUND or status == 404:
            return ObjectNotFound(msg, key=key)
        if code in _FULL:
            return StorageFull(msg, key=key)
        if code in _TRANSIENT or status in _TRANSIENT_STATUS:
            return TransientError(msg, key=key)
        return BackendUnavailable(msg, key=key)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StoragePermission(f"{what}: no usable AWS credentials (environment, "
                                 "~/.aws files or profile)", key=key)
    msg = f"{what}: {type(exc).__name__}: {one_line(str(exc))}"
    if isinstance(exc, _TRANSIENT_EXC) and "CERTIFICATE_VERIFY_FAILED" not in str(exc):
        return TransientError(msg, key=key)
    return BackendUnavailable(msg, key=key)
