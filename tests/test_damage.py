"""Damage stays local: broken or foreign objects are reported and skipped, not fatal."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from vmrepo import exitcodes
from vmrepo.locks import acquire
from vmrepo.repository import Repository
from vmrepo.storage.local import LocalBackend

from .helpers import run_cli, run_json, write_sample_image


@pytest.fixture
def two_vms(tmp_path: Path) -> Path:
    write_sample_image(tmp_path / "a.raw", 6 << 20, seed=11)
    write_sample_image(tmp_path / "b.raw", 6 << 20, seed=12)
    (tmp_path / "vmrepo.toml").write_text(
        'repository = "repo"\n'
        '[vm.vm1]\nsource = "file"\ndisks = { disk0 = "a.raw" }\n'
        '[vm.vm2]\nsource = "file"\ndisks = { disk0 = "b.raw" }\n')
    run_cli("init", "--chunk-size", "64K", "--pack-size", "1M", cwd=tmp_path)
    run_json("snapshot", "vm1", cwd=tmp_path)
    return tmp_path


def _index_keys(repo: Path) -> set[str]:
    return {p.name for p in (repo / "index").iterdir()}


def _vm2_snapshot(work: Path) -> tuple[str, set[str]]:
    before = _index_keys(work / "repo")
    snap = run_json("snapshot", "vm2", cwd=work)
    return snap["id"], _index_keys(work / "repo") - before


def _restores(work: Path, vm: str, image: str) -> subprocess.CompletedProcess[str]:
    out = work / f"out-{vm}.raw"
    out.unlink(missing_ok=True)
    res = run_cli("restore", f"{vm}@latest", "--disk", "disk0", "-o", str(out), cwd=work,
                  check=False)
    if res.returncode == 0:
        assert out.read_bytes() == (work / image).read_bytes()
    return res


def test_truncated_index_segment_leaves_unrelated_vms_working(two_vms: Path) -> None:
    _, segments = _vm2_snapshot(two_vms)
    for name in segments:
        path = two_vms / "repo" / "index" / name
        path.write_bytes(path.read_bytes()[:50])
    listed = run_json("snapshots", cwd=two_vms)["snapshots"]
    assert {s["vm"] for s in listed} == {"vm1", "vm2"}
    ok = _restores(two_vms, "vm1", "a.raw")
    assert ok.returncode == 0 and "index/" in ok.stderr  # reported, not fatal
    broken = _restores(two_vms, "vm2", "b.raw")
    assert broken.returncode == exitcodes.INTEGRITY and "not in the index" in broken.stderr
    assert "Traceback" not in broken.stderr
    run_json("snapshot", "vm1", cwd=two_vms)
    run_json("snapshot", "vm2", cwd=two_vms)  # stores again what the damage hid
    assert _restores(two_vms, "vm2", "b.raw").returncode == 0


def test_garbage_snapshot_record_is_named_and_skipped(two_vms: Path) -> None:
    snap_id, _ = _vm2_snapshot(two_vms)
    record = two_vms / "repo" / "snapshots" / snap_id
    record.write_bytes(b"\x00\x93garbage that is not a record")
    res = run_cli("snapshots", "--json", cwd=two_vms)
    assert res.returncode == 0
    doc = json.loads(res.stdout)
    assert [s["vm"] for s in doc["snapshots"]] == ["vm1"]
    assert f"snapshots/{snap_id}" in res.stderr
    assert [p["key"] for p in doc["problems"]] == [f"snapshots/{snap_id}"]
    assert _restores(two_vms, "vm1", "a.raw").returncode == 0
    run_json("snapshot", "vm2", cwd=two_vms)
    assert _restores(two_vms, "vm2", "b.raw").returncode == 0


def test_stray_files_are_ignored_with_a_warning(two_vms: Path) -> None:
    repo = two_vms / "repo"
    for stray in ("snapshots/README", "index/.DS_Store", "data/README.txt", "locks/NOTES",
                  "snapshots/notes.txt"):
        (repo / stray).write_text("someone was here\n")
    res = run_cli("snapshots", cwd=two_vms)
    assert "vm1" in res.stdout and "ignoring snapshots/README" in res.stderr
    run_json("snapshot", "vm2", cwd=two_vms)
    assert _restores(two_vms, "vm1", "a.raw").returncode == 0
    assert _restores(two_vms, "vm2", "b.raw").returncode == 0


def test_junk_lock_is_reported_and_unlock_removes_it(two_vms: Path) -> None:
    (two_vms / "repo" / "locks" / "junk").write_bytes(b"\x00\xffnot a lock")
    snap = run_cli("snapshot", "vm2", cwd=two_vms)
    assert snap.returncode == 0 and "corrupt lock junk" in snap.stderr
    locks = run_json("locks", cwd=two_vms)
    assert [c["id"] for c in locks["corrupt"]] == ["junk"]
    assert "corrupt lock junk" in run_cli("unlock", cwd=two_vms).stdout
    assert not (two_vms / "repo" / "locks" / "junk").exists()


def test_damaged_config_is_blamed_on_the_config(two_vms: Path) -> None:
    cfg = two_vms / "repo" / "config"
    raw = bytearray(cfg.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    cfg.write_bytes(bytes(raw))
    res = run_cli("snapshots", cwd=two_vms, check=False)
    assert res.returncode == exitcodes.INTEGRITY
    assert "config" in res.stderr and "index" not in res.stderr


def test_listing_commands_do_not_read_the_index_and_others_lock_first(two_vms: Path) -> None:
    (two_vms / "repo" / "index" / ("ab" * 32)).write_bytes(b"\x00garbage")
    for args in (["snapshots"], ["show", "vm1@latest"], ["locks"], ["unlock"]):
        res = run_cli(*args, cwd=two_vms)
        assert "index/" not in res.stderr, args
    holder = acquire(Repository.open(LocalBackend(two_vms / "repo")).store, "maintenance",
                     exclusive=True)
    try:
        res = run_cli("restore", "vm1@latest", "-o", str(two_vms), cwd=two_vms, check=False)
        assert res.returncode == exitcodes.LOCKED and "index/" not in res.stderr
        # --no-lock reads anyway (and then meets the damaged segment, reported).
        out = two_vms / "nolock.raw"
        res = run_cli("restore", "vm1@latest", "--disk", "disk0", "-o", str(out), "--no-lock",
                      cwd=two_vms)
        assert "index/" in res.stderr and out.read_bytes() == (two_vms / "a.raw").read_bytes()
    finally:
        holder.release()
    assert os.listdir(two_vms / "repo" / "locks") == []
