"""Helpers shared by the tests: sample images, the installed CLI, sources in memory."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmrepo.codec import RecordKind
from vmrepo.format import lock_key
from vmrepo.locks import LOCK_VERSION, REPOSITORY, LockInfo
from vmrepo.sources.base import BackupContext, DiskStream, Extent, Mode, Source
from vmrepo.store import RepoStore


def killpoint(*args: str) -> list[str]:
    """The command running ``tests/killpoint.py`` with ``args`` (see its docstring); ``-P``
    keeps the tests' directory off the path (its qemu.py would hide qemu.qmp)."""
    return [sys.executable, "-P", str(Path(__file__).parent / "killpoint.py"), *args]


def plant_lock(store: RepoStore, pid: int, exclusive: bool, *, host: str | None = None,
               when: datetime | None = None, scope: str = REPOSITORY,
               operation: str = "test") -> LockInfo:
    """A lock record as ``pid`` on ``host`` (default: this host) would leave it, taken and
    last refreshed at ``when`` (default: now)."""
    when = when or datetime.now(UTC)
    info = LockInfo(os.urandom(8).hex(), host or os.uname().nodename, pid, operation,
                    exclusive, when, when, scope)
    store.put_record(RecordKind.LOCK, lock_key(info.id), info.fields(LOCK_VERSION))
    return info


def vmrepo_bin() -> str:
    """The installed ``vmrepo`` console script of this interpreter's environment."""
    candidate = Path(sys.executable).parent / "vmrepo"
    found = str(candidate) if candidate.exists() else shutil.which("vmrepo")
    assert found, "vmrepo is not installed (run `make test`)"
    return found


def run_cli(*args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the installed vmrepo. ``init`` makes an unencrypted repository unless the test
    says otherwise (encryption has tests of its own; a passphrase costs a KDF per run)."""
    if "init" in args and not any(a.startswith(("--encryption", "--copy-params-from"))
                                  for a in args):
        args = (*args, "--encryption", "none")
    full_env = {**os.environ, **(env or {})}
    res = subprocess.run([vmrepo_bin(), *args], cwd=cwd, env=full_env, capture_output=True,
                         text=True, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"vmrepo {' '.join(args)} exited {res.returncode}:\n"
                             f"{res.stdout}\n{res.stderr}")
    return res


def run_json(*args: str, **kw: Any) -> Any:
    return json.loads(run_cli(*args, "--json", **kw).stdout)


def write_sample_image(path: Path, size: int, seed: int = 0) -> None:
    """A sparse image with random data, text-like data, zero runs and holes."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            n = min(size - pos, rnd.choice([4096, 65536, 300_000, 1 << 20]))
            kind = rnd.choice(["random", "text", "zeros", "hole", "hole"])
            if kind == "random":
                f.seek(pos)
                f.write(rnd.randbytes(n))
            elif kind == "text":
                f.seek(pos)
                f.write(text_like(rnd, n))
            elif kind == "zeros":
                f.seek(pos)
                f.write(bytes(n))
            pos += n


_TEXT_TABLE = bytes((b" etaoinshrdlucmfwypvbgkqjxz\n"[i % 28]) for i in range(256))


def text_like(rnd: random.Random, n: int) -> bytes:
    """Compressible bytes with the letter mix of text."""
    return rnd.randbytes(n).translate(_TEXT_TABLE)


class MemoryDisk(DiskStream):
    """A disk stream over given extents (for core tests that need no QEMU)."""

    def __init__(self, name: str, size: int, extents: list[Extent], mode: Mode = "full",
                 base: str | None = None, reason: str = "test") -> None:
        self.name, self.size, self.mode, self.reason = name, size, mode, reason
        self.base_snapshot = base
        self._extents = extents

    def extents(self) -> Iterator[Extent]:
        yield from self._extents


class MemorySource(Source):
    """Serves prepared disk streams and records how it was finished."""

    plugin = "memory-test"

    def __init__(self, disks: list[DiskStream]) -> None:
        self.disks = disks
        self.finished: list[bool] = []
        self.context: BackupContext | None = None

    @classmethod
    def from_config(cls, vm: str, settings: Mapping[str, Any]) -> MemorySource:
        raise NotImplementedError

    def begin(self, context: BackupContext) -> list[DiskStream]:
        self.context = context
        return self.disks

    def finish(self, committed: bool) -> None:
        self.finished.append(committed)


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Wait until a unix socket accepts connections (its file appears before listen())."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(path))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.02)


def random_image_vm(work: Path, mib: int, chunk: str = "64K", pack: str = "1M") -> Path:
    """``work/big.raw`` of ``mib`` MiB of random data as VM vm1's disk, in a fresh repository."""
    big = work / "big.raw"
    with open(big, "wb") as f:
        for _ in range(mib // 4):
            f.write(os.urandom(4 << 20))
    (work / "vmrepo.toml").write_text(
        'repository = "repo"\n[vm.vm1]\nsource = "file"\ndisks = { disk0 = "big.raw" }\n')
    run_cli("init", "--chunk-size", chunk, "--pack-size", pack, cwd=work)
    return big


def signal_when(args: list[str], cwd: Path, ready: Callable[[], bool], sig: int,
                timeout: float = 120) -> tuple[int, str]:
    """Run ``vmrepo ARGS``, send ``sig`` once ``ready()`` holds; return exit code and stderr.

    Fails if the command ends before it could be signalled; the process is always reaped.
    """
    import signal as _signal
    import time

    proc = subprocess.Popen([vmrepo_bin(), *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, f"vmrepo {' '.join(args)} ended before it could be signalled"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.send_signal(_signal.SIGKILL)
        proc.wait()
    return proc.returncode, err


def pack_count(repo: Path) -> int:
    return len(list(repo.glob("data/*/*")))
