"""forget and prune as operators run them: policies, space really freed (on disk and in a
bucket), prune beside running snapshots, prunes killed half-way, a full disk, offsite
retention."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from vmrepo import exitcodes

from .helpers import killpoint, plant_lock, run_cli, run_json, vmrepo_bin, write_sample_image
from .s3server import moto_server, s3_bucket, s3_url  # noqa: F401 - fixtures

MiB = 1 << 20


def _config(work: Path, repository: str, extra: str = "", top: str = "",
            vm1: str = 'disk0 = "a.raw"') -> None:
    (work / "vmrepo.toml").write_text(
        f'repository = "{repository}"\n{top}'
        f'[vm.vm1]\nsource = "file"\ndisks = {{ {vm1} }}\n'
        '[vm.vm2]\nsource = "file"\ndisks = { disk0 = "b.raw" }\n' + extra)


def _change(path: Path, rnd: random.Random, writes: int = 6) -> None:
    with open(path, "r+b") as f:
        for _ in range(writes):
            f.seek(rnd.randrange(0, path.stat().st_size - 100_000))
            f.write(rnd.randbytes(100_000))


def _snapshots(work: Path, n: int, seed: int = 1, tags: dict[int, str] | None = None
               ) -> list[tuple[str, bytes]]:
    """``n`` snapshots of vm1, the disk changed before each but the first."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        if i:
            _change(work / "a.raw", rnd)
        extra = ["--tag", tags[i]] if tags and i in tags else []
        sid = run_json("snapshot", "vm1", *extra, cwd=work)["id"]
        out.append((sid, (work / "a.raw").read_bytes()))
    return out


def _restores(work: Path, snaps: list[tuple[str, bytes]], vm: str = "vm1") -> None:
    """Each snapshot's disk0 restores to the bytes it had."""
    for sid, content in snaps:
        out = work / f"r-{sid[:8]}.raw"
        run_cli("restore", f"{vm}@{sid[:8]}", "--disk", "disk0", "-o", str(out), "--force",
                cwd=work)
        assert out.read_bytes() == content, f"{vm}@{sid[:8]} restored different bytes"
        out.unlink()


def _pack_bytes_on_disk(repo: Path) -> tuple[int, int]:
    """Bytes of the pack files, and the bytes their blocks take."""
    files = [p.stat() for p in (repo / "data").glob("*/*")]
    return sum(s.st_size for s in files), sum(s.st_blocks * 512 for s in files)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    write_sample_image(tmp_path / "a.raw", 8 * MiB, seed=71)
    _config(tmp_path, "repo")
    run_cli("init", "--chunk-size", "64K", "--pack-size", "256K", cwd=tmp_path)
    return tmp_path


def _hold_vm_lock(work: Path, vm: str) -> None:
    """A live snapshot's lock on ``vm`` (this process holds it, refreshed now)."""
    from vmrepo.locks import vm_scope
    from vmrepo.repository import Repository
    from vmrepo.storage.local import LocalBackend

    repo = Repository.open(LocalBackend(work / "repo"))
    plant_lock(repo.store, os.getpid(), True, scope=vm_scope(vm), operation=f"snapshot {vm}")


def test_forget_of_locked_vms(work: Path) -> None:
    """Forget leaves a VM whose snapshot runs as it is: exit 12 when that was all it was
    asked, 8 when it forgot other VMs' snapshots."""
    write_sample_image(work / "b.raw", 2 * MiB, seed=72)
    _snapshots(work, 2)
    for _ in range(2):
        run_json("snapshot", "vm2", cwd=work)
    _hold_vm_lock(work, "vm1")
    alone = run_cli("forget", "vm1", "--keep-last", "1", cwd=work, check=False)
    assert alone.returncode == exitcodes.LOCKED, alone.stderr
    assert "the snapshots of vm1 were left as they are: another operation holds" \
        in alone.stderr
    named = run_cli("forget", "vm1@latest", cwd=work, check=False)  # named, not a policy
    assert named.returncode == exitcodes.LOCKED, named.stderr
    vm2_first = run_json("snapshots", "vm2", cwd=work)["snapshots"][0]["id"]
    some = run_cli("forget", "vm1@latest", f"vm2@{vm2_first[:8]}", cwd=work, check=False)
    assert some.returncode == exitcodes.SOME_FAILED, some.stderr
    assert vm2_first not in {s["id"] for s in run_json("snapshots", cwd=work)["snapshots"]}
    run_json("snapshot", "vm2", cwd=work)
    both = run_cli("forget", "--keep-last", "1", "--json", cwd=work, check=False)
    assert both.returncode == exitcodes.SOME_FAILED, both.stderr
    doc = json.loads(both.stdout)  # one document
    assert doc["skipped_vms"] == ["vm1"] and doc["removed"] == 1
    left = [s["vm"] for s in run_json("snapshots", cwd=work)["snapshots"]]
    assert sorted(left) == ["vm1", "vm1", "vm2"]


# -- policy, and the space really freed ---------------------------------------


def _forget_five_down_to_policy(work: Path) -> int:
    """Five snapshots forgotten down to a policy and pruned; the pack bytes before."""
    snaps = _snapshots(work, 5, tags={1: "keep"})
    before = run_json("stats", cwd=work)["pack_bytes"]
    plan = run_json("forget", "--keep-last", "2", "--keep-tag", "keep", "--dry-run", cwd=work)
    rows = plan["vms"]["vm1"]["snapshots"]
    assert [r["action"] for r in rows] == ["keep", "keep", "remove", "keep", "remove"]
    assert rows[0]["reasons"] == ["last 1"] and rows[3]["reasons"] == ["tag keep"]
    assert plan["removed"] == 2 and len(run_json("snapshots", cwd=work)["snapshots"]) == 5
    done = run_json("forget", "--keep-last", "2", "--keep-tag", "keep", "--prune",
                    "--grace", "0", "--max-unused", "0", cwd=work)
    assert done["removed"] == 2 and done["prune"]["bytes_deleted"] > 0
    kept = [snaps[1], snaps[3], snaps[4]]
    assert [s["id"] for s in run_json("snapshots", cwd=work)["snapshots"]] == \
        [sid for sid, _ in kept]
    _restores(work, kept)
    return int(before)


def test_five_snapshots_forgotten_to_a_policy_and_pruned(work: Path) -> None:
    before = _forget_five_down_to_policy(work)
    after, blocks = _pack_bytes_on_disk(work / "repo")
    stats = run_json("stats", cwd=work)
    # What is left is what the kept snapshots reference, plus the packs' own headers.
    assert after == stats["pack_bytes"] < before
    assert after - stats["unique_stored"] < stats["packs"] * 1024
    assert blocks <= after + stats["packs"] * 4096
    assert not list((work / "repo" / "marks").iterdir())


def test_space_freed_in_a_bucket(tmp_path: Path, s3_bucket: str) -> None:  # noqa: F811
    write_sample_image(tmp_path / "a.raw", 8 * MiB, seed=72)
    _config(tmp_path, s3_url(s3_bucket))
    run_cli("init", "--chunk-size", "64K", "--pack-size", "256K", cwd=tmp_path)
    before = _forget_five_down_to_policy(tmp_path)
    s3 = boto3.client("s3")
    listed = sum(o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=s3_bucket, Prefix="repo/data/") for o in page.get("Contents", []))
    stats = run_json("stats", cwd=tmp_path)
    assert listed == stats["pack_bytes"] < before
    assert listed - stats["unique_stored"] < stats["packs"] * 1024


def test_forget_named_snapshots_and_policies_from_the_config(work: Path) -> None:
    snaps = _snapshots(work, 4)
    res = run_json("forget", f"vm1@{snaps[0][0][:8]}", "vm1@latest~1", cwd=work)
    assert res["removed"] == 2
    left = [s["id"] for s in run_json("snapshots", cwd=work)["snapshots"]]
    assert left == [snaps[1][0], snaps[3][0]]
    _config(work, "repo", top="keep = { last = 1 }\n")
    run_json("forget", cwd=work)
    assert [s["id"] for s in run_json("snapshots", cwd=work)["snapshots"]] == [snaps[3][0]]
    # A policy never removes every snapshot of a VM unless told to.
    safe = run_json("forget", "vm1", "--keep-tag", "none", cwd=work)
    assert safe["removed"] == 0
    assert "never removes every snapshot" in safe["vms"]["vm1"]["snapshots"][0]["reasons"][0]
    # Named VMs and --keep-none without a rule: all of them go, whatever the config keeps.
    gone = run_json("forget", "vm1", "--keep-none", cwd=work)
    assert gone["removed"] == 1 and run_json("snapshots", cwd=work)["snapshots"] == []


@pytest.mark.parametrize(("args", "code", "message"), [
    ((), exitcodes.CONFIG, "no keep rule given"),
    (("--keep-daily", "x"), exitcodes.USAGE, "'x' is not a valid integer"),
    (("--keep-within", "7 days"), exitcodes.USAGE, "invalid duration '7 days'"),
    (("--keep-last", "1", "vm1@latest"), exitcodes.USAGE, "not both"),
    (("vm1@2020-01-01",), exitcodes.NO_SNAPSHOT, "no snapshot matches vm1@2020-01-01"),
    (("--keep-none",), exitcodes.USAGE, "name the VMs"),
    (("--keep-last", "1", "--grace", "soon"), exitcodes.USAGE, "not 'soon'"),
    (("--keep-last", "1", "--grace", "9000y"), exitcodes.USAGE, "not '9000y'"),
    (("--keep-last", "1", "--grace", "99999d"), exitcodes.USAGE, "longer than ten years"),
    (("--keep-last", "0"), exitcodes.USAGE, "every --keep-* count is 0"),
    (("nosuchvm", "--keep-last", "1"), exitcodes.NO_SNAPSHOT, "no snapshot of VM nosuchvm"),
    (("--keep-last", "1", "--max-unused", "150"), exitcodes.USAGE, "between 0 and 100"),
])
def test_forget_errors_are_one_line(work: Path, args: tuple[str, ...], code: int,
                                    message: str) -> None:
    run_cli("snapshot", "vm1", cwd=work)
    res = run_cli("forget", *args, cwd=work, check=False)
    assert res.returncode == code, res.stderr
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert len(run_json("snapshots", cwd=work)["snapshots"]) == 1


def test_a_bad_keep_table_in_the_config_is_reported(work: Path) -> None:
    _config(work, "repo", "[remote.off]\nrepository = \"off\"\nkeep = { dayly = 7 }\n")
    res = run_cli("snapshots", cwd=work, check=False)
    assert res.returncode == exitcodes.CONFIG
    assert "[remote.off] keep: retention: unknown key 'dayly'; did you mean 'daily'?" in \
        res.stderr


def test_prune_refuses_a_repository_with_a_damaged_snapshot(work: Path) -> None:
    snaps = _snapshots(work, 2)
    record = work / "repo" / "snapshots" / snaps[0][0]
    record.write_bytes(b"garbage")
    res = run_cli("prune", "--grace", "0", cwd=work, check=False)
    assert res.returncode == exitcodes.INTEGRITY
    assert "prune refused" in res.stderr and snaps[0][0] in res.stderr
    assert not (work / "repo" / "marks").exists()


# -- prune killed half-way ----------------------------------------------------


@pytest.fixture(scope="module")
def forgotten_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any]]:
    """A repository with five snapshots, three forgotten (not pruned), and the kept ones'
    contents; each test works on its own copy."""
    work = tmp_path_factory.mktemp("killed")
    write_sample_image(work / "a.raw", 4 * MiB, seed=73)
    _config(work, "repo")
    env = {"VMREPO_CACHE_DIR": str(work / "cache")}
    run_cli("init", "--chunk-size", "64K", "--pack-size", "256K", cwd=work, env=env)
    rnd = random.Random(3)
    snaps = []
    for i in range(5):
        if i:  # the same MiB rewritten (packs of garbage once the snapshots are forgotten),
            # and chunks here and there (garbage in packs that also hold chunks in use)
            with open(work / "a.raw", "r+b") as f:
                f.write(rnd.randbytes(MiB))
                for _ in range(8):
                    f.seek(MiB + rnd.randrange(48) * 64 * 1024)
                    f.write(rnd.randbytes(64 * 1024))
        sid = run_json("snapshot", "vm1", cwd=work, env=env)["id"]
        snaps.append((sid, (work / "a.raw").read_bytes()))
    run_cli("forget", "--keep-last", "2", cwd=work, env=env)
    return work, snaps[-2:]


def _copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "repo", dst / "repo")
    shutil.copy(src / "vmrepo.toml", dst)
    return dst


def _packs(work: Path) -> set[str]:
    return {p.name for p in (work / "repo" / "data").glob("*/*")}


@pytest.mark.parametrize(("operation", "prefix", "nth", "when"), [
    ("put", "marks/", 1, "after"),     # the mark written, not armed
    ("put", "marks/", 2, "after"),     # armed, nothing swept
    ("put", "index/", 1, "after"),     # the merged segment written, the old ones still there
    ("delete", "index/", 1, "after"),  # some old segments gone
    ("delete", "data/", 2, "after"),   # some packs gone
    ("delete", "marks/", 1, "before"),  # every pack gone, the mark still there
])
def test_a_prune_killed_half_way_loses_nothing_and_the_rerun_finishes(
        forgotten_repo: tuple[Path, list[Any]], tmp_path: Path, operation: str, prefix: str,
        nth: int, when: str) -> None:
    src, kept = forgotten_repo
    reference = _copy_of(src, tmp_path / "reference")
    run_cli("prune", "--grace", "0", "--max-unused", "100", cwd=reference,
            env={"VMREPO_CACHE_DIR": str(tmp_path / "ref-cache")})
    work = _copy_of(src, tmp_path / "killed")
    for name in ("a.raw",):
        shutil.copy(src / name, work)
    killed = subprocess.run(killpoint(operation, prefix, str(nth), when,
                                      "--", "prune", "--grace", "0", "--max-unused", "100"),
                            cwd=work, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    _restores(work, kept)
    # What the prune condemned but did not delete yet is no damage: verify says so.
    verified = run_json("verify", cwd=work)
    assert verified["clean"], verified["findings"]
    # Once the index no longer names them (the merged segment written), until swept.
    assert (verified["condemned_packs"] > 0) == (prefix in ("index/", "data/")), verified
    for _ in range(2):  # a leftover mark may need its own run
        run_cli("prune", "--grace", "0", "--max-unused", "100", cwd=work)
    assert _packs(work) == _packs(reference)
    assert not list((work / "repo" / "marks").iterdir())
    _restores(work, kept)


def test_a_repack_killed_half_way(forgotten_repo: tuple[Path, list[Any]],
                                  tmp_path: Path) -> None:
    src, kept = forgotten_repo
    work = _copy_of(src, tmp_path / "killed")
    killed = subprocess.run(killpoint("put", "data/", "1", "after",
                                      "--", "prune", "--grace", "0", "--max-unused", "0"),
                            cwd=work, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    _restores(work, kept)
    for _ in range(2):
        run_cli("prune", "--grace", "0", "--max-unused", "0", cwd=work)
    stats = run_json("stats", cwd=work)
    assert stats["pack_bytes"] - stats["unique_stored"] < stats["packs"] * 1024
    _restores(work, kept)


# -- prune beside running snapshots -------------------------------------------


def _retention(work: Path, rnd: random.Random, errors: list[str],
               reports: list[dict[str, Any]]) -> None:
    """Forget every snapshot of vm2, then prune twice (zero grace), with short pauses."""
    for args in (("--retry-lock", "60s", "forget", "vm2", "--keep-none"),
                 ("prune", "--grace", "0"), ("prune", "--grace", "0")):
        res = run_cli(*args, "--json", cwd=work, check=False)
        if res.returncode:
            errors.append(f"vmrepo {' '.join(args)}: {res.stderr}")
        elif args[0] == "prune":
            reports.append(json.loads(res.stdout))
        time.sleep(rnd.random() * 0.2)


def _rounds(work: Path, rounds: int, seed: int) -> None:
    """Each round: vm2 snapshots the image vm1 will have next, then vm1 snapshots it while
    vm2's snapshot is forgotten and pruned (zero grace) beside it: vm1's snapshot
    deduplicates against packs that are being condemned and swept."""
    rnd = random.Random(seed)
    shutil.copy(work / "a.raw", work / "b.raw")
    (work / "static.raw").write_bytes(rnd.randbytes(48 * MiB))  # makes vm1's snapshots last
    _config(work, (work / "vmrepo.toml").read_text().split('"')[1],
            vm1='disk0 = "a.raw", disk1 = "static.raw"')
    taken: list[tuple[str, bytes]] = []
    reports: list[dict[str, Any]] = []
    stored_again = 0
    for r in range(rounds):
        _change(work / "b.raw", rnd, writes=3)
        run_cli("snapshot", "vm2", cwd=work)
        shutil.copy(work / "b.raw", work / "a.raw")
        content = (work / "a.raw").read_bytes()
        errors: list[str] = []
        t = threading.Thread(target=_retention, args=(work, rnd, errors, reports))
        t.start()
        time.sleep(rnd.uniform(0.1, 0.8))
        res = subprocess.run([vmrepo_bin(), "snapshot", "vm1", "--json"], cwd=work,
                             capture_output=True, text=True, timeout=300)
        t.join()
        assert not errors, f"round {r}: {errors}"
        assert res.returncode == 0, f"round {r}: {res.stderr}"
        snap = json.loads(res.stdout)
        stored_again += snap["totals"]["chunks_new"] > 0
        taken.append((snap["id"], content))
    waited = sum(1 for p in reports if any(m["waiting_for"] for m in p["pending"]))
    spared = sum(p["packs_spared"] for p in reports)
    print(f"{rounds} rounds: {waited} prunes waited for a running snapshot, {spared} "
          f"condemned packs spared, {stored_again} snapshots stored condemned data again")
    assert waited + spared + stored_again, "prune and snapshots never overlapped"
    _restores(work, taken)
    for _ in range(2):
        run_cli("prune", "--grace", "0", cwd=work)
    _restores(work, taken)


def test_prune_beside_snapshots_twenty_rounds(tmp_path: Path) -> None:
    write_sample_image(tmp_path / "a.raw", 4 * MiB, seed=74)
    _config(tmp_path, "repo")
    run_cli("init", "--chunk-size", "64K", "--pack-size", "256K", cwd=tmp_path)
    _rounds(tmp_path, 20, seed=5)


def test_prune_beside_snapshots_twenty_rounds_on_s3(tmp_path: Path,
                                                    s3_bucket: str) -> None:  # noqa: F811
    write_sample_image(tmp_path / "a.raw", 4 * MiB, seed=75)
    _config(tmp_path, s3_url(s3_bucket))
    run_cli("init", "--chunk-size", "64K", "--pack-size", "256K", cwd=tmp_path)
    _rounds(tmp_path, 20, seed=6)


# -- a full disk ---------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_repository_is_brought_back_by_forget_and_prune(tmp_path: Path,
                                                               small_tmpfs: Path) -> None:
    with open(tmp_path / "a.raw", "wb") as f:
        f.write(random.Random(9).randbytes(6 * MiB))
    _config(tmp_path, str(small_tmpfs / "repo"))
    run_cli("init", "--chunk-size", "64K", "--pack-size", "256K", cwd=tmp_path)
    rnd = random.Random(10)
    full = None
    for _ in range(8):
        res = run_cli("snapshot", "vm1", cwd=tmp_path, check=False)
        if res.returncode:
            full = res
            break
        with open(tmp_path / "a.raw", "wb") as f:  # all new data each time
            f.write(rnd.randbytes(6 * MiB))
    assert full is not None, "the tmpfs never filled"
    assert full.returncode == exitcodes.STORAGE and "space" in full.stderr, full.stderr
    kept = run_json("snapshots", cwd=tmp_path)["snapshots"][-1]
    run_cli("forget", "--keep-last", "1", "--prune", "--grace", "0", cwd=tmp_path)
    content = (tmp_path / "a.raw").read_bytes()
    after = run_json("snapshot", "vm1", cwd=tmp_path)
    _restores(tmp_path, [(after["id"], content)])
    assert kept["id"] in [s["id"] for s in run_json("snapshots", cwd=tmp_path)["snapshots"]]


# -- offsite retention ---------------------------------------------------------


def test_copy_applies_the_remote_policy(work: Path) -> None:
    days = ["2024-04-28", "2024-04-29", "2024-04-30", "2024-05-01", "2024-05-02"]
    months = ["2024-02-10", "2024-03-10"]
    rnd = random.Random(12)
    contents = {}
    faketime = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
    if not Path(faketime).exists():
        pytest.skip("needs libfaketime (Debian faketime)")
    for day in months + days:
        _change(work / "a.raw", rnd, writes=2)
        sid = run_json("snapshot", "vm1", cwd=work,
                       env={"LD_PRELOAD": faketime, "FAKETIME": f"@{day} 12:00:00"})["id"]
        contents[day] = (sid, (work / "a.raw").read_bytes())
    _config(work, "repo", '[remote.offsite]\nrepository = "offsite"\n')
    run_cli("-r", "offsite", "init", "--copy-params-from", "repo", cwd=work)
    assert run_json("copy", "--to", "offsite", cwd=work)["snapshots"] == 7
    _config(work, "repo", '[remote.offsite]\nrepository = "offsite"\nkeep = { monthly = 3 }\n',
            top="keep = { daily = 3 }\n")
    # The nightly routine: copy offsite (the remote's policy applies there), forget here.
    res = run_json("copy", "--to", "offsite", "--grace", "0", cwd=work)
    assert res["retention"]["kept"] == 3 and res["retention"]["removed"] == 4
    assert res["retention"]["prune"]["bytes_deleted"] > 0
    again = run_json("copy", "--to", "offsite", "--grace", "0", cwd=work)
    assert again["snapshots"] == 0 and again["bytes_sent"] == 0  # the forgotten stay away
    assert again["left_out_by_policy"] == 4 and again["retention"]["removed"] == 0
    # For people: what the copy did first, then what the remote's retention did there.
    said = run_cli("copy", "--to", "offsite", "--grace", "0", cwd=work).stdout.splitlines()
    assert said[0].startswith("nothing to copy: ") and "all 3 snapshots already" in said[0]
    assert said[1] == "offsite: left out 4 snapshots its keep policy would forget at once"
    assert said[2].startswith("offsite: ") and said[2].endswith("removed 0 snapshots, kept 3")
    local = run_json("forget", "--prune", "--grace", "0", cwd=work)
    assert local["removed"] == 4 and local["prune"]["bytes_deleted"] > 0
    here = {s["id"] for s in run_json("snapshots", cwd=work)["snapshots"]}
    there = {s["id"] for s in run_json("-r", "offsite", "snapshots", cwd=work)["snapshots"]}
    assert here == {contents[d][0] for d in ("2024-04-30", "2024-05-01", "2024-05-02")}
    assert there == {contents[d][0] for d in ("2024-03-10", "2024-04-30", "2024-05-02")}
    out = work / "march.raw"
    run_cli("-r", "offsite", "restore", f"vm1@{contents['2024-03-10'][0][:8]}", "--disk",
            "disk0", "-o", str(out), cwd=work)
    assert out.read_bytes() == contents["2024-03-10"][1]
