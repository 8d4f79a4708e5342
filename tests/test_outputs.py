"""Restore outputs: block devices in place, output errors in one line, partial files removed."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmrepo import exitcodes
from vmrepo.errors import OutputError
from vmrepo.repository import Repository
from vmrepo.restore import restore_raw
from vmrepo.storage.local import LocalBackend

from .helpers import random_image_vm, run_cli, signal_when, vmrepo_bin, write_sample_image

MiB = 1 << 20


@pytest.fixture
def work(tmp_path: Path) -> Path:
    write_sample_image(tmp_path / "a.raw", 6 * MiB, seed=31)
    with open(tmp_path / "a.raw", "r+b") as f:  # data where the device will hold old bytes
        f.seek(2 * MiB)
        f.write(os.urandom(MiB))
    (tmp_path / "vmrepo.toml").write_text(
        'repository = "repo"\n[vm.vm1]\nsource = "file"\ndisks = { disk0 = "a.raw" }\n')
    run_cli("init", "--chunk-size", "64K", cwd=tmp_path)
    run_cli("snapshot", "vm1", cwd=tmp_path)
    return tmp_path


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    backing = tmp_path / "device.img"
    backing.write_bytes(os.urandom(8 * MiB))  # old contents everywhere
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("loop devices need root and losetup")
    res = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"this machine gives no loop device: {res.stderr.strip()}")
    dev = Path(res.stdout.strip())
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)


@pytest.mark.parametrize("discard", [False, True])
def test_restore_onto_a_block_device(work: Path, loop_device: tuple[Path, Path],
                                     discard: bool) -> None:
    dev, _ = loop_device
    refused = run_cli("restore", "vm1@latest", "--disk", "disk0", "-o", str(dev), cwd=work,
                      check=False)
    assert refused.returncode == exitcodes.RESTORE and "--force" in refused.stderr
    args = ["restore", "vm1@latest", "--disk", "disk0", "-o", str(dev), "--force"]
    run_cli(*args, *(["--discard"] if discard else []), cwd=work)
    assert dev.is_block_device()  # written in place, never replaced
    with open(dev, "rb") as f:
        got = f.read(6 * MiB)
    assert got == (work / "a.raw").read_bytes()
    res = subprocess.run(["cmp", "-n", str(6 * MiB), str(dev), str(work / "a.raw")])
    assert res.returncode == 0


def test_a_device_smaller_than_the_disk_is_refused(work: Path, tmp_path: Path) -> None:
    small = tmp_path / "small.img"
    small.write_bytes(bytes(4 * MiB))
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("loop devices need root and losetup")
    res = subprocess.run(["losetup", "--find", "--show", str(small)], capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"this machine gives no loop device: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        out = run_cli("restore", "vm1@latest", "--disk", "disk0", "-o", dev, "--force",
                      cwd=work, check=False)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
    assert out.returncode == exitcodes.RESTORE and "too small" in out.stderr
    assert small.read_bytes() == bytes(4 * MiB)


def _in_namespace(work: Path, mount: str, target: Path) -> subprocess.CompletedProcess[str]:
    """Mount ``mount`` (a mount command) in a private namespace, then restore into it."""
    script = (f"{mount} && {vmrepo_bin()} restore vm1@latest --disk disk0 -o {target}; "
              f"echo exit=$?; ls -a {target.parent}")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("no private mount namespace here")
    return subprocess.run(["unshare", "--mount", "sh", "-c", script], cwd=work,
                          capture_output=True, text=True, check=False)


def test_full_file_system(work: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    res = _in_namespace(work, f"mount -t tmpfs -o size=1M tmpfs {small}", small / "d.raw")
    assert f"exit={exitcodes.OUTPUT}" in res.stdout, res.stdout + res.stderr
    assert f"cannot write {small}/d.raw: no space left" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert "partial" not in res.stdout  # removed


def test_read_only_file_system(work: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    res = _in_namespace(work, f"mount -t tmpfs -o ro tmpfs {ro}", ro / "d.raw")
    assert f"exit={exitcodes.OUTPUT}" in res.stdout, res.stdout + res.stderr
    assert "read-only file system" in res.stderr and "Traceback" not in res.stderr


def test_permission_denied(work: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to become a user without rights on the output")
    place = Path(tempfile.mkdtemp(prefix="vmrepo-eacces-", dir="/tmp"))
    try:
        os.chmod(place, 0o755)  # others may look, not write
        shutil.copytree(work / "repo", place / "repo")
        subprocess.run(["chmod", "-R", "a+rX", str(place)], check=True)
        env = {**os.environ, "HOME": "/nonexistent"}
        env.pop("VMREPO_CACHE_DIR", None)
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              vmrepo_bin(), "-r", str(place / "repo"), "restore", "vm1@latest",
                              "--disk", "disk0", "-o", str(place / "d.raw"), "--no-lock"],
                             cwd="/", env=env, capture_output=True, text=True, check=False)
    finally:
        shutil.rmtree(place, ignore_errors=True)
    assert res.returncode == exitcodes.OUTPUT, res.stderr
    assert "permission denied" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(("code", "text"), [(errno.EDQUOT, "disk quota exceeded"),
                                            (errno.EIO, "I/O error"),
                                            (errno.ENOSPC, "no space left")])
def test_write_errors_remove_the_partial_output(work: Path, monkeypatch: pytest.MonkeyPatch,
                                                code: int, text: str) -> None:
    repo = Repository.open(LocalBackend(work / "repo"))
    snap = repo.snapshots()[-1]
    real = os.pwrite
    calls = []

    def failing(fd: int, data: bytes, offset: int) -> int:
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(code, os.strerror(code))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(OutputError, match=text) as exc:
        restore_raw(repo, snap.disks[0], work / "d.raw")
    assert exc.value.path == str(work / "d.raw")
    assert [p.name for p in work.iterdir() if "d.raw" in p.name] == []


def test_a_killed_restore_leaves_a_partial_file_the_next_one_removes(tmp_path: Path) -> None:
    random_image_vm(tmp_path, 256)
    run_cli("snapshot", "vm1", cwd=tmp_path)
    out = tmp_path / "out"
    out.mkdir()

    def partial() -> bool:
        return any("vmrepo-partial" in p.name and p.stat().st_size for p in out.iterdir())

    signal_when(["restore", "vm1@latest", "--disk", "disk0", "-o", str(out / "d.raw")],
                tmp_path, partial, signal.SIGKILL)
    assert [p for p in out.iterdir() if "vmrepo-partial" in p.name]
    run_cli("restore", "vm1@latest", "--disk", "disk0", "-o", str(out / "d.raw"), cwd=tmp_path)
    assert [p.name for p in out.iterdir()] == ["d.raw"]
    assert (out / "d.raw").read_bytes() == (tmp_path / "big.raw").read_bytes()


def test_c_library_functions_are_found_each_with_its_own_types() -> None:
    """libc.function finds the C library's functions without searching for the library;
    each lookup gets a function object of its own, so one caller's argument types do not
    become another's; a function the library lacks is None."""
    import ctypes

    from vmrepo import memtune
    from vmrepo.storage import libc

    getpid = libc.function("getpid", [])
    assert getpid is not None and getpid() == os.getpid()
    assert libc.function("no_such_function_in_libc", []) is None
    first = libc.function("lseek", [ctypes.c_int, ctypes.c_int64, ctypes.c_int])
    second = libc.function("lseek", [])
    assert first is not None and second is not None and first is not second
    assert first.argtypes == [ctypes.c_int, ctypes.c_int64, ctypes.c_int]
    assert memtune.tune_malloc()  # glibc's mallopt, found and accepted
