"""vmrepo serve: snapshots as NBD exports, read by QEMU, qemu-img, nbdinfo and nbdcopy.

Every server is a real ``vmrepo serve`` process (or, for the overlay's
details, the same server objects in this process) on a unix socket under the
test's directory, stopped by PID whatever happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vmrepo import exitcodes
from vmrepo.format import ZERO_ID, pack_key
from vmrepo.manifest import iter_chunks
from vmrepo.repository import Repository
from vmrepo.serve import SnapshotExports
from vmrepo.sources.nbd.client import NbdAddress, NbdClient
from vmrepo.sources.nbd.errors import NbdRequestError
from vmrepo.sources.nbd.server import NbdServer
from vmrepo.sources.qemu.qmp import QmpConnection
from vmrepo.storage.local import LocalBackend

from .helpers import run_cli, run_json, vmrepo_bin, write_sample_image
from .s3server import moto_server, s3_bucket, s3_url  # noqa: F401 - fixtures

MiB = 1 << 20
CHUNK = 64 << 10
SIZES = {"disk0": 24 * MiB, "disk1": 10 * MiB + 4096}


PASSPHRASE = "serve-test-passphrase"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (encrypted) repository with one snapshot of vm1's two disks (data, zero runs,
    holes), and the disks restored from it (``restored/DISK.raw``)."""
    w = tmp_path_factory.mktemp("serve")
    (w / "passphrase").write_text(PASSPHRASE)
    env = {"VMREPO_CACHE_DIR": str(w / "cache"), "VMREPO_PASSWORD_FILE": str(w / "passphrase")}
    for i, (name, size) in enumerate(SIZES.items()):
        write_sample_image(w / f"{name}.raw", size, seed=10 + i)
    (w / "vmrepo.toml").write_text(
        'repository = "repo"\n[vm.vm1]\nsource = "file"\n'
        'disks = { disk0 = "disk0.raw", disk1 = "disk1.raw" }\n')
    run_cli("init", "--chunk-size", "64K", "--pack-size", "1M", cwd=w, env=env)
    run_cli("snapshot", "vm1", cwd=w, env=env)
    run_cli("restore", "vm1@latest", "-o", str(w / "restored"), cwd=w, env=env)
    return w


@pytest.fixture(autouse=True)
def passphrase(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every vmrepo command of these tests finds the repository's passphrase."""
    monkeypatch.setenv("VMREPO_PASSWORD_FILE", str(work / "passphrase"))


def open_repo(path: Path) -> Repository:
    return Repository.open(LocalBackend(path), passphrase=lambda _rid: PASSPHRASE)


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with the SHA-256 of its bytes."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def url(sock: Path, disk: str) -> str:
    return f"nbd+unix:///{disk}?socket={sock}"


class Served:
    """A ``vmrepo serve --json`` process: its ready document, stopped by PID."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.proc = subprocess.Popen([vmrepo_bin(), "serve", *args, "--json"], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = b""
        self.err = b""
        threading.Thread(target=self._drain, daemon=True).start()
        self.doc = self._ready()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        self.err = self.proc.stderr.read()

    def _ready(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(10)
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.err!r}")
            self.out += line
            with contextlib.suppress(ValueError):
                doc: dict[str, Any] = json.loads(self.out)
                return doc
        raise AssertionError("serve did not say it was ready")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal it and wait for it to end; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stdout is not None
        self.out += self.proc.stdout.read()
        return code


@contextlib.contextmanager
def serving(cwd: Path, *args: str) -> Iterator[Served]:
    served = Served(cwd, *args)
    try:
        yield served
    finally:
        served.stop()


def compare(a: str, b: str, fmt_a: str = "raw", fmt_b: str = "raw") -> None:
    res = subprocess.run(["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, a, b],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{a} vs {b}: {res.stdout}{res.stderr}"


def zero_map(doc: str) -> list[tuple[int, int, bool]]:
    """``nbdinfo --map`` lines as (offset, length, reads as zeros)."""
    out = []
    for line in doc.splitlines():
        offset, length, flags = line.split()[:3]
        out.append((int(offset), int(length), bool(int(flags) & 2)))
    return out


def zero_chunks(image: Path) -> list[bool]:
    data = image.read_bytes()
    zero = bytes(CHUNK)
    return [data[i : i + CHUNK] == zero[: len(data[i : i + CHUNK])]
            for i in range(0, len(data), CHUNK)]


# -- reading ---------------------------------------------------------------------------


def test_every_disk_reads_as_restored_to_several_clients_at_once(work: Path) -> None:
    sock = work / "ro.sock"
    with serving(work, "vm1@latest", "--socket", str(sock)) as served:
        assert served.doc["writable"] is False
        assert [e["url"] for e in served.doc["exports"]] == [url(sock, d) for d in SIZES]
        clients = [subprocess.Popen(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                                     url(sock, d), str(work / "restored" / f"{d}.raw")],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                   for d in SIZES for _ in range(2)]
        copies = [subprocess.Popen(["nbdcopy", url(sock, d), str(work / f"copy-{d}.raw")])
                  for d in SIZES]
        for c in clients:
            out, _ = c.communicate(timeout=60)
            assert c.returncode == 0, out
        for c in copies:
            assert c.wait(60) == 0
        for d in SIZES:
            assert (work / f"copy-{d}.raw").read_bytes() == \
                (work / "restored" / f"{d}.raw").read_bytes()
            # base:allocation: exactly the all-zero chunks read as holes/zeros.
            res = subprocess.run(["nbdinfo", "--map", url(sock, d)], capture_output=True,
                                 text=True, timeout=60, check=True)
            zeros = zero_chunks(work / "restored" / f"{d}.raw")
            assert any(zeros) and not all(zeros)
            for offset, length, is_zero in zero_map(res.stdout):
                assert offset % CHUNK == 0 and (offset + length) % CHUNK in (0, SIZES[d] % CHUNK)
                for c in range(offset // CHUNK, (offset + length + CHUNK - 1) // CHUNK):
                    assert zeros[c] == is_zero, (d, c)
        info = subprocess.run(["qemu-img", "info", "--output=json", url(sock, "disk1")],
                              capture_output=True, text=True, timeout=60, check=True)
        assert json.loads(info.stdout)["virtual-size"] == SIZES["disk1"]
    assert served.stop() == 0


def test_prune_leaves_what_is_served(work: Path, tmp_path: Path) -> None:
    """The server's shared lock keeps a forget and prune from deleting what it reads."""
    w = tmp_path / "w"
    shutil.copytree(work, w, ignore=shutil.ignore_patterns("cache", "restored", "*.sock"))
    first = run_json("snapshots", cwd=w)["snapshots"][0]["id"][:8]
    sock = tmp_path / "p.sock"
    with serving(w, f"vm1@{first}", "--disk", "disk0", "--socket", str(sock)) as served:
        assert [e["disk"] for e in served.doc["exports"]] == ["disk0"]
        write_sample_image(w / "disk0.raw", SIZES["disk0"], seed=99)  # other data
        run_cli("snapshot", "vm1", cwd=w)
        run_cli("forget", f"vm1@{first}", cwd=w)
        run_cli("prune", "--grace", "0", cwd=w)
        compare(url(sock, "disk0"), str(work / "restored" / "disk0.raw"))


def test_an_s3_repository_is_served_alike(work: Path, tmp_path: Path,
                                          s3_bucket: str) -> None:  # noqa: F811
    (tmp_path / "vmrepo.toml").write_text(
        f'repository = "{s3_url(s3_bucket)}"\n[vm.vm1]\nsource = "file"\n'
        f'disks = {{ disk1 = "{work / "disk1.raw"}" }}\n')
    run_cli("init", "--chunk-size", "64K", "--pack-size", "1M", cwd=tmp_path)
    run_cli("snapshot", "vm1", cwd=tmp_path)
    sock = tmp_path / "s3.sock"
    with serving(tmp_path, "vm1@latest", "--socket", str(sock)):
        compare(url(sock, "disk1"), str(work / "restored" / "disk1.raw"))


def test_damage_fails_only_the_reads_that_need_it(work: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    shutil.copytree(work / "repo", tmp_path / "repo")
    repo = open_repo(tmp_path / "repo")
    snap = repo.snapshots("vm1")[0]
    disk = snap.disk("disk0")
    assert disk is not None
    manifest = repo.manifest(disk.root)
    index, cid = next((i, c) for i, c in iter_chunks(manifest, lambda n: repo.page(manifest, n))
                      if c != ZERO_ID)
    loc = repo.index.get(cid)
    assert loc is not None
    pack = tmp_path / "repo" / pack_key(loc.pack_id)
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + loc.length // 2] ^= 0xFF
    pack.write_bytes(bytes(raw))
    exports = SnapshotExports(repo, snap, [disk], read_ahead=0)
    sock = tmp_path / "d.sock"
    server = NbdServer(str(sock), exports.exports, structured_replies=True)
    server.start()
    try:
        with NbdClient(NbdAddress.parse(url(sock, "disk0"))) as client:
            with pytest.raises(NbdRequestError) as err:
                client.pread(index * CHUNK, 4096)
            assert err.value.errno == 5  # EIO, and the connection goes on
            good = (work / "restored" / "disk0.raw").read_bytes()
            rest = SIZES["disk0"] - (index + 1) * CHUNK
            assert client.pread((index + 1) * CHUNK, rest) == good[(index + 1) * CHUNK :]
    finally:
        server.stop()
        exports.close()
        repo.close()
    assert f"disk0: bytes {index * CHUNK}-" in caplog.text


# -- writing, and moving a VM back to real storage ------------------------------------------


class Qemu:
    """A QEMU (q35, paused CPUs) whose virtio disks are NBD exports; qemu-io's output
    (QEMU's stdout) goes to a file."""

    def __init__(self, workdir: Path, sock: Path, disks: list[str]) -> None:
        self.qmp_path = workdir / "q.qmp"
        self.out = workdir / "qemu.out"
        args = ["qemu-system-x86_64", "-M", "q35", "-S", "-nodefaults", "-display", "none",
                "-accel", "kvm", "-accel", "tcg",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        for d in disks:
            args += ["-blockdev", f"driver=nbd,node-name=nbd-{d},server.type=unix,"
                                  f"server.path={sock},export={d}",
                     "-blockdev", f"driver=raw,node-name={d},file=nbd-{d}",
                     "-device", f"virtio-blk-pci,drive={d},id={d}"]
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    self.qmp = QmpConnection(str(self.qmp_path))
                    break
                except Exception:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        except BaseException:
            self.kill()
            raise

    def cmd(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return self.qmp.execute(command, args)

    def io(self, disk: str, command: str) -> None:
        """The guest reads or writes through the device (qemu-io on its backend)."""
        self.cmd("human-monitor-command", {
            "command-line": f'qemu-io -d /machine/peripheral/{disk}/virtio-backend "{command}"'})

    def wait_job(self, ready: bool) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            jobs = self.cmd("query-block-jobs")
            if (ready and jobs and jobs[0]["ready"]) or (not ready and not jobs):
                return
            time.sleep(0.02)
        raise AssertionError(f"mirror job: {self.cmd('query-block-jobs')}")

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.cmd("quit")
        self.kill()

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.qmp.close()
        if self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def model(path: Path, base: Path, *commands: str) -> Path:
    """``base`` with qemu-io ``commands`` applied: what the guest should see."""
    path.write_bytes(base.read_bytes())
    args = ["qemu-io", "-f", "raw", str(path)]
    for c in commands:
        args += ["-c", c]
    subprocess.run(args, check=True, capture_output=True, timeout=60)
    return path


def test_vm_runs_from_the_export_and_a_mirror_moves_it_to_real_storage(work: Path,
                                                                        tmp_path: Path) -> None:
    before = tree(work / "repo")
    sock, overlay = tmp_path / "vm.sock", tmp_path / "overlay"
    base = work / "restored" / "disk0.raw"
    before_mirror = ["write -P 0xab 100k 8k", "write -z 1M 64k", "write -P 0x5a 3M 1M",
                     "write -P 0x3c 65500 100", "write -P 0x77 6M 100k"]
    after_ready = ["write -P 0x78 8M 64k"]
    after_switch = ["write -P 0x79 10M 4k"]
    target = tmp_path / "moved.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target),
                    str(SIZES["disk0"])], check=True)
    with serving(work, "vm1@latest", "--socket", str(sock), "--writable", str(overlay)) \
            as served:
        assert served.doc["writable"] is True
        vm = Qemu(tmp_path, sock, ["disk0", "disk1"])
        try:
            for c in before_mirror[:4]:
                vm.io("disk0", c)
            vm.io("disk0", "read -P 0xab 100k 8k")
            vm.io("disk0", "read -P 0 1M 64k")
            vm.io("disk0", "read -P 0x3c 65500 100")
            vm.io("disk1", "read -P 0 0 4k" if zero_chunks(work / "restored" / "disk1.raw")[0]
                  else "read 0 4k")
            vm.io("disk0", "flush")
            vm.cmd("blockdev-add", {"driver": "qcow2", "node-name": "moved",
                                    "file": {"driver": "file", "filename": str(target)}})
            vm.cmd("blockdev-mirror", {"job-id": "m0", "device": "disk0", "target": "moved",
                                       "sync": "full"})
            vm.io("disk0", before_mirror[4])  # while the mirror copies
            vm.wait_job(ready=True)
            vm.io("disk0", after_ready[0])
            vm.cmd("job-complete", {"id": "m0"})
            vm.wait_job(ready=False)
            vm.cmd("blockdev-del", {"node-name": "disk0"})  # the export is no longer used
            vm.cmd("blockdev-del", {"node-name": "nbd-disk0"})
            vm.io("disk0", after_switch[0])
            vm.io("disk0", "read -P 0x5a 3M 1M")
            vm.io("disk0", "flush")
            out = vm.output()
            assert "Pattern verification failed" not in out, out
            assert out.count("read ") >= 5 and "wrote 4096/4096 bytes at offset 10485760" in out
        finally:
            vm.quit()
        assert served.stop() == 0
    guest = model(tmp_path / "guest.raw", base, *before_mirror, *after_ready, *after_switch)
    compare(str(target), str(guest), "qcow2", "raw")
    # The repository is untouched; the overlay kept the writes made through the export.
    assert tree(work / "repo") == before
    with serving(work, "vm1@latest", "--socket", str(sock), "--writable", str(overlay)) \
            as served:
        assert served.doc["exports"][0]["resumed"] is True
        compare(url(sock, "disk0"), str(model(tmp_path / "exported.raw", base,
                                               *before_mirror, *after_ready)))
        compare(url(sock, "disk1"), str(work / "restored" / "disk1.raw"))
    assert tree(work / "repo") == before


def test_overlay_writes_zeroes_trims_and_flushes(work: Path, tmp_path: Path) -> None:
    """Unaligned writes across chunks, zeros and trims inside and over chunks, zero chunks
    of the snapshot, block status of written areas; the overlay is the snapshot's own."""
    repo = open_repo(work / "repo")
    snap = repo.snapshots("vm1")[0]
    base = work / "restored" / "disk0.raw"
    zeros = zero_chunks(base)
    hole = zeros.index(True) * CHUNK
    data = zeros.index(False) * CHUNK
    commands = [f"write -P 0x11 {CHUNK - 300} 1000", f"write -P 0x22 {hole + 10} 20",
                f"write -z {data + 100} 200", f"discard {2 * CHUNK} {3 * CHUNK}",
                f"write -z {hole} {CHUNK}", f"write -P 0x33 {SIZES['disk0'] - 512} 512",
                "flush"]
    exports = SnapshotExports(repo, snap, snap.disks, overlay_dir=tmp_path / "ov",
                              cache_size=1 * MiB, read_ahead=256 << 10)
    sock = tmp_path / "o.sock"
    server = NbdServer(str(sock), exports.exports, structured_replies=True)
    server.start()
    try:
        args = ["qemu-io", "-f", "raw", url(sock, "disk0")]
        for c in commands:
            args += ["-c", c]
        res = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "error" not in res.stdout.lower(), res.stdout
        expected = model(tmp_path / "expected.raw", base, *commands)
        compare(url(sock, "disk0"), str(expected))
        with NbdClient(NbdAddress.parse(url(sock, "disk0")), ["base:allocation"]) as client:
            trimmed = [e for e in client.block_status("base:allocation", 2 * CHUNK, 3 * CHUNK)]
        assert all(e.flags == 3 for e in trimmed)
        assert exports.exports["disk0"].overlay is not None
        written = exports.exports["disk0"].overlay.chunks_mapped
        assert written >= 5
    finally:
        server.stop()
        exports.close()
    # Flushed and closed: a new server continues from the overlay ...
    again = SnapshotExports(repo, snap, snap.disks[:1], overlay_dir=tmp_path / "ov")
    try:
        overlay = again.exports["disk0"].overlay
        assert overlay is not None and overlay.resumed and overlay.chunks_mapped == written
        got = b"".join(bytes(d) if d is not None else bytes(n)
                       for n, d in again.exports["disk0"].read(0, SIZES["disk0"]))
        assert got == expected.read_bytes()
    finally:
        again.close()
    repo.close()


# -- stopping, and bad input -------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_ends_it_cleanly(work: Path, tmp_path: Path, sig: int) -> None:
    sock = tmp_path / "s.sock"
    served = Served(work, "vm1@latest", "--socket", str(sock))
    try:
        assert served.doc["pid"] == served.proc.pid and sock.is_socket()
        assert stat_mode(sock) == 0o600
        assert held_by(work, served.proc.pid)
        with NbdClient(NbdAddress.parse(url(sock, "disk1"))) as client:
            client.pread(0, 4096)
            started = time.monotonic()
            assert served.stop(sig) == 0  # with a client connected
            assert time.monotonic() - started < 10
    finally:
        served.stop(signal.SIGKILL)
    assert not sock.exists()
    assert json.loads(served.out) == served.doc  # one document, nothing after it
    assert not held_by(work, served.proc.pid)
    with pytest.raises(ProcessLookupError):
        os.kill(served.proc.pid, 0)


def held_by(work: Path, pid: int) -> list[str]:
    return [lk["lock"] for lk in run_json("locks", cwd=work)["locks"]
            if f"by pid {pid} " in lk["lock"] and "serve vm1@" in lk["lock"]]


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_tcp_listen_and_a_stale_socket(work: Path, tmp_path: Path) -> None:
    with serving(work, "vm1@latest", "--disk", "disk1", "--listen", "127.0.0.1:0") as served:
        port = served.doc["listen"]["port"]
        assert served.doc["exports"][0]["url"] == f"nbd://127.0.0.1:{port}/disk1"
        compare(f"nbd://127.0.0.1:{port}/disk1", str(work / "restored" / "disk1.raw"))
    # A socket left by a server that was killed is replaced.
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    with serving(work, "vm1@latest", "--disk", "disk1", "--socket", str(stale)):
        compare(url(stale, "disk1"), str(work / "restored" / "disk1.raw"))


def test_bad_input_gives_one_line_and_its_exit_code(work: Path, tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    live = tmp_path / "live.sock"
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(live))
    other.listen(1)
    cases = [
        (["vm1@2001-01-01", "--socket", str(tmp_path / "a.sock")], exitcodes.NO_SNAPSHOT,
         "no snapshot matches"),
        (["vm1@latest", "--disk", "nosuch", "--socket", str(tmp_path / "a.sock")],
         exitcodes.RESTORE, "has no disk 'nosuch'"),
        (["vm1@latest", "--socket", str(tmp_path / "missing" / "a.sock")], exitcodes.RESTORE,
         "No such file or directory"),
        (["vm1@latest", "--listen", f"127.0.0.1:{port}", "--writable", str(tmp_path / "ov")],
         exitcodes.RESTORE, "Address already in use"),
        (["vm1@latest", "--socket", str(live)], exitcodes.RESTORE, "another server"),
        (["vm1@latest"], exitcodes.USAGE, "--socket"),
        (["vm1@latest", "--listen", "localhost"], exitcodes.USAGE, "HOST:PORT"),
        (["vm1@latest", "--socket", str(tmp_path / "b.sock"), "--writable", str(live)],
         exitcodes.OUTPUT, "is not a directory"),
    ]
    try:
        for args, code, text in cases:
            res = run_cli("serve", *args, cwd=work, check=False)
            lines = res.stderr.strip().splitlines()
            assert res.returncode == code and len(lines) == 1, (args, res.stderr)
            assert lines[0].startswith("vmrepo: error: ") and text in lines[0], lines
        assert live.is_socket()  # never removed from under its server
        assert not (tmp_path / "ov").exists()  # the address failed before any overlay
        assert sorted(os.listdir(tmp_path)) == ["live.sock"]  # no temporary socket left
    finally:
        busy.close()
        other.close()
