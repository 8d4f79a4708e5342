"""verify, repair and salvage on repositories with damage injected one case at a time.

Each case damages a copy of one prepared repository (two VMs, three snapshots, an offsite
copy made before the damage) and checks that verify names the damage, exactly the
snapshots and byte ranges it affects, and the damage exit code; that repair heals it
(from the offsite copy where data is lost); and that every snapshot then restores
byte-identical. The expected ranges are worked out here from the manifests, independently
of verify's own bookkeeping.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import boto3
import pytest
from vmrepo import exitcodes
from vmrepo.backup import SnapshotOptions, take_snapshot
from vmrepo.config import RepoConfig
from vmrepo.format import BlobType, pack_key
from vmrepo.manifest import iter_chunks
from vmrepo.repository import Repository
from vmrepo.sources.file import FileSource
from vmrepo.storage.local import LocalBackend
from vmrepo.verify import VerifyOptions, verify

from .helpers import killpoint, run_cli, run_json, vmrepo_bin, write_sample_image
from .s3server import moto_server, s3_bucket, s3_url  # noqa: F401 - fixtures

MiB = 1 << 20
CS = 64 << 10

Snaps = dict[str, dict[str, bytes]]  # snapshot id -> disk -> content


def _config(work: Path, repository: str) -> None:
    (work / "vmrepo.toml").write_text(
        f'repository = "{repository}"\n[remote.offsite]\nrepository = "offsite"\n'
        '[vm.vm1]\nsource = "file"\ndisks = { disk0 = "a.raw", disk1 = "b.raw" }\n'
        '[vm.vm2]\nsource = "file"\ndisks = { disk0 = "c.raw" }\n')


def _prepare(work: Path, main: str = "repo") -> tuple[Snaps, dict[str, str]]:
    """Three snapshots (vm1 twice, vm2 once) and an offsite copy of them."""
    write_sample_image(work / "a.raw", 3 * MiB, seed=91)
    write_sample_image(work / "b.raw", 2 * MiB, seed=92)
    write_sample_image(work / "c.raw", 2 * MiB, seed=93)
    run_cli("init", "--chunk-size", "64K", "--pack-size", "256K", cwd=work)
    snaps: Snaps = {}
    vms = {}
    for vm, change in (("vm1", False), ("vm1", True), ("vm2", False)):
        if change:
            with open(work / "a.raw", "r+b") as f:
                f.seek(MiB)
                f.write(random.Random(5).randbytes(300_000))
        sid = run_json("snapshot", vm, cwd=work)["id"]
        files = {"disk0": "a.raw", "disk1": "b.raw"} if vm == "vm1" else {"disk0": "c.raw"}
        snaps[sid] = {d: (work / f).read_bytes() for d, f in files.items()}
        vms[sid] = vm
    run_cli("-r", "offsite", "init", "--copy-params-from", main, cwd=work)
    run_cli("copy", "--to", "offsite", cwd=work)
    return snaps, vms


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Snaps, dict[str, str]]:
    work = tmp_path_factory.mktemp("verify")
    _config(work, "repo")
    snaps, vms = _prepare(work)
    return work, snaps, vms


@pytest.fixture
def work(prepared: tuple[Path, Snaps, dict[str, str]], tmp_path: Path) -> Path:
    src = prepared[0]
    for name in ("repo", "offsite"):
        shutil.copytree(src / name, tmp_path / name)
    shutil.copy(src / "vmrepo.toml", tmp_path)
    return tmp_path


def _open(work: Path) -> Repository:
    return Repository.open(LocalBackend(work / "repo"))


def _verify(work: Path, *args: str) -> tuple[int, dict[str, Any]]:
    res = run_cli("verify", "--json", *args, cwd=work, check=False)
    assert res.returncode in (exitcodes.OK, exitcodes.INTEGRITY), res.stderr
    assert all(line.startswith("vmrepo: ") for line in res.stderr.splitlines()), res.stderr
    return res.returncode, json.loads(res.stdout)


def _expected(work: Path, lost: set[bytes]) -> dict[tuple[str, str], list[list[int]]]:
    """The byte ranges each snapshot disk loses when the blobs ``lost`` are gone."""
    repo = _open(work)
    out: dict[tuple[str, str], list[list[int]]] = {}
    for snap in repo.snapshots():
        for d in snap.disks:
            if d.root in lost:
                out[(snap.id, d.name)] = [[0, d.size]]
                continue
            m = repo.manifest(d.root)
            ranges: list[list[int]] = []
            for page_no, pid in enumerate(m.page_ids):
                first, count = m.page_span(page_no)
                if pid in lost:
                    ranges.append([first * CS, min(d.size, (first + count) * CS)])
                    continue
                for i, cid in iter_chunks(m, functools.partial(repo.page, m), iter([page_no])):
                    if cid in lost:
                        ranges.append([i * CS, i * CS + m.chunk_length(i)])
            merged: list[list[int]] = []
            for r in sorted(ranges):
                if merged and r[0] <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], r[1])
                else:
                    merged.append(r)
            if merged:
                out[(snap.id, d.name)] = merged
    return out


def _affected(doc: dict[str, Any]) -> dict[tuple[str, str], list[list[int]]]:
    return {(a["snapshot"], a["disk"]): a["ranges"] for a in doc["affected"]}


def _restores(work: Path, snaps: Snaps) -> None:
    for sid, disks in snaps.items():
        for disk, content in disks.items():
            out = work / "out.raw"
            run_cli("restore", f"{'vm1' if len(disks) == 2 else 'vm2'}@{sid[:8]}",
                    "--disk", disk, "-o", str(out), "--force", cwd=work)
            assert out.read_bytes() == content, f"{sid[:8]} {disk}"


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _chunk_location(work: Path, btype: BlobType = BlobType.CHUNK,
                    only_type: bool = False) -> tuple[bytes, Path, int, int]:
    """A blob of ``btype`` some snapshot references (in a pack holding only that type if
    ``only_type``): its id, pack file, offset and length."""
    repo = _open(work)
    for pid in sorted(repo.existing_packs()):
        header = repo.store.pack_header(pid)
        if only_type and any(e.type != btype for e in header):
            continue
        for e in header:
            if e.type == btype:
                return e.id, work / "repo" / pack_key(pid), e.offset, e.length
    raise AssertionError(f"no {btype.name} found")


# -- each kind of damage ------------------------------------------------------------


def test_an_untouched_repository_verifies_clean(work: Path) -> None:
    code, doc = _verify(work, "--read-data")
    assert code == 0 and doc["clean"] and doc["findings"] == [] and doc["affected"] == []
    assert doc["read_data"]["packs"] == doc["packs"] and len(doc["intact"]) == 3


def test_a_flipped_bit_inside_a_chunk(work: Path, prepared: Any) -> None:
    bid, path, offset, length = _chunk_location(work)
    _flip(path, offset + length // 2)
    assert _verify(work)[0] == 0  # the structure holds; only reading the data shows it
    code, doc = _verify(work, "--read-data")
    assert code == exitcodes.INTEGRITY
    assert [f["key"] for f in doc["findings"]] == [f"blob {bid.hex()}"]
    assert _affected(doc) == _expected(work, {bid})
    _repair_from_offsite(work, prepared[1])


def test_a_flipped_bit_in_a_pack_header(work: Path, prepared: Any) -> None:
    _, path, _, _ = _chunk_location(work, only_type=True)
    size = path.stat().st_size
    hlen = int.from_bytes(path.read_bytes()[size - 12:size - 8], "little")
    _flip(path, size - 12 - hlen + hlen // 2)
    code, doc = _verify(work)
    assert code == exitcodes.INTEGRITY and doc["affected"] == [] and len(doc["intact"]) == 3
    assert [f["key"] for f in doc["findings"]] == [f"data/{path.parent.name}/{path.name}"]
    assert "header" in doc["findings"][0]["problem"]
    run_cli("repair", cwd=work)  # its blobs are fine: rewritten from the pack itself
    assert _verify(work, "--read-data")[1]["clean"]
    _restores(work, prepared[1])


def test_a_truncated_pack(work: Path, prepared: Any) -> None:
    _, path, _, _ = _chunk_location(work, only_type=True)
    repo = _open(work)
    pid = bytes.fromhex(path.name)
    keep = path.stat().st_size // 2
    lost = {e.id for e in repo.store.pack_header(pid) if e.offset + e.length > keep}
    with open(path, "r+b") as f:
        f.truncate(keep)
    code, doc = _verify(work)
    assert code == exitcodes.INTEGRITY
    assert _affected(doc) == _expected(work, lost)
    # Without a replica, repair saves what it can but cannot say the damage is gone.
    res = run_cli("repair", "--json", cwd=work, check=False)
    assert res.returncode == exitcodes.INTEGRITY, res.stderr
    assert json.loads(res.stdout)["still_lost"] == len(lost)
    assert f"repair left {len(lost)} blob{'s' if len(lost) != 1 else ''} lost: no usable copy " \
        "(`--from REPLICA`" in res.stderr
    _repair_from_offsite(work, prepared[1])


def test_a_missing_pack_and_the_next_snapshot(work: Path, prepared: Any) -> None:
    _, path, _, _ = _chunk_location(work, only_type=True)
    repo = _open(work)
    lost = {e.id for e in repo.store.pack_header(bytes.fromhex(path.name))}
    path.unlink()
    code, doc = _verify(work)
    assert code == exitcodes.INTEGRITY
    assert _affected(doc) == _expected(work, lost)
    affected_before = _affected(doc)
    # The next snapshot of vm1, whose disks have new data where the lost chunks were, stores
    # nothing into the missing pack and restores; verify still names the older snapshots.
    rnd = random.Random(7)
    for disk, name in (("disk0", "a.raw"), ("disk1", "b.raw")):
        shutil.copy(prepared[0] / name, work / name)
        with open(work / name, "r+b") as f:
            for (_sid, d), ranges in affected_before.items():
                for start, end in ranges if d == disk else ():
                    f.seek(start)
                    f.write(rnd.randbytes(end - start))
    new = run_json("snapshot", "vm1", cwd=work)
    _restores(work, {new["id"]: {"disk0": (work / "a.raw").read_bytes(),
                                 "disk1": (work / "b.raw").read_bytes()}})
    code, doc = _verify(work)
    assert code == exitcodes.INTEGRITY and _affected(doc) == affected_before
    assert new["id"] in doc["intact"]


def test_an_interrupted_snapshots_packs_are_no_damage(work: Path, prepared: Any) -> None:
    """A snapshot killed between storing a pack and the segment naming it: verify lists
    the pack as not indexed, no damage (a running snapshot's packs look the same), and
    prune removes it."""
    write_sample_image(work / "a.raw", 3 * MiB, seed=191)
    write_sample_image(work / "b.raw", 2 * MiB, seed=192)
    killed = subprocess.run(killpoint("put", "data/", "1", "after", "--", "snapshot", "vm1"),
                            cwd=work, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    code, doc = _verify(work, "--read-data")
    assert code == exitcodes.OK and doc["clean"], doc["findings"]
    n = doc["unindexed_packs"]
    assert n >= 1  # the one put before the kill, and perhaps the other pack thread's
    human = run_cli("verify", cwd=work).stdout
    assert f"not indexed: {n} pack" in human and "of an interrupted or running snapshot" \
        in human, human
    assert "no damage found" in human
    for _ in range(2):  # a mark may need a second run to be swept
        run_cli("prune", "--grace", "0", cwd=work)
    assert _verify(work)[1]["unindexed_packs"] == 0
    _restores(work, prepared[1])


def test_a_snapshot_committed_while_verify_reads_is_no_damage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot commits (packs, segment, record) after verify began: whatever verify
    reads of it, it finds the packs too."""
    Repository.init(LocalBackend(tmp_path / "repo", create=True),
                    RepoConfig.new(chunk_size=64 << 10, pack_size=256 << 10))

    def snapshot(seed: int) -> None:
        image = tmp_path / f"{seed}.raw"
        write_sample_image(image, 2 * MiB, seed=seed)
        take_snapshot(_open(tmp_path), FileSource("vm1", {"disk0": str(image)}),
                      SnapshotOptions(vm="vm1", workers=2))

    snapshot(1)
    checked = _open(tmp_path)
    read_records = checked.snapshots

    def records_while_a_snapshot_commits(vm: str | None = None) -> list[Any]:
        snapshot(2)
        return read_records(vm)

    monkeypatch.setattr(checked, "snapshots", records_while_a_snapshot_commits)
    rep = verify(checked, VerifyOptions(record=False))
    assert rep.clean and rep.snapshots == 2, rep.findings


def test_a_missing_index_segment(work: Path, prepared: Any) -> None:
    repo = _open(work)
    segments = sorted((work / "repo" / "index").iterdir())
    victim = segments[0]
    sid = bytes.fromhex(victim.name)
    in_victim = {rec[0] for rec in repo.store.load_segment(sid).records()}
    others = {rec[0] for s in segments[1:]
              for rec in repo.store.load_segment(bytes.fromhex(s.name)).records()}
    victim.unlink()
    code, doc = _verify(work)
    assert code == exitcodes.INTEGRITY
    assert _affected(doc) == _expected(work, in_victim - others)
    assert any("repair index" in f["problem"] for f in doc["findings"])
    run_cli("repair", "index", cwd=work)
    assert _verify(work, "--read-data")[1]["clean"]
    _restores(work, prepared[1])


def test_every_index_segment_deleted(work: Path, prepared: Any) -> None:
    for segment in (work / "repo" / "index").iterdir():
        segment.unlink()
    code, doc = _verify(work)
    assert code == exitcodes.INTEGRITY and not doc["intact"]
    run_cli("repair", "index", cwd=work)
    assert _verify(work, "--read-data")[1]["clean"]
    _restores(work, prepared[1])


def test_a_corrupt_manifest_page(work: Path, prepared: Any) -> None:
    bid, path, offset, length = _chunk_location(work, BlobType.PAGE)
    _flip(path, offset + length // 2)
    code, doc = _verify(work)
    assert code == exitcodes.INTEGRITY
    assert [f["key"] for f in doc["findings"]] == [f"blob {bid.hex()}"]
    assert _affected(doc) == _expected(work, {bid})
    _repair_from_offsite(work, prepared[1])


def test_a_garbage_snapshot_record(work: Path, prepared: Any) -> None:
    sid = sorted(prepared[1])[0]
    (work / "repo" / "snapshots" / sid).write_bytes(b"\x00garbage")
    code, doc = _verify(work)
    assert code == exitcodes.INTEGRITY and doc["affected"] == []
    assert [f["key"] for f in doc["findings"]] == [f"snapshots/{sid}"]
    assert sorted(doc["intact"]) == sorted(s for s in prepared[1] if s != sid)
    # Named by its id, it is damage (14, the record named), not an unknown snapshot (4).
    named = run_cli("restore", f"vm1@{sid[:8]}", "-o", str(work / "out"), cwd=work,
                    check=False)
    assert named.returncode == exitcodes.INTEGRITY, named.stderr
    assert f"snapshots/{sid}, the record of vm1@{sid[:8]}, is damaged" in named.stderr
    tagged = run_cli("tag", f"vm1@{sid[:8]}", "--add", "x", cwd=work, check=False)
    assert tagged.returncode == exitcodes.INTEGRITY, tagged.stderr
    unknown = run_cli("show", "vm1@0000ffff", cwd=work, check=False)
    assert unknown.returncode == exitcodes.NO_SNAPSHOT
    out = run_json("repair", "snapshots", cwd=work)
    assert out["quarantined"] == [f"snapshots/{sid}"]
    assert (work / "repo" / "quarantine" / "snapshots" / sid).exists()
    assert _verify(work)[1]["clean"]


def test_a_damaged_config(work: Path) -> None:
    _flip(work / "repo" / "config", 40)
    res = run_cli("verify", cwd=work, check=False)
    assert res.returncode == exitcodes.INTEGRITY
    assert "config" in res.stderr and "damaged" in res.stderr


def _repair_from_offsite(work: Path, snaps: Snaps) -> None:
    res = run_json("repair", "--from", "offsite", cwd=work)
    assert res["blobs_from_replica"] > 0 or res["blobs_rewritten"] > 0
    assert res["still_lost"] == 0
    code, doc = _verify(work, "--read-data")
    assert code == 0 and doc["clean"], doc["findings"]
    _restores(work, snaps)


# -- salvage ----------------------------------------------------------------------


def test_restore_stops_naming_the_range_or_salvages_the_rest(work: Path,
                                                            prepared: Any) -> None:
    bid, path, offset, length = _chunk_location(work)
    _flip(path, offset + length // 2)
    expected = _expected(work, {bid})
    (sid, disk), ranges = next(iter(expected.items()))
    vm = prepared[2][sid]
    out = work / "salvaged.raw"
    res = run_cli("restore", f"{vm}@{sid[:8]}", "--disk", disk, "-o", str(out), cwd=work,
                  check=False)
    assert res.returncode == exitcodes.INTEGRITY and not out.exists()
    assert f"bytes {ranges[0][0]}-{ranges[0][1]}" in res.stderr
    res = run_cli("restore", f"{vm}@{sid[:8]}", "--disk", disk, "-o", str(out), "--json",
                  "--allow-damaged", cwd=work, check=False)
    assert res.returncode == exitcodes.INCOMPLETE, res.stderr
    assert json.loads(res.stdout)["disks"][0]["damaged"] == ranges
    want = bytearray(prepared[1][sid][disk])
    for start, end in ranges:
        want[start:end] = bytes(end - start)
    assert out.read_bytes() == bytes(want)
    # The same for people (with the progress's count of what is to read).
    res = run_cli("restore", f"{vm}@{sid[:8]}", "--disk", disk, "-o", str(out), "--force",
                  "--allow-damaged", cwd=work, check=False)
    assert res.returncode == exitcodes.INCOMPLETE, res.stderr
    assert f"damaged, written as zeros: bytes {ranges[0][0]}-{ranges[0][1]}" in res.stdout
    assert out.read_bytes() == bytes(want)


def test_a_lost_manifest_root_names_the_whole_disk_or_salvages_zeros(work: Path,
                                                                     prepared: Any) -> None:
    bid, path, offset, length = _chunk_location(work, BlobType.ROOT)
    _flip(path, offset + length // 2)
    sid, disk = next((s.id, d) for s in _open(work).snapshots() for d in s.disks
                     if d.root == bid)
    vm, out = prepared[2][sid], work / "salvaged.raw"
    args = ("restore", f"{vm}@{sid[:8]}", "--disk", disk.name, "-o", str(out))
    res = run_cli(*args, cwd=work, check=False)
    assert res.returncode == exitcodes.INTEGRITY and not out.exists()
    assert f"the manifest of disk {disk.name} is lost" in res.stderr
    assert f"bytes 0-{disk.size} of the disk cannot be restored" in res.stderr
    res = run_cli(*args, "--json", "--allow-damaged", cwd=work, check=False)
    assert res.returncode == exitcodes.INCOMPLETE, res.stderr
    assert json.loads(res.stdout)["disks"][0]["damaged"] == [[0, disk.size]]
    assert out.read_bytes() == bytes(disk.size)
    res = run_cli(*args, "--allow-damaged", "--force", cwd=work, check=False)
    assert res.returncode == exitcodes.INCOMPLETE, res.stderr
    assert f"damaged, written as zeros: bytes 0-{disk.size}" in res.stdout


# -- partial reads --------------------------------------------------------------------


def test_seven_subset_runs_read_every_pack(work: Path) -> None:
    total = _verify(work)[1]["packs"]
    parts, read = set(), 0
    for _ in range(7):
        doc = _verify(work, "--read-data-subset", "1/7")[1]
        parts.add(doc["read_data"]["part"])
        read += doc["read_data"]["packs"]
        assert doc["read_data"]["complete"]
    assert parts == set(range(1, 8)) and read == total


def test_a_stopped_read_resumes_where_it_stopped(work: Path) -> None:
    total = _verify(work)[1]["packs"]
    runs = []
    for _ in range(total):
        doc = _verify(work, "--max-duration", "0s", "--workers", "1")[1]
        runs.append((doc["read_data"]["packs"], doc["read_data"]["complete"]))
        if doc["read_data"]["complete"]:
            break
    assert all(n == 1 for n, _ in runs) and len(runs) == total
    assert [c for _, c in runs] == [False] * (total - 1) + [True]


# -- S3 -------------------------------------------------------------------------------


def test_damage_in_a_bucket_found_and_repaired_from_a_local_copy(
        tmp_path: Path, s3_bucket: str) -> None:  # noqa: F811
    _config(tmp_path, s3_url(s3_bucket))
    snaps, _ = _prepare(tmp_path, s3_url(s3_bucket))
    s3 = boto3.client("s3")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket,
                                                        Prefix="repo/data/")["Contents"])
    body = bytearray(s3.get_object(Bucket=s3_bucket, Key=keys[0])["Body"].read())
    body[100] ^= 0x10
    s3.put_object(Bucket=s3_bucket, Key=keys[0], Body=bytes(body))
    s3.delete_object(Bucket=s3_bucket, Key=keys[1])
    code, doc = _verify(tmp_path, "--read-data")
    assert code == exitcodes.INTEGRITY and doc["affected"]
    healed = run_json("repair", "--from", "offsite", cwd=tmp_path)
    code, doc = _verify(tmp_path, "--read-data")
    assert code == 0, (doc["findings"], healed)
    _restores(tmp_path, snaps)


def test_verify_errors_are_one_line(tmp_path: Path) -> None:
    res = run_cli("-r", str(tmp_path / "none"), "verify", check=False)
    assert res.returncode == exitcodes.NO_REPOSITORY
    res = subprocess.run([vmrepo_bin(), "-r", str(tmp_path), "verify", "--read-data-subset",
                          "8/7"], capture_output=True, text=True)
    assert res.returncode == exitcodes.USAGE and "K/M" in res.stderr



def test_repair_says_it_dropped_packs_even_when_nothing_else_changed() -> None:
    from vmrepo.cli.verify_cmds import repair_lines
    from vmrepo.repair import RepairReport

    assert repair_lines("data", RepairReport(packs_dropped=1)) == \
        ["dropped 1 pack from the index (missing or damaged)"]
    assert repair_lines("data", RepairReport()) == ["nothing to repair"]
