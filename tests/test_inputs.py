"""Every bad input a user can give ends in one clear line and its exit code; no data is lost."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from vmrepo import exitcodes

from .helpers import run_cli, run_json, write_sample_image

Case = Callable[[Path], list[str]]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    write_sample_image(tmp_path / "a.raw", 6 << 20, seed=21)
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "disk")
    (tmp_path / "vmrepo.toml").write_text(
        'repository = "repo"\n'
        '[vm.vm1]\nsource = "file"\ndisks = { disk0 = "a.raw" }\n'
        '[vm.typo]\nsource = "file"\ndisk = { disk0 = "a.raw" }\n'
        '[vm.extra]\nsource = "file"\ndisks = { disk0 = "a.raw" }\nfoo = 1\n'
        '[vm.fifo]\nsource = "file"\ndisks = { disk0 = "fifo/disk" }\n'
        '[vm.chardev]\nsource = "file"\ndisks = { disk0 = "/dev/null" }\n'
        '[vm.sock]\nsource = "file"\ndisks = { disk0 = "s.sock" }\n'
        '[vm.pushtypo]\nsource = "qmp"\nsocket = "x.qmp"\ntimeuot = 5\n')
    run_cli("init", "--chunk-size", "64K", "--pack-size", "1M", cwd=tmp_path)
    run_json("snapshot", "vm1", cwd=tmp_path)
    return tmp_path


def _bad_config(work: Path) -> list[str]:
    (work / "latin1.toml").write_bytes('repository = "d\xe9p\xf4t"\n'.encode("latin-1"))
    return ["snapshots", "--config", str(work / "latin1.toml")]


def _unknown_top_key(work: Path) -> list[str]:
    (work / "top.toml").write_text('repository = "repo"\nrepositry = "x"\n')
    return ["snapshots", "--config", str(work / "top.toml")]


def _remote(location: str, setting: str) -> Case:
    """A copy to ``[remote.off]`` at ``location``, with ``setting`` in its table."""
    def setup(work: Path) -> list[str]:
        (work / "remote.toml").write_text(f'repository = "repo"\n[remote.off]\n'
                                          f'repository = "{location}"\n{setting}\n')
        return ["copy", "--to", "off", "--config", str(work / "remote.toml")]
    return setup


def _socket_disk(work: Path) -> list[str]:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(work / "s.sock"))
    s.close()
    return ["snapshot", "sock"]


def _nonempty_init(work: Path) -> list[str]:
    (work / "photos").mkdir()
    (work / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8")
    return ["init", "-r", str(work / "photos")]


def _since_is_target(work: Path) -> list[str]:
    (work / "o").mkdir()
    return ["restore", "vm1@latest", "--since", "vm1@latest", "--format", "qcow2",
            "--backing", "x.qcow2", "--disk", "disk0", "-o", str(work / "o" / "d.qcow2")]


def _output_is_fifo(work: Path) -> list[str]:
    return ["restore", "vm1@latest", "--disk", "disk0", "-o", str(work / "fifo" / "disk"),
            "--force"]


def _output_is_directory(work: Path) -> list[str]:
    return ["restore", "vm1@latest", "--disk", "disk0", "-o", str(work), "--force"]


CASES: list[tuple[str, Case, int, str]] = [
    ("non-UTF-8 config", _bad_config, exitcodes.CONFIG, "is not UTF-8 text"),
    ("unknown top-level key", _unknown_top_key, exitcodes.CONFIG,
     "unknown key 'repositry'; did you mean 'repository'?"),
    ("misspelt key of a remote", _remote("off", "retres = 2"), exitcodes.CONFIG,
     "[remote.off] for file://: unknown key 'retres'; did you mean 'retries'?"),
    ("S3 endpoint that is no URL", _remote("s3://bucket/p", 'endpoint = "notaurl"'),
     exitcodes.CONFIG,
     "[remote.off] endpoint must be an http:// or https:// URL, not 'notaurl'"),
    ("S3 setting out of range", _remote("s3://bucket/p", "concurrency = 0"), exitcodes.CONFIG,
     "[remote.off] concurrency must be positive, not 0"),
    ("disk for disks", lambda w: ["snapshot", "typo"], exitcodes.CONFIG,
     "[vm.typo]: unknown key 'disk'; did you mean 'disks'?"),
    ("unknown vm key", lambda w: ["snapshot", "extra"], exitcodes.CONFIG,
     "[vm.extra]: unknown key 'foo'"),
    ("misspelt source key", lambda w: ["snapshot", "pushtypo"], exitcodes.CONFIG,
     "unknown key 'timeuot'; did you mean 'timeout'?"),
    ("FIFO as a disk", lambda w: ["snapshot", "fifo"], exitcodes.SOURCE, "is a FIFO"),
    ("character device as a disk", lambda w: ["snapshot", "chardev"], exitcodes.SOURCE,
     "is a character device"),
    ("socket as a disk", _socket_disk, exitcodes.SOURCE, "is a socket"),
    ("init into a non-empty directory", _nonempty_init, exitcodes.REPOSITORY_EXISTS,
     "is not empty and not a vmrepo repository"),
    ("init on an impossible path", lambda w: ["init", "-r", "/proc/self/status/repo"],
     exitcodes.STORAGE, "cannot create a repository at /proc/self/status/repo"),
    ("--since equal to the target", _since_is_target, exitcodes.RESTORE,
     "--since names the snapshot being restored"),
    ("output is a FIFO", _output_is_fifo, exitcodes.RESTORE, "is not a regular file"),
    ("output is a directory", _output_is_directory, exitcodes.RESTORE, "is a directory"),
    ("restore of an unknown disk", lambda w: ["restore", "vm1@latest", "--disk", "vdz", "-o",
                                              str(w / "x.raw")], exitcodes.RESTORE,
     "has no disk 'vdz'"),
]


@pytest.mark.parametrize(("what", "setup", "code", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(work: Path, what: str, setup: Case, code: int, message: str) -> None:
    before = sorted(p.name for p in (work / "repo" / "snapshots").iterdir())
    image = (work / "a.raw").read_bytes()
    args = setup(work)
    res = run_cli(*args, cwd=work, check=False)
    assert res.returncode == code, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    # With --json the same error is a JSON document on stdout.
    res = run_cli(*args, "--json", cwd=work, check=False)
    doc = json.loads(res.stdout)
    assert doc["error"]["exit_code"] == code and message in doc["error"]["message"]
    # Nothing was lost or changed.
    assert sorted(p.name for p in (work / "repo" / "snapshots").iterdir()) == before
    assert (work / "a.raw").read_bytes() == image


def test_image_in_use_by_qemu_reports_qemu_nbds_reason(tmp_path: Path) -> None:
    from .qemu import QemuVM

    with QemuVM(tmp_path, {"disk0": 8 << 20}) as vm:
        (tmp_path / "vmrepo.toml").write_text(
            f'repository = "repo"\n[vm.busy]\nsource = "file"\n'
            f'disks = {{ disk0 = "{vm.disks["disk0"]}" }}\n')
        run_cli("init", cwd=tmp_path)
        res = run_cli("snapshot", "busy", cwd=tmp_path, check=False)
    assert res.returncode == exitcodes.SOURCE
    assert "lock" in res.stderr and "Connection refused" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_outputs_are_private_whatever_the_format(work: Path) -> None:
    out = work / "out"
    out.mkdir()
    run_cli("restore", "vm1@latest", "-o", str(out), cwd=work)
    run_cli("restore", "vm1@latest", "--format", "qcow2", "-o", str(out), cwd=work)
    for name in ("disk0.raw", "disk0.qcow2"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    res = subprocess.run(["qemu-img", "compare", str(out / "disk0.qcow2"), str(work / "a.raw")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_differential_restore_with_spaces_and_a_checked_backing(work: Path) -> None:
    with open(work / "a.raw", "r+b") as f:
        f.seek(3 << 20)
        f.write(os.urandom(1 << 20))  # data that will become zeros
    first = run_json("snapshot", "vm1", cwd=work)["id"][:8]
    with open(work / "a.raw", "r+b") as f:
        f.seek(1 << 20)
        f.write(os.urandom(70_000))
        f.seek(3 << 20)
        f.write(bytes(1 << 20))
    second = run_json("snapshot", "vm1", cwd=work)["id"][:8]
    out = work / "with space" / "and 'quotes'"
    out.mkdir(parents=True)
    run_cli("restore", f"vm1@{first}", "--disk", "disk0", "--format", "qcow2", "-o",
            str(out / "base image.qcow2"), cwd=work)
    res = run_json("restore", f"vm1@{second}", "--since", f"vm1@{first}", "--format", "qcow2",
                   "--backing", str(out / "base image.qcow2"), "--disk", "disk0",
                   "-o", str(out / "delta image.qcow2"), cwd=work)
    assert res["disks"][0]["chunks_zero"] >= 1 and res["disks"][0]["chunks_read"] >= 2
    cmp = subprocess.run(["qemu-img", "compare", str(out / "delta image.qcow2"),
                          str(work / "a.raw")], capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout
    assert stat.S_IMODE((out / "delta image.qcow2").stat().st_mode) == 0o600
    # A backing image of the right size with other content is refused, and nothing is left.
    wrong = out / "wrong.raw"
    wrong.write_bytes(os.urandom(6 << 20))
    res2 = run_cli("restore", f"vm1@{second}", "--since", f"vm1@{first}", "--format", "qcow2",
                   "--backing", str(wrong), "--disk", "disk0", "-o", str(out / "bad.qcow2"),
                   cwd=work, check=False)
    assert res2.returncode == exitcodes.RESTORE and "is not vm1@" in res2.stderr
    assert not (out / "bad.qcow2").exists()
    assert [p.name for p in out.iterdir() if "partial" in p.name] == []
    # --no-check-backing writes it anyway (documented as unsafe).
    run_cli("restore", f"vm1@{second}", "--since", f"vm1@{first}", "--format", "qcow2",
            "--backing", str(wrong), "--disk", "disk0", "-o", str(out / "unsafe.qcow2"),
            "--no-check-backing", cwd=work)
    assert (out / "unsafe.qcow2").exists()


def test_listing_names_what_matched_nothing(work: Path) -> None:
    """An empty listing says which VM (and tags) it looked for, and which VMs it knows."""
    said = run_cli("snapshots", "vmx", cwd=work)
    assert said.returncode == 0
    assert said.stdout.strip() == "no snapshots of VM vmx (VMs with snapshots: vm1)"
    said = run_cli("snapshots", "vm1", "--tag", "nightly", cwd=work)
    assert said.stdout.strip() == "no snapshots of VM vm1 with tag nightly"
    assert run_json("snapshots", "vmx", cwd=work)["snapshots"] == []
