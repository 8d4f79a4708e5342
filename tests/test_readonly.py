"""Reading a repository one cannot write: a read-only mount, a user who may only read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import run_cli, run_json, vmrepo_bin, write_sample_image

NOBODY = 65534


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="vmrepo-ro-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(path)], check=False)
        shutil.rmtree(path, ignore_errors=True)


def _setup(work: Path) -> None:
    write_sample_image(work / "a.raw", 8 << 20, seed=5)
    (work / "vmrepo.toml").write_text(
        'repository = "repo"\n[vm.vm1]\nsource = "file"\ndisks = { disk0 = "a.raw" }\n')
    run_cli("init", "--chunk-size", "64K", "--pack-size", "1M", cwd=work)
    run_json("snapshot", "vm1", cwd=work)


def _unprivileged(uid: int) -> list[str] | None:
    """A command prefix that runs as a user without privileges over others' files: ``uid``
    where this interpreter is reachable by it, else root without any capability."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return None
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    probe = subprocess.run([*as_user, sys.executable, "-c", "import vmrepo"],
                           capture_output=True, check=False)
    if probe.returncode == 0:
        return as_user
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]


def test_restore_as_a_user_who_may_only_read(shared_dir: Path) -> None:
    _setup(shared_dir)
    prefix = _unprivileged(NOBODY)
    if prefix is None:
        pytest.skip("needs root and setpriv to become an unprivileged user")
    repo = shared_dir / "repo"
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(repo)], check=True)
    subprocess.run(["chmod", "-R", "a-w,a+rX", str(repo)], check=True)
    out = shared_dir / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if k != "VMREPO_CACHE_DIR"}
    env["HOME"] = "/nonexistent"
    for args in (["snapshots", "vm1"], ["show", "vm1@latest"],
                 ["restore", "vm1@latest", "--disk", "disk0", "-o", str(out / "a.raw")]):
        res = subprocess.run([*prefix, vmrepo_bin(), "-r", str(repo), *args], env=env,
                             capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stderr
        if args[0] == "restore":
            assert res.stderr.count("without a lock") == 1, res.stderr
    assert (out / "a.raw").read_bytes() == (shared_dir / "a.raw").read_bytes()
    assert os.listdir(repo / "locks") == []


def test_restore_from_a_read_only_bind_mount(shared_dir: Path) -> None:
    _setup(shared_dir)
    ro = shared_dir / "ro"
    ro.mkdir()
    script = (f"mount --bind {shared_dir / 'repo'} {ro} && mount -o remount,bind,ro {ro} && "
              f"{vmrepo_bin()} -r {ro} snapshots && {vmrepo_bin()} -r {ro} restore vm1@latest "
              f"--disk disk0 -o {shared_dir / 'out.raw'}")
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", f"mount --bind {ro} {ro}"],
                           capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a bind mount here: {probe.stderr.decode().strip()}")
    res = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True,
                         text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "Read-only file system" in res.stderr and res.stderr.count("without a lock") == 1
    assert (shared_dir / "out.raw").read_bytes() == (shared_dir / "a.raw").read_bytes()
