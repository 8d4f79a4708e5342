"""The S3 backend against a real S3 endpoint (moto_server on loopback).

The conformance kit runs three times: on the server directly, with the
check-then-write fallback of ``create``, and through a fault proxy that
fails every other request (500, 503, dropped connections, lost answers, cut
bodies) with the retry wrapper in front. Then the specifics: the probe for
conditional writes, missing buckets, the Content-MD5 on the wire, each fault
and a permanent one through the retry wrapper, error mapping, credentials
kept out of messages and logs, and the CLI on an ``s3://`` repository.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3.exceptions
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)
from botocore.stub import Stubber
from vmrepo.storage.base import Backend, is_valid_key
from vmrepo.storage.errors import (
    BackendUnavailable,
    InvalidLocation,
    ObjectExists,
    ObjectNotFound,
    StorageError,
    StorageFull,
    StoragePermission,
    TransientError,
)
from vmrepo.storage.retry import RetryingBackend
from vmrepo.storage.s3 import S3Backend
from vmrepo.storage.s3errors import translate as _translate

from .faultproxy import FaultProxy
from .helpers import run_cli, run_json, write_sample_image
from .s3server import TEST_ENV, MotoServer, aws_test_env, make_backend, s3_url
from .s3server import moto_server as moto_server  # noqa: F401 - fixture
from .s3server import s3_bucket as s3_bucket  # noqa: F401 - fixture
from .storagekit import BackendConformance

#: Every other request fails, in turn each way the proxy knows short of a timeout.
FAULT_CYCLE = ("pass", "500", "pass", "503", "pass", "drop", "pass", "short", "pass", "lost")


@pytest.fixture
def proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server.port, delay=3.0) as p:
        yield p


def retrying(backend: Backend, attempts: int = 8) -> RetryingBackend:
    return RetryingBackend(backend, attempts=attempts, sleep=lambda s: None)


class TestS3(BackendConformance):
    @pytest.fixture
    def backend(self, moto_server: MotoServer, s3_bucket: str) -> Iterator[Backend]:
        b = make_backend(moto_server.endpoint, s3_bucket)
        yield b
        b.close()

    def test_moto_honours_conditional_writes(self, backend: Backend) -> None:
        backend.create("locks/probe", b"1")
        assert backend.atomic_create


class TestS3CheckThenWrite(BackendConformance):
    """``conditional_writes = false``: HeadObject, then PutObject."""

    @pytest.fixture
    def backend(self, moto_server: MotoServer, s3_bucket: str) -> Iterator[Backend]:
        b = make_backend(moto_server.endpoint, s3_bucket, conditional_writes=False)
        assert not b.atomic_create
        yield b
        b.close()


class TestRetryingS3ThroughFaults(BackendConformance):
    """Half the requests fail; the retry wrapper hides every failure."""

    @pytest.fixture
    def backend(self, proxy: FaultProxy, s3_bucket: str) -> Iterator[Backend]:
        inner = make_backend(proxy.endpoint, s3_bucket)
        proxy.plan(lambda req: FAULT_CYCLE[req.number % len(FAULT_CYCLE)])
        yield retrying(inner, attempts=25)
        inner.close()


# Conditional writes, and the fallback for stores without them.

def test_fallback_refuses_an_existing_key(moto_server: MotoServer, s3_bucket: str) -> None:
    b = make_backend(moto_server.endpoint, s3_bucket, conditional_writes=False)
    b.create("locks/a", b"mine")
    with pytest.raises(ObjectExists, match="locks/a"):
        b.create("locks/a", b"theirs")
    assert b.get("locks/a") == b"mine" and not b.atomic_create


def test_probe_finds_a_store_that_ignores_if_none_match(moto_server: MotoServer,
                                                        s3_bucket: str) -> None:
    b = make_backend(moto_server.endpoint, s3_bucket)

    def strip(request: Any, **kw: Any) -> None:
        if "If-None-Match" in request.headers:
            del request.headers["If-None-Match"]

    b._client.meta.events.register("before-sign.s3.PutObject", strip)
    b.create("locks/a", b"mine")
    assert not b.atomic_create
    with pytest.raises(ObjectExists):
        b.create("locks/a", b"theirs")
    assert b.get("locks/a") == b"mine"
    assert [i.key for i in b.list("")] == ["locks/a"]  # the probe is gone


def test_probe_finds_a_store_that_rejects_if_none_match(moto_server: MotoServer,
                                                        s3_bucket: str) -> None:
    b = make_backend(moto_server.endpoint, s3_bucket)
    with Stubber(b._client) as stub:
        stub.add_client_error("put_object", "NotImplemented", "A header you provided "
                              "implies functionality that is not implemented", 501)
        stub.add_response("delete_object", {})
        stub.add_client_error("head_object", "404", "Not Found", 404)
        stub.add_response("put_object", {})
        b.create("locks/a", b"x")
        stub.assert_no_pending_responses()
    assert not b.atomic_create


def test_forced_conditional_writes_skip_the_probe(proxy: FaultProxy, s3_bucket: str) -> None:
    b = make_backend(proxy.endpoint, s3_bucket, conditional_writes=True)
    proxy.plan(())
    b.create("locks/a", b"x")
    assert [(r.method, r.target.split("?")[0]) for r in proxy.requests[-1:]] == \
        [("PUT", f"/{s3_bucket}/repo/locks/a")]
    assert proxy.counts["pass"] == 1 and b.atomic_create


def test_conflicting_conditional_write_is_transient() -> None:
    exc = ClientError({"Error": {"Code": "ConditionalRequestConflict", "Message": "try again"},
                       "ResponseMetadata": {"HTTPStatusCode": 409}}, "PutObject")
    assert type(_translate(exc, "locks/a", "cannot create")) is TransientError


# Buckets, URLs and settings.

def test_missing_bucket(moto_server: MotoServer, s3_bucket: str) -> None:
    with pytest.raises(ObjectNotFound, match=s3_bucket):
        make_backend(moto_server.endpoint, s3_bucket, create=False)
    b = make_backend(moto_server.endpoint, s3_bucket, create=True)
    assert list(b.list("")) == []
    b.put("config", b"c")
    again = make_backend(moto_server.endpoint, s3_bucket, create=False)
    assert again.get("config") == b"c"
    make_backend(moto_server.endpoint, s3_bucket, create=True)  # exists: fine


def test_bucket_created_concurrently_is_fine(moto_server: MotoServer, s3_bucket: str) -> None:
    b = make_backend(moto_server.endpoint, s3_bucket)
    with Stubber(b._client) as stub:
        stub.add_client_error("head_bucket", "404", "Not Found", 404)
        stub.add_client_error("create_bucket", "BucketAlreadyOwnedByYou", "yours", 409)
        b._open_bucket(create=True)


def test_the_environment_alone_finds_the_server(s3_bucket: str) -> None:
    """AWS_ENDPOINT_URL, credentials and region from the environment, default addressing."""
    b = S3Backend.from_url(s3_url(s3_bucket, "a/b/c/"), create=True)
    assert b.location == f"s3://{s3_bucket}/a/b/c" and b.concurrency == 16 and not b.local
    b.put("k", b"v")
    assert [i.key for i in b.list("")] == ["k"]
    assert b._client.head_object(Bucket=s3_bucket, Key="a/b/c/k")["ContentLength"] == 1
    root = S3Backend.from_url(f"s3://{s3_bucket}", options={"concurrency": 3})
    assert root.location == f"s3://{s3_bucket}" and root.concurrency == 3
    assert [i.key for i in root.list("")] == ["a/b/c/k"]


def test_listing_shows_foreign_names_and_only_the_prefix(moto_server: MotoServer,
                                                         s3_bucket: str) -> None:
    b = make_backend(moto_server.endpoint, s3_bucket, prefix="repo")
    b.put("index/aa", b"1")
    for name in ("repo/index/README.md", "repox/index/zz", "other/index/yy"):
        b._client.put_object(Bucket=s3_bucket, Key=name, Body=b"22")
    listed = {i.key: i for i in b.list("index/")}
    assert set(listed) == {"index/aa", "index/README.md"}
    assert not is_valid_key("index/README.md") and listed["index/README.md"].size == 2
    info = listed["index/aa"]
    assert info.etag == b.stat("index/aa").etag == hashlib.md5(b"1").hexdigest()
    assert info.mtime is not None


def test_ranges_of_empty_objects_and_stores_that_ignore_ranges(moto_server: MotoServer,
                                                                s3_bucket: str) -> None:
    b = make_backend(moto_server.endpoint, s3_bucket)
    b.put("empty", b"")
    assert b.get("empty") == b"" and b.get("empty", 0, 0) == b"" and b.get("empty", 0) == b""
    with pytest.raises(StorageError):
        b.get("empty", 0, 1)
    b.put("k", bytes(range(100)))

    def strip(request: Any, **kw: Any) -> None:
        if "Range" in request.headers:
            del request.headers["Range"]

    b._client.meta.events.register("before-sign.s3.GetObject", strip)
    assert b.get("k", 10, 5) == bytes(range(10, 15)) and b.get("k", 98) == b"\x62\x63"
    with pytest.raises(StorageError, match="outside object k of 100 bytes"):
        b.get("k", 98, 5)


def test_windowed_reads_hold_one_window_at_a_time(moto_server: MotoServer,
                                                s3_bucket: str) -> None:
    """A pack read in windows: the read planner, like get_spans itself, lets each window go
    before the next is read, so a read holds one window, not two (nor the pack)."""
    import random
    import tracemalloc

    from vmrepo.config import RepoConfig
    from vmrepo.format import BlobType
    from vmrepo.planner import ReadPlanner
    from vmrepo.repository import Repository
    from vmrepo.storage.s3 import READ_WINDOW

    backend = make_backend(moto_server.endpoint, s3_bucket)
    repo = Repository.init(backend, RepoConfig.new(chunk_size=256 << 10, pack_size=32 << 20))
    rnd = random.Random(5)
    blobs = [rnd.randbytes(256 << 10) for _ in range(6 * READ_WINDOW // (256 << 10))]
    ids = [repo.hasher.id(b) for b in blobs]
    session = repo.session()
    for blob_id, blob in zip(ids, blobs, strict=True):
        session.add(blob_id, BlobType.CHUNK, blob)
    session.commit()
    assert len(repo.index.packs()) == 1
    got: dict[int, bool] = {}
    planner: ReadPlanner[int] = ReadPlanner(
        repo, lambda i, data: got.__setitem__(i, data == blobs[i]), workers=1)
    tracemalloc.start()
    try:
        stats = planner.read((blob_id, i) for i, blob_id in enumerate(ids))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == dict.fromkeys(range(len(blobs)), True) and stats.requests == 1
    assert peak < 1.5 * READ_WINDOW, f"peak {peak >> 10} KiB, window {READ_WINDOW >> 10} KiB"


@pytest.mark.parametrize("url, options, message", [
    ("s3://AKIAUSER:hunter2secret@bucket/p", {}, "takes no user or password"),
    ("http://bucket/p", {}, "not an S3 URL"),
    ("s3:///p", {}, "not an S3 URL"),
    ("s3://bucket/p", {"regoin": "x"}, "unknown S3 setting 'regoin'"),
    ("s3://bucket/p", {"concurrency": "8"}, "concurrency must be an integer"),
    ("s3://bucket/p", {"concurrency": 0}, "concurrency must be positive"),
    ("s3://bucket/p", {"read_timeout": True}, "read_timeout must be a number"),
    ("s3://bucket/p", {"conditional_writes": "yes"}, "conditional_writes must be true or false"),
    ("s3://bucket/p", {"addressing_style": "sideways"},
     "addressing_style must be one of auto, path, virtual, not 'sideways'"),
])
def test_bad_urls_and_settings(url: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidLocation, match=message) as info:
        S3Backend.from_url(url, options=options)
    assert "hunter2" not in str(info.value)


def test_open_backend_finds_the_plugin(moto_server: MotoServer, s3_bucket: str) -> None:
    from vmrepo.plugins import open_backend

    b = open_backend(s3_url(s3_bucket), create=True,
                     options={"endpoint": moto_server.endpoint, "region": "us-east-1"})
    assert isinstance(b, RetryingBackend) and isinstance(b.inner, S3Backend)
    b.put("k", b"v")
    assert b.get("k") == b"v"


# What goes over the wire.

@pytest.mark.parametrize("checksum", ["crc32", "md5"])
def test_the_body_checksum_is_sent(proxy: FaultProxy, s3_bucket: str, checksum: str) -> None:
    b = make_backend(proxy.endpoint, s3_bucket, checksum=checksum)
    parts = [b"abc", memoryview(b"defg"), bytearray(70_000)]
    proxy.plan(())
    b.put("data/00/x", parts)
    b.create("locks/y", b"lock")
    puts = [r for r in proxy.requests if r.method == "PUT" and r.target.count("/") > 1]
    joined = b"abcdefg" + bytes(70_000)
    if checksum == "md5":
        assert puts and all(r.headers.get("content-md5") == r.body_md5 for r in puts)
        assert puts[0].headers["content-md5"] == \
            base64.b64encode(hashlib.md5(joined).digest()).decode()
        assert "x-amz-checksum-crc32" not in puts[0].headers
    else:
        assert puts and all(r.headers.get("x-amz-checksum-crc32") == r.body_crc32
                            for r in puts)
        assert "content-md5" not in puts[0].headers
    assert "aws-chunked" not in puts[0].headers.get("content-encoding", "")  # no trailers
    assert puts[-1].headers.get("if-none-match") == "*"
    assert b.get("data/00/x") == joined


def test_boto_does_not_retry(proxy: FaultProxy, s3_bucket: str) -> None:
    b = make_backend(proxy.endpoint, s3_bucket)
    b.put("k", b"v")
    for fault in ("500", "503", "drop", "short"):
        proxy.plan([fault])
        with pytest.raises(TransientError, match="s3://.*/repo/k"):
            b.get("k")
        assert sum(proxy.counts.values()) == 1


# The retry wrapper in front of S3, through faults.

@pytest.mark.parametrize("fault", ["500", "503", "drop", "lost", "delay", "short"])
def test_each_fault_is_retried(proxy: FaultProxy, s3_bucket: str, fault: str) -> None:
    inner = make_backend(proxy.endpoint, s3_bucket, read_timeout=0.5)
    b = retrying(inner)
    data = bytes(range(256)) * 4096
    for op in ("put", "get", "ranged", "stat", "list", "create", "delete"):
        proxy.plan([fault])
        if op == "put":
            b.put("data/01/obj", data)
        elif op == "get":
            assert b.get("data/01/obj") == data
        elif op == "ranged":
            assert b.get("data/01/obj", 1000, 5000) == data[1000:6000]
        elif op == "stat":
            assert b.stat("data/01/obj").size == len(data)
        elif op == "list":
            assert [i.key for i in b.list("data/")] == ["data/01/obj"]
        elif op == "create":
            b.create("locks/mine", b"me")
            assert b.get("locks/mine") == b"me"
        else:
            b.delete("locks/mine")
            assert not b.exists("locks/mine")
        assert proxy.counts[fault] == 1, op
    # A cut answer to a PUT or DELETE (head only, no body) reads as a success: it was one.
    assert b.retries == (4 if fault == "short" else 7)


def test_permanent_failure_gives_up_in_one_line(proxy: FaultProxy, s3_bucket: str) -> None:
    b = retrying(make_backend(proxy.endpoint, s3_bucket), attempts=3)
    b.put("data/02/obj", b"x")
    proxy.plan(["503"] * 10)
    with pytest.raises(TransientError) as info:
        b.get("data/02/obj")
    msg = str(info.value)
    assert "\n" not in msg and "s3://" in msg and "data/02/obj" in msg and "SlowDown" in msg
    assert info.value.key == "data/02/obj" and proxy.counts["503"] == 3
    proxy.plan(())
    assert b.get("data/02/obj") == b"x"


# Error mapping.

def _client_error(code: str, status: int, message: str = "msg") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize("code, status, kind", [
    ("NoSuchKey", 404, ObjectNotFound), ("NoSuchBucket", 404, ObjectNotFound),
    ("404", 404, ObjectNotFound), ("AccessDenied", 403, StoragePermission),
    ("403", 403, StoragePermission), ("InvalidAccessKeyId", 403, StoragePermission),
    ("SignatureDoesNotMatch", 403, StoragePermission), ("SlowDown", 503, TransientError),
    ("503", 503, TransientError), ("InternalError", 500, TransientError),
    ("502", 502, TransientError), ("504", 504, TransientError),
    ("RequestTimeout", 400, TransientError), ("ServiceUnavailable", 503, TransientError),
    ("Throttling", 400, TransientError), ("RequestTimeTooSkewed", 403, TransientError),
    ("QuotaExceeded", 403, StorageFull), ("EntityTooLarge", 400, StorageFull),
    ("BucketAlreadyExists", 409, BackendUnavailable),
    ("InvalidBucketName", 400, BackendUnavailable),
])
def test_client_errors_map_to_the_tree(code: str, status: int, kind: type) -> None:
    err = _translate(_client_error(code, status), "data/k", "cannot read s3://b/p/data/k")
    assert type(err) is kind and err.key == "data/k"
    assert str(err).startswith("cannot read s3://b/p/data/k: ") and "\n" not in str(err)


@pytest.mark.parametrize("exc, kind", [
    (EndpointConnectionError(endpoint_url="http://x"), TransientError),
    (ConnectionClosedError(endpoint_url="http://x"), TransientError),
    (ReadTimeoutError(endpoint_url="http://x"), TransientError),
    (ConnectTimeoutError(endpoint_url="http://x"), TransientError),
    (IncompleteReadError(actual_bytes=1, expected_bytes=2), TransientError),
    (ResponseStreamingError(error="reset"), TransientError),
    (urllib3.exceptions.ProtocolError("Connection broken"), TransientError),
    (urllib3.exceptions.ReadTimeoutError(None, "/", "timed out"),  # type: ignore[arg-type]
     TransientError),
    (http.client.IncompleteRead(b"ab", 5), TransientError),
    (ConnectionResetError(104, "Connection reset by peer"), TransientError),
    (NoCredentialsError(), StoragePermission),
    (ParamValidationError(report="bad"), BackendUnavailable),
    (SSLError(endpoint_url="https://x", error="[SSL: CERTIFICATE_VERIFY_FAILED] bad"),
     BackendUnavailable),
])
def test_client_failures_map_to_the_tree(exc: Exception, kind: type) -> None:
    err = _translate(exc, "k", "cannot read s3://b/k")
    assert type(err) is kind and "\n" not in str(err) and str(err).startswith("cannot read")


# Credentials stay out of messages and logs.

@pytest.fixture(scope="module")
def auth_server() -> Iterator[MotoServer]:
    """A second moto_server that checks credentials (it knows no access key at all)."""
    server = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        yield server
    finally:
        server.stop()


def _assert_no_secrets(err: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    secret, key_id = TEST_ENV["AWS_SECRET_ACCESS_KEY"], TEST_ENV["AWS_ACCESS_KEY_ID"]
    texts = [str(err), repr(err), str(err.__cause__ or "")]
    assert not any(secret in t or key_id in t for t in texts), texts
    assert all(secret not in r.getMessage() for r in caplog.records)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("vmrepo")]
    assert not any(key_id in m or secret in m for m in ours), ours


def test_wrong_credentials_are_refused_without_showing_them(
        auth_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    aws_test_env(monkeypatch, auth_server.endpoint, tmp_path)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StoragePermission, match="access denied: HTTP 403") as info:
        make_backend(auth_server.endpoint, "some-bucket", create=True)
    assert "s3://some-bucket" in str(info.value)
    _assert_no_secrets(info.value, caplog)
    # Past the bucket check (HEAD: no body), the server explains itself in XML.
    monkeypatch.setattr(S3Backend, "_open_bucket", lambda self, create: None)
    b = make_backend(auth_server.endpoint, "some-bucket")
    for call in (lambda: b.put("config", b"x"), lambda: b.get("config"),
                 lambda: list(b.list("")), lambda: b.create("locks/a", b"x")):
        with pytest.raises(StoragePermission, match="access denied: InvalidAccessKeyId") as info:
            call()
        _assert_no_secrets(info.value, caplog)
    assert any(r.name.startswith("botocore") for r in caplog.records)  # DEBUG was on


def test_server_text_of_a_refusal_is_not_repeated(caplog: pytest.LogCaptureFixture) -> None:
    secret, key_id = TEST_ENV["AWS_SECRET_ACCESS_KEY"], TEST_ENV["AWS_ACCESS_KEY_ID"]
    exc = _client_error("SignatureDoesNotMatch", 403,
                        f"The request signature we calculated does not match; key {key_id}, "
                        f"string to sign signed with {secret}")
    err = _translate(exc, "config", "cannot write s3://b/config")
    assert isinstance(err, StoragePermission)
    _assert_no_secrets(err, caplog)


def test_missing_credentials(moto_server: MotoServer, s3_bucket: str,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoragePermission, match="no usable AWS credentials"):
        make_backend(moto_server.endpoint, s3_bucket)


# The command line on an s3:// repository (the environment reaches the subprocess).

def test_cli_snapshot_and_restore(s3_bucket: str, tmp_path: Path) -> None:
    write_sample_image(tmp_path / "a.raw", 3 << 20, seed=5)
    (tmp_path / "vmrepo.toml").write_text(
        f'repository = "{s3_url(s3_bucket)}"\n[storage]\nconcurrency = 4\n'
        'addressing_style = "path"\n[vm.vm1]\nsource = "file"\n'
        'disks = { disk0 = "a.raw" }\n')
    missing = run_cli("snapshots", cwd=tmp_path, check=False)
    assert missing.returncode == 10 and missing.stderr.count("\n") == 1, missing.stderr
    run_cli("init", "--chunk-size", "64K", "--pack-size", "1M", cwd=tmp_path)
    snap = run_json("snapshot", "vm1", cwd=tmp_path)
    assert snap["totals"]["bytes_stored"] > 0
    (tmp_path / "out").mkdir()
    run_json("restore", "vm1@latest", "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert (tmp_path / "out/disk0.raw").read_bytes() == (tmp_path / "a.raw").read_bytes()
