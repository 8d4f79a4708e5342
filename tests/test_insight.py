"""stats, diff, tag, snapshot listings with filters, snapshot --all, init --compression."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from vmrepo import exitcodes

from .helpers import run_cli, run_json, write_sample_image

CS = 64 << 10


@pytest.fixture
def work(tmp_path: Path) -> Path:
    write_sample_image(tmp_path / "a.raw", 4 << 20, seed=41)
    write_sample_image(tmp_path / "b.raw", 2 << 20, seed=42)
    (tmp_path / "vmrepo.toml").write_text(
        'repository = "repo"\n'
        '[vm.vm1]\nsource = "file"\ndisks = { disk0 = "a.raw" }\n'
        '[vm.vm2]\nsource = "file"\ndisks = { disk0 = "b.raw" }\n')
    run_cli("init", "--chunk-size", "64K", cwd=tmp_path)
    return tmp_path


def test_diff_names_the_changed_ranges(work: Path) -> None:
    a = run_json("snapshot", "vm1", cwd=work)["id"]
    with open(work / "a.raw", "r+b") as f:
        for off in (5 * CS + 10, 6 * CS, 40 * CS + 100):
            f.seek(off)
            f.write(os.urandom(50))
    b = run_json("snapshot", "vm1", cwd=work)["id"]
    doc = run_json("diff", f"vm1@{a[:8]}", f"vm1@{b[:8]}", cwd=work)
    (disk,) = doc["disks"]
    assert disk["state"] == "changed"
    assert disk["ranges"] == [[5 * CS, 7 * CS], [40 * CS, 41 * CS]]
    assert disk["changed_bytes"] == 3 * CS
    same = run_json("diff", f"vm1@{b[:8]}", f"vm1@{b[:8]}", cwd=work)
    assert same["disks"][0]["state"] == "same"
    text = run_cli("diff", f"vm1@{a[:8]}", f"vm1@{b[:8]}", cwd=work).stdout
    assert "changed in 2 ranges" in text
    # The end excluded, as verify and restore --allow-damaged write ranges.
    assert f"bytes {5 * CS}-{7 * CS} (" in text and f"bytes {40 * CS}-{41 * CS} (" in text


def test_counts_are_said_in_the_singular_for_one() -> None:
    from vmrepo.units import counted

    assert [counted(n, "range") for n in (0, 1, 2)] == ["0 ranges", "1 range", "2 ranges"]


def test_stats_counts_logical_unique_stored_and_what_each_snapshot_holds(work: Path) -> None:
    run_json("snapshot", "vm1", cwd=work)
    run_json("snapshot", "vm1", cwd=work)  # nothing changed
    with open(work / "a.raw", "r+b") as f:
        f.seek(0)
        f.write(os.urandom(CS))
    third = run_json("snapshot", "vm1", cwd=work)
    doc = run_json("stats", cwd=work)
    assert doc["snapshots"] == 3
    logical = [s["logical"] for s in doc["per_snapshot"]]
    assert logical[0] == logical[1] > 0 and logical[2] >= logical[1]
    assert doc["logical"] == sum(logical)
    assert doc["dedup_ratio"] > 2.5  # three snapshots of nearly the same disk
    assert doc["unique_stored"] <= doc["pack_bytes"]
    assert doc["per_snapshot"][1]["added"] < 4096  # only a new root
    assert doc["per_snapshot"][2]["exclusive_raw"] >= CS  # the rewritten chunk
    assert doc["per_snapshot"][1]["exclusive_raw"] == 0
    one = run_json("stats", f"vm1@{third['id'][:8]}", cwd=work)
    assert [s["id"] for s in one["per_snapshot"]] == [third["id"]]
    assert "dedup ratio" in run_cli("stats", cwd=work).stdout


def test_tags_change_and_filter_the_listing(work: Path) -> None:
    s1 = run_json("snapshot", "vm1", "--tag", "daily", cwd=work)["id"]
    run_json("snapshot", "vm1", cwd=work)
    run_json("snapshot", "vm2", "--tag", "daily", cwd=work)
    doc = run_json("tag", f"vm1@{s1[:8]}", "--add", "keep", "--remove", "daily", cwd=work)
    assert doc["tags"] == ["keep"] and doc["changed"]
    listed = run_json("snapshots", "--tag", "daily", cwd=work)["snapshots"]
    assert [s["vm"] for s in listed] == ["vm2"]
    assert [s["id"] for s in run_json("snapshots", "--tag", "keep", cwd=work)["snapshots"]] \
        == [s1]
    last = run_json("snapshots", "--last", "1", cwd=work)["snapshots"]
    assert sorted(s["vm"] for s in last) == ["vm1", "vm2"] and s1 not in {s["id"] for s in last}
    table = run_cli("snapshots", cwd=work).stdout.splitlines()
    assert table[0].split()[-2:] == ["TAKEN", "TAGS"] and "ADDED" in table[0]
    assert any(line.endswith("  keep") for line in table)
    bad = run_cli("tag", "vm1@latest", "--add", "two words", cwd=work, check=False)
    assert bad.returncode == exitcodes.USAGE


def test_snapshot_all_reports_each_vm_and_says_if_any_failed(work: Path) -> None:
    doc = run_json("snapshot", "--all", cwd=work)
    assert sorted(s["vm"] for s in doc["snapshots"]) == ["vm1", "vm2"] and doc["failed"] == []
    (work / "b.raw").unlink()
    res = run_cli("snapshot", "--all", "--json", cwd=work, check=False)
    assert res.returncode == exitcodes.SOME_FAILED
    out = json.loads(res.stdout)  # one document, naming the failure
    assert [s["vm"] for s in out["snapshots"]] == ["vm1"]
    assert out["failed"][0]["vm"] == "vm2" and out["failed"][0]["exit_code"] == exitcodes.SOURCE
    assert "vm2: disk disk0: cannot open" in res.stderr
    usage = run_cli("snapshot", cwd=work, check=False)
    assert usage.returncode == exitcodes.USAGE and "--all" in usage.stderr
    both = run_cli("snapshot", "vm1", "--full", "--differential", cwd=work, check=False)
    assert both.returncode == exitcodes.USAGE
    assert "--full and --differential exclude each other" in both.stderr


@pytest.mark.parametrize(("spec", "stored_smaller"), [("zstd:19", True), ("none", False)])
def test_init_compression(tmp_path: Path, spec: str, stored_smaller: bool) -> None:
    (tmp_path / "t.raw").write_bytes(b"compressible text " * 100_000)
    (tmp_path / "vmrepo.toml").write_text(
        'repository = "repo"\n[vm.t]\nsource = "file"\ndisks = { disk0 = "t.raw" }\n')
    doc = run_json("init", "--compression", spec, cwd=tmp_path)
    assert doc["compression"] == ("zstd-19" if spec == "zstd:19" else "none-0")
    snap = run_json("snapshot", "t", cwd=tmp_path)
    tot = snap["totals"]
    assert (tot["bytes_stored"] < tot["bytes_new"] / 10) is stored_smaller
    bad = run_cli("init", "-r", str(tmp_path / "x"), "--compression", "lz4", check=False)
    assert bad.returncode == exitcodes.USAGE and "zstd:LEVEL or none" in bad.stderr
