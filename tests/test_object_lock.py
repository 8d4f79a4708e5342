"""Immutable repositories on S3 Object Lock (moto_server): what is locked, what stolen
credentials can and cannot do, prune under locks, and retention kept ahead.

moto enforces: deleting a retained version (AccessDenied, governance without the bypass
header and compliance alike), lock arguments on a bucket without Object Lock, and the
bucket's lock configuration. It does not enforce that retention may only grow: the tests
use that to move a date closer instead of waiting days (on AWS, shortening needs the
governance bypass permission and is impossible in compliance mode).
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from vmrepo import exitcodes

from .helpers import run_cli, run_json, write_sample_image
from .s3server import moto_server, s3_bucket, s3_url  # noqa: F401 - fixtures

MiB = 1 << 20
FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


@pytest.fixture
def locked(tmp_path: Path, s3_bucket: str) -> tuple[Path, str]:  # noqa: F811
    write_sample_image(tmp_path / "a.raw", 4 * MiB, seed=81)
    (tmp_path / "vmrepo.toml").write_text(
        f'repository = "{s3_url(s3_bucket)}"\n'
        '[vm.vm1]\nsource = "file"\ndisks = { disk0 = "a.raw" }\n')
    res = run_json("init", "--chunk-size", "64K", "--pack-size", "256K",
                   "--object-lock-days", "1", cwd=tmp_path)
    assert res["object_lock"] == {"days": 1, "mode": "governance"}
    return tmp_path, s3_bucket


def _objects(bucket: str, prefix: str = "repo/") -> list[dict[str, Any]]:
    s3 = boto3.client("s3")
    return [o for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix) for o in page.get("Contents", [])]


def _until(bucket: str, key: str, version: str | None = None) -> datetime | None:
    args = {"VersionId": version} if version else {}
    head = boto3.client("s3").head_object(Bucket=bucket, Key=key, **args)
    until = head.get("ObjectLockRetainUntilDate")
    return until if isinstance(until, datetime) else None


def _change(path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    with open(path, "r+b") as f:
        f.write(rnd.randbytes(MiB))  # the first MiB rewritten


def test_every_object_but_locks_and_marks_is_retained(locked: tuple[Path, str]) -> None:
    work, bucket = locked
    run_cli("snapshot", "vm1", cwd=work)
    keys = [o["Key"] for o in _objects(bucket)]
    kinds = {k.split("/")[1] for k in keys}
    assert {"config", "data", "index", "snapshots"} <= kinds
    soon, late = datetime.now(UTC) + timedelta(hours=23), datetime.now(UTC) + timedelta(days=1)
    for key in keys:
        until = _until(bucket, key)
        assert until is not None and soon < until <= late, key
    s3 = boto3.client("s3")
    assert s3.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"][
        "ObjectLockEnabled"] == "Enabled"


def test_stolen_credentials_cannot_destroy_a_snapshot(locked: tuple[Path, str]) -> None:
    work, bucket = locked
    snap = run_json("snapshot", "vm1", cwd=work)
    content = (work / "a.raw").read_bytes()
    s3 = boto3.client("s3")
    versions = s3.list_object_versions(Bucket=bucket, Prefix="repo/")["Versions"]
    for v in versions:  # what an attacker holding vmrepo's credentials would try
        with pytest.raises(ClientError, match="AccessDenied"):
            s3.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
        s3.delete_object(Bucket=bucket, Key=v["Key"])  # only hides it
    assert _objects(bucket) == []
    # The operator's way back: remove the delete markers (docs/operations.md).
    for m in s3.list_object_versions(Bucket=bucket, Prefix="repo/")["DeleteMarkers"]:
        s3.delete_object(Bucket=bucket, Key=m["Key"], VersionId=m["VersionId"])
    out = work / "back.raw"
    run_cli("restore", f"vm1@{snap['id'][:8]}", "--disk", "disk0", "-o", str(out), cwd=work)
    assert out.read_bytes() == content


def test_compliance_mode_refuses_even_the_governance_bypass(tmp_path: Path,
                                                             s3_bucket: str) -> None:  # noqa: F811
    write_sample_image(tmp_path / "a.raw", MiB, seed=82)
    (tmp_path / "vmrepo.toml").write_text(
        f'repository = "{s3_url(s3_bucket)}"\n'
        '[vm.vm1]\nsource = "file"\ndisks = { disk0 = "a.raw" }\n')
    run_cli("init", "--object-lock-days", "2", "--object-lock-mode", "compliance", cwd=tmp_path)
    run_cli("snapshot", "vm1", cwd=tmp_path)
    s3 = boto3.client("s3")
    pack = next(v for v in s3.list_object_versions(Bucket=s3_bucket, Prefix="repo/data/")[
        "Versions"])
    assert s3.head_object(Bucket=s3_bucket, Key=pack["Key"])["ObjectLockMode"] == "COMPLIANCE"
    with pytest.raises(ClientError, match="AccessDenied"):
        s3.delete_object(Bucket=s3_bucket, Key=pack["Key"], VersionId=pack["VersionId"],
                         BypassGovernanceRetention=True)


def test_prune_deletes_only_what_is_no_longer_retained(locked: tuple[Path, str]) -> None:
    work, bucket = locked
    first = run_json("snapshot", "vm1", cwd=work)
    _change(work / "a.raw", 1)
    second = run_json("snapshot", "vm1", cwd=work)
    content = (work / "a.raw").read_bytes()
    run_cli("forget", f"vm1@{first['id'][:8]}", cwd=work)
    rep = run_json("prune", "--grace", "0", "--max-unused", "0", cwd=work)
    condemned = rep["packs_unused"] + rep["packs_repacked"]
    assert condemned > 0 and rep["packs_deleted"] == 0
    assert rep["packs_retained"] == condemned and rep["pending"]
    assert datetime.fromisoformat(rep["retained_until"]) > datetime.now(UTC)
    held = {o["Key"] for o in _objects(bucket, "repo/data/")}
    # The forgotten record is hidden, not destroyed: its version waits for its date.
    s3 = boto3.client("s3")
    hidden = [v for v in s3.list_object_versions(Bucket=bucket, Prefix="repo/snapshots/")[
        "Versions"] if first["id"] in v["Key"]]
    assert hidden and not hidden[0]["IsLatest"]
    # Time passes: every retained version's date comes within two seconds.
    soon = datetime.now(UTC) + timedelta(seconds=2)
    for v in s3.list_object_versions(Bucket=bucket, Prefix="repo/")["Versions"]:
        if v["Key"].split("/")[-1] in {p["id"] for p in rep["pending"]} or \
                not v["IsLatest"] or v["Key"].startswith("repo/data/"):
            s3.put_object_retention(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"],
                                    Retention={"Mode": "GOVERNANCE", "RetainUntilDate": soon})
    time.sleep(3)
    later = run_json("prune", "--grace", "0", "--max-unused", "0", cwd=work)
    assert later["packs_deleted"] == rep["packs_retained"] and not later["pending"]
    assert later["bytes_purged"] > 0
    left = {o["Key"] for o in _objects(bucket, "repo/data/")}
    assert left < held and len(held - left) == rep["packs_retained"]
    versions = s3.list_object_versions(Bucket=bucket, Prefix="repo/")
    hidden_now = [v for v in versions.get("Versions", []) if not v["IsLatest"]]
    assert not [v for v in hidden_now if v["Key"].startswith(("repo/data/", "repo/snapshots/"))]
    for v in hidden_now:  # index segments the sweep merged just now: hidden, still locked
        assert v["Key"].startswith("repo/index/")
        until = _until(bucket, v["Key"], v["VersionId"])
        assert until is not None and until > datetime.now(UTC) + timedelta(hours=23)
    out = work / "r.raw"
    run_cli("restore", f"vm1@{second['id'][:8]}", "--disk", "disk0", "-o", str(out), cwd=work)
    assert out.read_bytes() == content


def test_copy_and_prune_extend_the_lock_of_what_is_kept(locked: tuple[Path, str]) -> None:
    if not Path(FAKETIME).exists():
        pytest.skip("needs libfaketime (Debian faketime)")
    work, bucket = locked
    first = run_json("snapshot", "vm1", cwd=work)
    _change(work / "a.raw", 2)
    run_cli("snapshot", "vm1", cwd=work)
    run_cli("forget", f"vm1@{first['id'][:8]}", cwd=work)
    marked = run_json("prune", "--max-unused", "0", cwd=work)  # condemned, waiting a day
    condemned = marked["packs_unused"] + marked["packs_repacked"]
    assert condemned > 0
    keys = [o["Key"] for o in _objects(bucket) if not o["Key"].startswith(("repo/marks/",
                                                                            "repo/locks/"))]
    before = {k: _until(bucket, k) for k in keys}
    # Twenty hours on, less than half the lock is left: a prune extends it to now + 1 day,
    # except for the condemned packs, whose lock must run out.
    later = {"LD_PRELOAD": FAKETIME, "FAKETIME": "+20h"}
    rep = run_json("prune", "--max-unused", "0", cwd=work, env=later)
    assert rep["objects_extended"] == len(keys) - condemned
    kept = 0
    for k in keys:
        until = _until(bucket, k)
        assert until is not None
        if until - before[k] > timedelta(hours=19):  # type: ignore[operator]
            kept += 1
        else:
            assert until == before[k] and k.startswith("repo/data/"), k
    assert kept == len(keys) - condemned
    again = run_json("prune", cwd=work, env=later)
    assert again["objects_extended"] == 0  # dates it set are remembered


def test_object_lock_needs_an_s3_store(tmp_path: Path) -> None:
    res = run_cli("-r", str(tmp_path / "repo"), "init", "--object-lock-days", "7", check=False)
    assert res.returncode == exitcodes.INCOMPATIBLE
    assert "requires S3 Object Lock, which this store does not have" in res.stderr
    assert not (tmp_path / "repo" / "config").exists()
