"""Copies between repositories: only what the destination lacks, resumable, across parameters."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
from vmrepo import exitcodes

from .helpers import random_image_vm, run_cli, run_json, signal_when, write_sample_image

CS = 64 << 10


def _three_snapshots(work: Path) -> list[tuple[str, bytes]]:
    """Snapshots of vm1 after changes; each with the disk's bytes at that moment."""
    rnd = random.Random(5)
    out = []
    for step in range(3):
        if step:
            with open(work / "a.raw", "r+b") as f:
                for _ in range(5):
                    f.seek(rnd.randrange(0, (8 << 20) - 5000))
                    f.write(rnd.randbytes(5000))
        sid = run_json("snapshot", "vm1", cwd=work)["id"]
        out.append((sid, (work / "a.raw").read_bytes()))
    return out


def _restores_from(work: Path, repo: str, snaps: list[tuple[str, bytes]]) -> None:
    for sid, content in snaps:
        out = work / f"r-{sid[:8]}.raw"
        run_cli("-r", repo, "restore", f"vm1@{sid[:8]}", "--disk", "disk0", "-o", str(out),
                "--force", cwd=work)
        assert out.read_bytes() == content, f"{sid[:8]} from {repo}"


@pytest.fixture
def work(tmp_path: Path) -> Path:
    write_sample_image(tmp_path / "a.raw", 8 << 20, seed=51)
    (tmp_path / "vmrepo.toml").write_text(
        'repository = "repo"\n[vm.vm1]\nsource = "file"\ndisks = { disk0 = "a.raw" }\n'
        '[remote.offsite]\nrepository = "offsite"\n')
    run_cli("init", "--chunk-size", "64K", "--pack-size", "1M", cwd=tmp_path)
    return tmp_path


def test_copy_to_a_remote_and_on_to_a_third_repository(work: Path) -> None:
    snaps = _three_snapshots(work)
    run_cli("-r", "offsite", "init", "--copy-params-from", "repo", cwd=work)
    first = run_json("copy", "--to", "offsite", cwd=work)
    assert first["snapshots"] == 3 and first["bytes_sent"] > 0 and first["packs_whole"] > 0
    again = run_json("copy", "--to", "offsite", cwd=work)
    assert again["snapshots"] == 0 and again["bytes_sent"] == 0 and again["already_there"] == 3
    assert "nothing to copy" in run_cli("copy", "--to", "offsite", cwd=work).stdout
    _restores_from(work, str(work / "offsite"), snaps)
    # Onwards: from the remote into a third repository.
    run_cli("-r", str(work / "third"), "init", "--copy-params-from", "offsite", cwd=work)
    run_json("-r", "offsite", "copy", "--to", str(work / "third"), cwd=work)
    _restores_from(work, str(work / "third"), snaps)
    # The blobs were stored once: the copies are about as big as the original.
    sizes = [sum(p.stat().st_size for p in (work / d / "data").rglob("*") if p.is_file())
             for d in ("repo", "offsite", "third")]
    assert max(sizes) <= min(sizes) * 1.1


def test_copy_of_named_snapshots_only(work: Path) -> None:
    snaps = _three_snapshots(work)
    run_cli("-r", "offsite", "init", "--copy-params-from", "repo", cwd=work)
    doc = run_json("copy", "--to", "offsite", f"vm1@{snaps[1][0][:8]}", cwd=work)
    assert doc["snapshots"] == 1
    listed = run_json("-r", "offsite", "snapshots", cwd=work)["snapshots"]
    assert [s["id"] for s in listed] == [snaps[1][0]]
    _restores_from(work, str(work / "offsite"), snaps[1:2])
    rest = run_json("copy", "--to", "offsite", "vm1", cwd=work)
    assert rest["snapshots"] == 2 and rest["already_there"] == 1
    # Only the blobs the first copy had not sent.
    assert rest["bytes_sent"] < doc["bytes_sent"]
    for args in (("copy", "--to", "ofsite"), ("-r", "ofsite", "snapshots")):
        remote = run_cli(*args, cwd=work, check=False)
        assert remote.returncode == exitcodes.NO_REPOSITORY
        assert "no repository at ofsite (nor a [remote.ofsite] in the config; its remotes: " \
            "offsite" in remote.stderr
    typo = run_cli("copy", "--to", "offsite", "vm9", cwd=work, check=False)
    assert typo.returncode == exitcodes.NO_SNAPSHOT
    assert "vmrepo: error: no snapshot of VM vm9\n" in typo.stderr
    as_json = run_cli("copy", "--to", "offsite", "vm9", "--json", cwd=work, check=False)
    assert json.loads(as_json.stdout)["error"]["spec"] == "vm9"


def test_copy_across_parameters_rebuilds_the_snapshots(work: Path) -> None:
    snaps = _three_snapshots(work)
    run_cli("-r", str(work / "other"), "init", "--chunk-size", "256K", cwd=work)
    res = run_cli("copy", "--to", str(work / "other"), "--json", cwd=work)
    assert "other parameters" in res.stderr
    _restores_from(work, str(work / "other"), snaps)
    listed = run_json("-r", str(work / "other"), "snapshots", cwd=work)["snapshots"]
    assert [s["id"] for s in listed] == [s for s, _ in snaps]  # same ids, same times
    assert run_json("copy", "--to", str(work / "other"), cwd=work)["bytes_sent"] == 0


def test_an_interrupted_copy_resends_only_the_rest(tmp_path: Path) -> None:
    big = random_image_vm(tmp_path, 192)
    run_cli("snapshot", "vm1", cwd=tmp_path)
    dest = tmp_path / "offsite"
    run_cli("-r", str(dest), "init", "--copy-params-from", "repo", cwd=tmp_path)
    total = sum(p.stat().st_size for p in (tmp_path / "repo" / "data").rglob("*")
                if p.is_file())
    signal_when(["copy", "--to", str(dest)], tmp_path,
                lambda: len(list(dest.glob("data/*/*"))) >= 100, signal.SIGKILL)
    assert run_json("-r", str(dest), "snapshots", cwd=tmp_path)["snapshots"] == []
    rerun = run_json("copy", "--to", str(dest), cwd=tmp_path)
    assert rerun["snapshots"] == 1 and rerun["bytes_sent"] < total * 0.6
    out = tmp_path / "out.raw"
    run_cli("-r", str(dest), "restore", "vm1@latest", "--disk", "disk0", "-o", str(out),
            cwd=tmp_path)
    assert out.read_bytes() == big.read_bytes()


def test_a_damaged_blob_does_not_travel(work: Path) -> None:
    _three_snapshots(work)
    run_cli("-r", "offsite", "init", "--copy-params-from", "repo", cwd=work)
    packs = sorted((work / "repo" / "data").rglob("*"), key=lambda p: p.stat().st_size)
    victim = [p for p in packs if p.is_file()][-1]
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 0x40
    victim.write_bytes(bytes(raw))
    res = run_cli("copy", "--to", "offsite", cwd=work, check=False)
    assert res.returncode == 14 and "does not match" in res.stderr
    assert run_json("-r", "offsite", "snapshots", cwd=work)["snapshots"] == []


def test_a_named_snapshot_the_remote_policy_would_forget_is_reported(work: Path) -> None:
    """A remote keeping only the last snapshot gets the newest; asked by name for an older
    one, copy says that the policy would forget it at once, and does not claim the remote
    has it."""
    snaps = _three_snapshots(work)
    config = work / "vmrepo.toml"
    config.write_text(config.read_text() + "keep = { last = 1 }\n")
    run_cli("-r", "offsite", "init", "--copy-params-from", "repo", cwd=work)
    first = run_cli("copy", "--to", "offsite", cwd=work).stdout.splitlines()
    assert first[0].startswith("copied 1 snapshot to ")
    assert "offsite: left out 2 snapshots its keep policy would forget at once" in first
    older = f"vm1@{snaps[0][0][:8]}"
    res = run_cli("copy", "--to", "offsite", older, cwd=work)
    assert res.stdout.splitlines()[0].startswith("nothing to copy to "), res.stdout
    assert "offsite: left out 1 snapshot its keep policy would forget at once" in res.stdout
    assert f"vmrepo: warning: not copied: {older}: offsite's keep last 1 would forget it at " \
        "once" in res.stderr
    doc = run_json("copy", "--to", "offsite", older, cwd=work)
    assert doc["snapshots"] == 0 and doc["left_out_by_policy"] == 1
    there = run_json("-r", "offsite", "snapshots", cwd=work)["snapshots"]
    assert [s["id"] for s in there] == [snaps[2][0]]


def test_copy_params_from_with_other_sizes(work: Path) -> None:
    """The chunk size must be the source's (blobs are named by their chunks): another is a
    usage error. A pack size or compression given with it is the new repository's own."""
    snaps = _three_snapshots(work)
    res = run_cli("-r", "offsite", "init", "--copy-params-from", "repo", "--chunk-size", "1M",
                  cwd=work, check=False)
    assert res.returncode == exitcodes.USAGE
    assert "--copy-params-from takes the chunk size of the source (64.00 KiB)" in res.stderr
    assert not (work / "offsite").exists()
    same = run_json("-r", "offsite", "init", "--copy-params-from", "repo", "--chunk-size", "64K",
                    "--pack-size", "4M", "--compression", "zstd:9", cwd=work)
    assert (same["chunk_size"], same["pack_size"], same["compression"]) == \
        (CS, 4 << 20, "zstd-9")
    assert run_json("copy", "--to", "offsite", cwd=work)["snapshots"] == 3
    _restores_from(work, str(work / "offsite"), snaps)
