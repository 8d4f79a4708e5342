"""The nbd source against a real QEMU: fleecing point in time, extents, failures; exports."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vmrepo import exitcodes
from vmrepo.backup import SnapshotOptions, take_snapshot
from vmrepo.repository import Repository
from vmrepo.sources.base import DiskStream
from vmrepo.sources.errors import SourceError
from vmrepo.sources.nbd.client import NbdClient, merge_extents
from vmrepo.sources.pull import FleecingSource, PullDisk
from vmrepo.storage.local import LocalBackend

from .helpers import run_cli, run_json, vmrepo_bin, wait_for_socket
from .qemu import QemuVM
from .test_nbd_client import nbdinfo_map
from .test_qmp_push import KillQemuOnFirstPack

MiB = 1 << 20
CHUNK = 256 << 10


def configure(vm: QemuVM, extra: str = 'fleece_reserve = "16M"\n') -> None:
    (vm.workdir / "vmrepo.toml").write_text(
        f'repository = "repo"\n[vm.vm1]\nsource = "nbd"\nsocket = "{vm.qmp_path}"\n'
        f'disks = ["disk0", "disk1"]\n{extra}')


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[QemuVM]:
    machine = QemuVM(tmp_path, {"disk0": 64 * MiB, "disk1": 32 * MiB})
    machine.start()
    configure(machine)
    run_cli("init", "--pack-size", "1M", cwd=tmp_path)
    try:
        yield machine
    finally:
        machine.kill()


def random_write(vm: QemuVM, node: str, offset: int, size: int, seed: int) -> None:
    src = vm.workdir / f"rnd-{seed}"
    src.write_bytes(random.Random(seed).randbytes(size))
    vm.write(node, f"write -s {src} {offset} {size}")


def filter_node(vm: QemuVM, index: int) -> str:
    """The copy-before-write filter vmrepo put above disk ``index``: guest writes go there."""
    names = [n["node-name"] for n in vm.cmd("query-named-block-nodes", {"flat": True})]
    return next(n for n in names if n.startswith("vmrepo-") and n.endswith(f"-{index}c"))


def source(vm: QemuVM, **kw: Any) -> FleecingSource:
    return FleecingSource("vm1", str(vm.qmp_path), ["disk0", "disk1"], **kw)


def repo(vm: QemuVM) -> Repository:
    return Repository.open(LocalBackend(vm.workdir / "repo"))


def compare(vm: QemuVM, snapshot_id: str, disk: str, ref: Path) -> None:
    out = vm.workdir / f"out-{snapshot_id[:8]}-{disk}.raw"
    run_cli("restore", f"vm1@{snapshot_id[:8]}", "--disk", disk, "-o", str(out), cwd=vm.workdir)
    res = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(out), str(ref)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_point_in_time_and_extents_match_nbdinfo(vm: QemuVM) -> None:
    random_write(vm, "disk0", 0, 4 * MiB, 1)
    vm.write("disk1", "write -P 7 1M 1M")
    first = run_json("snapshot", "vm1", cwd=vm.workdir)
    assert [d["taken"] for d in first["disks"]] == ["full", "full"]
    random_write(vm, "disk0", 10 * MiB, 300_000, 2)
    vm.write("disk0", "write -z 1M 512k")              # dirty, reads as zeros
    refs = {d: vm.reference(d, vm.workdir / f"ref-{d}.raw") for d in ("disk0", "disk1")}
    seen: dict[str, Any] = {}

    def during(disks: list[DiskStream]) -> None:
        # The point in time is fixed: these guest writes must not reach this snapshot.
        random_write(vm, filter_node(vm, 0), 0, 1 * MiB, 3)
        vm.write(filter_node(vm, 1), "write -P 9 1M 64k")
        d0 = disks[0]
        assert isinstance(d0, PullDisk) and d0.address is not None and d0.bitmap_context
        url = str(d0.address)
        with NbdClient(d0.address, ["base:allocation", d0.bitmap_context]) as c:
            for ctx in ("base:allocation", d0.bitmap_context):
                ours = merge_extents(c.block_status(ctx))
                seen[ctx] = ours
                assert ours == nbdinfo_map(url, ctx), ctx

    snap = take_snapshot(repo(vm), source(vm), SnapshotOptions(vm="vm1", on_begin=during))
    d0 = snap.disk("disk0")
    assert d0 is not None and d0.taken == "incremental"
    # Only dirty bytes were read: the 300000 bytes at 10M span two chunks, the zeroed 512k two.
    assert d0.source["expected_bytes"] == 4 * CHUNK
    assert d0.stats["bytes_data"] + d0.stats["bytes_zero"] == 4 * CHUNK
    # Zeros are not read: the zeroed 512k, and the unallocated end of the chunks at 10M
    # (the 300000 bytes there fill five 64 KiB clusters).
    assert d0.source["bytes_zero"] == 2 * CHUNK + (2 * CHUNK - 5 * 65536)
    bitmap_extents = [e for ctx, exts in seen.items() if ctx != "base:allocation"
                      for e in exts if e.flags & 1]
    assert sum(e.length for e in bitmap_extents) == 4 * CHUNK
    for d, ref in refs.items():
        compare(vm, snap.id, d, ref)
    assert vm.state() == {"jobs": [], "nodes": [], "exports": []}
    # The writes made during the snapshot are in the next one.
    nxt = run_json("snapshot", "vm1", cwd=vm.workdir)
    for d in ("disk0", "disk1"):
        compare(vm, nxt["id"], d, vm.reference(d, vm.workdir / f"ref2-{d}.raw"))
    assert {d["name"]: d["stats"]["chunks"] for d in nxt["disks"]} == {"disk0": 4, "disk1": 1}


def test_differential_and_full(vm: QemuVM) -> None:
    vm.write("disk0", "write -P 1 0 1M")
    run_json("snapshot", "vm1", cwd=vm.workdir)
    vm.write("disk0", "write -P 2 5M 4k")
    run_json("snapshot", "vm1", cwd=vm.workdir)
    vm.write("disk1", "write -P 3 7M 4k")
    diff = run_json("snapshot", "vm1", "--differential", cwd=vm.workdir)
    assert [(d["taken"], d["stats"]["chunks"]) for d in diff["disks"]] == [
        ("differential", 1), ("differential", 1)]
    full = run_json("snapshot", "vm1", "--full", cwd=vm.workdir)
    assert [d["taken"] for d in full["disks"]] == ["full", "full"]
    for d in ("disk0", "disk1"):
        compare(vm, full["id"], d, vm.reference(d, vm.workdir / f"ref-{d}.raw"))
        compare(vm, diff["id"], d, vm.workdir / f"ref-{d}.raw")


def _records(vm: QemuVM) -> list[str]:
    return sorted(p.name for p in (vm.workdir / "repo" / "snapshots").glob("*"))


def _next_is_complete(vm: QemuVM, before: list[str], kind: str = "incremental") -> None:
    assert _records(vm) == before
    doc = run_json("snapshot", "vm1", cwd=vm.workdir)
    assert vm.state() == {"jobs": [], "nodes": [], "exports": []}
    assert doc["disks"][0]["taken"] == kind, doc["disks"][0]["reason"]
    for d in ("disk0", "disk1"):
        compare(vm, doc["id"], d, vm.reference(d, vm.workdir / f"ref-n-{doc['id'][:6]}-{d}.raw"))


def _fill(vm: QemuVM, seed: int) -> None:
    random_write(vm, "disk0", 0, 60 * MiB, seed)
    random_write(vm, "disk1", 0, 20 * MiB, seed + 1)


def test_export_vanishing_mid_read(vm: QemuVM) -> None:
    run_json("snapshot", "vm1", cwd=vm.workdir)
    before = _records(vm)
    _fill(vm, 20)

    def vanish(disks: list[DiskStream]) -> None:
        for e in vm.cmd("query-block-exports"):
            vm.cmd("block-export-del", {"id": e["id"], "mode": "hard"})

    with pytest.raises(SourceError):
        take_snapshot(repo(vm), source(vm), SnapshotOptions(vm="vm1", on_begin=vanish))
    assert vm.state() == {"jobs": [], "nodes": [], "exports": []}
    _next_is_complete(vm, before)


def test_qemu_killed_mid_read(vm: QemuVM) -> None:
    _fill(vm, 30)
    assert vm.proc is not None
    backend = KillQemuOnFirstPack(LocalBackend(vm.workdir / "repo"), vm.proc.pid)
    with pytest.raises(SourceError):
        take_snapshot(Repository.open(backend), source(vm), SnapshotOptions(vm="vm1"))
    assert _records(vm) == []
    vm.kill()
    vm.start()
    _next_is_complete(vm, [], kind="full")


def test_vmrepo_sigkill_mid_read_then_next_run_cleans(vm: QemuVM) -> None:
    run_json("snapshot", "vm1", cwd=vm.workdir)
    before = _records(vm)
    _fill(vm, 40)
    proc = subprocess.Popen([vmrepo_bin(), "snapshot", "vm1"], cwd=vm.workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not vm.cmd("query-block-exports") and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)
        assert proc.poll() is None, "the snapshot ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    leftovers = vm.state()
    assert leftovers["exports"] and leftovers["jobs"]
    _next_is_complete(vm, before)
    # The killed run's fleece images were removed too.
    repo_id = repo(vm).config.repository_id
    assert not list(Path(tempfile.gettempdir()).glob(f"vmrepo-fleece-{repo_id[:8]}-*"))


@pytest.fixture
def small_scratch(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "scratch"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_fleece_space_running_out_stops_the_snapshot(vm: QemuVM, small_scratch: Path) -> None:
    _fill(vm, 50)
    run_json("snapshot", "vm1", cwd=vm.workdir)
    before = _records(vm)
    bitmaps_before = sorted(b["name"] for b in vm.bitmaps("disk0"))
    # Refused up front when the scratch space is below the reserve.
    configure(vm, f'scratch = "{small_scratch}"\nfleece_reserve = "1G"\n')
    res = run_cli("snapshot", "vm1", cwd=vm.workdir, check=False)
    assert res.returncode == exitcodes.SOURCE and "fleece_reserve" in res.stderr
    assert vm.state() == {"jobs": [], "nodes": [], "exports": []}

    def overwrite(disks: list[DiskStream]) -> None:
        # The guest rewrites data the snapshot still needs: it is copied into the fleece.
        for i in range(10):
            random_write(vm, filter_node(vm, 0), i * 4 * MiB, 4 * MiB, 60 + i)
            time.sleep(0.25)

    src = source(vm, scratch=str(small_scratch), reserve=40 * MiB)
    with pytest.raises(SourceError, match="nearly full"):
        take_snapshot(repo(vm), src, SnapshotOptions(vm="vm1", on_begin=overwrite,
                                                     wanted="full"))
    assert sorted(b["name"] for b in vm.bitmaps("disk0")) == bitmaps_before
    assert vm.state() == {"jobs": [], "nodes": [], "exports": []}
    assert not any(small_scratch.iterdir())
    configure(vm)
    _next_is_complete(vm, before)


def assert_restore_equals(work: Path, spec: str, disk: str, image: Path) -> None:
    """The restored disk is byte-identical to ``image`` (converted to raw)."""
    ref = work / "ref.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(ref)], check=True)
    out = work / "out.raw"
    run_cli("restore", spec, "--disk", disk, "-o", str(out), "--force", cwd=work)
    assert subprocess.run(["cmp", str(out), str(ref)]).returncode == 0


def test_plain_export_with_bitmap(tmp_path: Path) -> None:
    """An export set up by someone else (qemu-storage-daemon with a bitmap)."""
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "32M"], check=True)
    io = ["qemu-io", "-f", "qcow2", str(img)]
    subprocess.run([*io, "-c", "write -P 1 0 2M"], check=True, capture_output=True)
    sock = tmp_path / "exp.sock"
    (tmp_path / "vmrepo.toml").write_text(
        f'repository = "repo"\n[vm.ext]\nsource = "nbd"\n'
        f'url = "nbd+unix:///vda?socket={sock}"\nbitmap = "chk"\ndisk = "vda"\n')
    run_cli("init", cwd=tmp_path)

    @contextlib.contextmanager
    def exported() -> Iterator[None]:
        proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=file0,filename={img},read-only=on",
             "--blockdev", "driver=qcow2,node-name=fmt0,file=file0,read-only=on",
             "--nbd-server", f"addr.type=unix,addr.path={sock}",
             "--export", "type=nbd,id=e0,node-name=fmt0,name=vda,bitmaps.0=chk"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_socket(sock, proc)
            yield
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(10)
            if proc.stderr:
                proc.stderr.close()
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()

    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "chk"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--disable", str(img), "chk"], check=True)
    with exported():
        first = run_json("snapshot", "ext", cwd=tmp_path)
    assert first["disks"][0]["taken"] == "full"
    # New writes are tracked by a new bitmap "chk" (as a libvirt checkpoint would be).
    subprocess.run(["qemu-img", "bitmap", "--remove", str(img), "chk"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "chk"], check=True)
    subprocess.run([*io, "-c", "write -P 2 10M 4k", "-c", "write -z 0 64k"], check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "bitmap", "--disable", str(img), "chk"], check=True)
    with exported():
        second = run_json("snapshot", "ext", cwd=tmp_path)
    d = second["disks"][0]
    assert d["taken"] == "incremental"
    assert d["stats"]["bytes_data"] + d["stats"]["bytes_zero"] == 2 * 65536
    assert_restore_equals(tmp_path, "ext@latest", "vda", img)


def test_qcow2_file_reads_only_allocated_data(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "256M"], check=True)
    src = tmp_path / "rnd"
    src.write_bytes(random.Random(1).randbytes(3 * MiB))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {src} 5M 3M",
                    "-c", "write -P 5 100M 64k", "-c", "write -z 200M 8M", str(img)],
                   check=True, capture_output=True)
    (tmp_path / "vmrepo.toml").write_text(
        f'repository = "repo"\n[vm.img]\nsource = "file"\ndisks = {{ disk0 = "{img}" }}\n')
    run_cli("init", cwd=tmp_path)
    doc = run_json("snapshot", "img", cwd=tmp_path)
    d = doc["disks"][0]
    assert d["source"]["format"] == "qcow2"
    assert d["stats"]["bytes_data"] == 3 * MiB + 64 * 1024  # allocated data only
    assert_restore_equals(tmp_path, "img@latest", "disk0", img)
    assert not list(Path("/tmp").glob("vmrepo-image-*/nbd.sock"))



def test_fallback_is_per_disk(vm: QemuVM) -> None:
    vm.write("disk0", "write -P 1 0 1M")
    first = run_json("snapshot", "vm1", cwd=vm.workdir)
    name = next(b["name"] for b in vm.bitmaps("disk1") if b["name"].endswith(first["id"][:32]))
    vm.cmd("block-dirty-bitmap-remove", {"node": "disk1", "name": name})
    vm.write("disk0", "write -P 2 3M 4k")
    res = run_cli("snapshot", "vm1", "--json", cwd=vm.workdir)
    assert "warning: disk disk1: full instead of incremental" in res.stderr
    doc = json.loads(res.stdout)
    assert [d["taken"] for d in doc["disks"]] == ["incremental", "full"]
    assert "is missing" in doc["disks"][1]["reason"]
    for d in ("disk0", "disk1"):
        compare(vm, doc["id"], d, vm.reference(d, vm.workdir / f"ref-{d}.raw"))
