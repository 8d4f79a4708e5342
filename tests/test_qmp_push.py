"""The qmp source against a real QEMU: full, incremental, differential, fallbacks, failures."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vmrepo import exitcodes
from vmrepo.backup import SnapshotOptions, take_snapshot
from vmrepo.repository import Repository
from vmrepo.sources.errors import SourceError
from vmrepo.sources.push import QmpSource
from vmrepo.sources.qemu import bitmaps as bm
from vmrepo.storage.base import Backend, BackendWrapper, Payload
from vmrepo.storage.faulty import FaultyBackend
from vmrepo.storage.local import LocalBackend

from .helpers import killpoint, run_cli, run_json, vmrepo_bin
from .qemu import QemuVM

MiB = 1 << 20
CHUNK = 256 << 10


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[QemuVM]:
    machine = QemuVM(tmp_path, {"disk0": 64 * MiB, "disk1": 32 * MiB})
    machine.start()
    (tmp_path / "vmrepo.toml").write_text(
        f'repository = "repo"\n[vm.vm1]\nsource = "qmp"\nsocket = "{machine.qmp_path}"\n'
        'disks = ["disk0", "disk1"]\n')
    # Small packs, so that failures can strike while QEMU is still sending.
    run_cli("init", "--pack-size", "1M", cwd=tmp_path)
    try:
        yield machine
    finally:
        machine.kill()


def snap(vm: QemuVM, *args: str) -> dict[str, Any]:
    doc: dict[str, Any] = run_json("snapshot", "vm1", *args, cwd=vm.workdir)
    return doc


def disk(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(d for d in doc["disks"] if d["name"] == name)
    return found


def assert_restores(vm: QemuVM, snapshot_id: str, refs: dict[str, Path]) -> None:
    out = vm.workdir / f"restore-{snapshot_id[:8]}"
    out.mkdir()
    run_cli("restore", f"vm1@{snapshot_id[:8]}", "-o", str(out), cwd=vm.workdir)
    for name, ref in refs.items():
        res = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                              str(out / f"{name}.raw"), str(ref)], capture_output=True, text=True)
        assert res.returncode == 0, f"{name}: {res.stdout}{res.stderr}"


def references(vm: QemuVM, tag: str) -> dict[str, Path]:
    return {d: vm.reference(d, vm.workdir / f"ref-{tag}-{d}.raw") for d in ("disk0", "disk1")}


def assert_clean(vm: QemuVM) -> None:
    state = vm.state()
    assert state == {"jobs": [], "nodes": [], "exports": []}, state
    for d in ("disk0", "disk1"):
        names = [b["name"] for b in vm.bitmaps(d)]
        assert not [n for n in names if "-tmp-" in n], names


def our_bitmaps(vm: QemuVM, d: str) -> list[str]:
    return sorted(b["name"] for b in vm.bitmaps(d) if b["name"].startswith("vmrepo-"))


def test_full_incremental_differential_restore_exactly(vm: QemuVM) -> None:
    vm.write("disk0", "write -P 0x11 0 3M")
    vm.write("disk1", "write -P 0x22 1M 1M")
    full = snap(vm)
    refs_full = references(vm, "full")
    assert [d["taken"] for d in full["disks"]] == ["full", "full"]
    assert_clean(vm)

    vm.write("disk0", "write -P 0x33 8M 100k")
    vm.write("disk0", "write -z 0 512k")          # data that became zeros
    vm.write("disk1", "write -P 0x44 20M 4k")
    inc = snap(vm)
    refs_inc = references(vm, "inc")
    d0 = disk(inc, "disk0")
    assert d0["taken"] == "incremental" and d0["base"] == full["id"]
    # Only the dirty chunks travelled: 8M+100k spans one chunk, the zeroed 512k two.
    assert d0["source"]["expected_bytes"] == 3 * CHUNK
    assert d0["stats"]["bytes_data"] + d0["stats"]["bytes_zero"] == 3 * CHUNK
    assert d0["stats"]["chunks"] == 3 and d0["stats"]["chunks_zero"] == 2
    assert disk(inc, "disk1")["stats"]["chunks"] == 1
    assert_clean(vm)

    vm.write("disk1", "write -P 0x55 30M 64k")
    diff = snap(vm, "--differential")
    refs_diff = references(vm, "diff")
    d1 = disk(diff, "disk1")
    assert d1["taken"] == "differential" and d1["base"] == full["id"]
    assert d1["stats"]["chunks"] == 2  # everything since the full: 20M and 30M
    assert disk(diff, "disk0")["stats"]["chunks"] == 3

    vm.write("disk0", "write -P 0x66 40M 4k")
    inc2 = snap(vm)
    refs_inc2 = references(vm, "inc2")
    # The incremental chain continues from the differential, not from the full.
    assert disk(inc2, "disk0")["base"] == diff["id"]
    assert disk(inc2, "disk0")["stats"]["chunks"] == 1
    assert disk(inc2, "disk1")["stats"]["chunks"] == 0

    for snapshot, refs in ((full, refs_full), (inc, refs_inc), (diff, refs_diff),
                           (inc2, refs_inc2)):
        assert_restores(vm, snapshot["id"], refs)
    # Each disk keeps the newest bitmap and the one of the last full.
    for d in ("disk0", "disk1"):
        names = our_bitmaps(vm, d)
        assert len(names) == 2
        assert any(n.endswith(full["id"][:32]) for n in names)
        assert any(n.endswith(inc2["id"][:32]) for n in names)


def test_fallbacks_are_per_disk_with_reasons(vm: QemuVM) -> None:
    vm.write("disk0", "write -P 1 0 1M")
    vm.write("disk1", "write -P 2 0 1M")
    snap(vm)

    def expect(reason: str, *, fallback_disk: str = "disk1") -> dict[str, Any]:
        res = run_cli("snapshot", "vm1", "--json", cwd=vm.workdir)
        assert f"warning: disk {fallback_disk}: full instead of incremental" in res.stderr
        assert reason in res.stderr
        doc: dict[str, Any] = json.loads(res.stdout)
        other = "disk0" if fallback_disk == "disk1" else "disk1"
        assert disk(doc, fallback_disk)["taken"] == "full", doc
        assert reason in disk(doc, fallback_disk)["reason"]
        assert disk(doc, other)["taken"] == "incremental", disk(doc, other)["reason"]
        assert_clean(vm)
        return doc

    # missing
    vm.cmd("block-dirty-bitmap-remove", {"node": "disk1", "name": _latest(vm, "disk1")})
    expect("is missing")
    # disabled
    vm.cmd("block-dirty-bitmap-disable", {"node": "disk1", "name": _latest(vm, "disk1")})
    expect("disabled")
    # wrong granularity
    cur = _latest(vm, "disk1")
    vm.cmd("block-dirty-bitmap-remove", {"node": "disk1", "name": cur})
    vm.cmd("block-dirty-bitmap-add", {"node": "disk1", "name": cur, "persistent": True,
                                      "granularity": 65536})
    expect("granularity 65536")
    # foreign: only another repository's bitmap is left on the disk
    cur = _latest(vm, "disk1")
    vm.cmd("block-dirty-bitmap-remove", {"node": "disk1", "name": cur})
    other = bm.bitmap_name("f" * 32, "e" * 64)
    vm.cmd("block-dirty-bitmap-add", {"node": "disk1", "name": other, "persistent": True,
                                      "granularity": CHUNK})
    expect("other repositories")
    assert other in [b["name"] for b in vm.bitmaps("disk1")]  # never touched
    # the snapshot the bitmap starts from is no longer in the repository
    latest = run_json("snapshots", "vm1", cwd=vm.workdir)["snapshots"][-1]["id"]
    (vm.workdir / "repo" / "snapshots" / latest).unlink()
    doc = snap(vm)
    for d in ("disk0", "disk1"):
        assert disk(doc, d)["taken"] == "full"
        assert "no longer in the repository" in disk(doc, d)["reason"]
    assert_clean(vm)
    # resized
    vm.cmd("block_resize", {"node-name": "disk1", "size": 48 * MiB})
    doc = expect("resized from 32.00 MiB to 48.00 MiB")
    assert disk(doc, "disk1")["size"] == 48 * MiB
    # busy: exported with its bitmap by someone else
    vm.cmd("nbd-server-start", {"addr": {"type": "unix",
                                         "data": {"path": str(vm.workdir / "busy.sock")}}})
    vm.cmd("block-export-add", {"type": "nbd", "id": "busy", "node-name": "disk1",
                                "writable": True, "bitmaps": [_latest(vm, "disk1")]})
    doc = snap(vm)
    assert "busy" in disk(doc, "disk1")["reason"] and disk(doc, "disk1")["taken"] == "full"
    assert disk(doc, "disk0")["taken"] == "incremental"
    vm.cmd("block-export-del", {"id": "busy"})
    vm.cmd("nbd-server-stop")


def _latest(vm: QemuVM, d: str) -> str:
    """This repository's bitmap named after the newest snapshot."""
    snaps = run_json("snapshots", "vm1", cwd=vm.workdir)["snapshots"]
    newest = snaps[-1]["id"][:32]
    return next(n for n in our_bitmaps(vm, d) if n.endswith(newest))


def test_qemu_sigkill_then_restart_gives_correct_full(vm: QemuVM) -> None:
    vm.write("disk0", "write -P 7 0 2M")
    snap(vm)
    vm.quit()   # a clean shutdown stores the persistent bitmaps in the qcow2 files
    vm.start()
    vm.write("disk0", "write -P 8 1M 64k")
    vm.cmd("stop")
    vm.write("disk0", "flush")
    vm.kill()
    vm.start()
    stored = vm.bitmaps("disk0")
    assert stored and all(b.get("inconsistent") for b in stored)
    doc = snap(vm)
    for d in ("disk0", "disk1"):
        assert disk(doc, d)["taken"] == "full"
        assert "inconsistent" in disk(doc, d)["reason"]
    assert_restores(vm, doc["id"], references(vm, "after-crash"))
    # The inconsistent bitmaps were removed; one fresh bitmap per disk remains.
    assert not any(b.get("inconsistent") for b in vm.bitmaps("disk0"))
    assert len(our_bitmaps(vm, "disk0")) == 1


def test_bitmaps_command_lists_and_removes(vm: QemuVM) -> None:
    snap(vm)
    listed = run_json("bitmaps", "vm1", cwd=vm.workdir)["bitmaps"]
    assert sorted(b["node"] for b in listed) == ["disk0", "disk1"]
    assert all(b["this_repository"] and b["recording"] for b in listed)
    removed = run_json("bitmaps", "vm1", "--remove", cwd=vm.workdir)["bitmaps"]
    assert len(removed) == 2
    assert our_bitmaps(vm, "disk0") == [] and our_bitmaps(vm, "disk1") == []
    doc = snap(vm)
    assert all("missing" in d["reason"] for d in doc["disks"])


# -- failures ---------------------------------------------------------------------


def _open_repo(vm: QemuVM, backend: Backend | None = None) -> Repository:
    return Repository.open(backend or LocalBackend(vm.workdir / "repo"))


def _source(vm: QemuVM) -> QmpSource:
    return QmpSource("vm1", str(vm.qmp_path), ["disk0", "disk1"])


def _records(vm: QemuVM) -> list[str]:
    return sorted(p.name for p in (vm.workdir / "repo" / "snapshots").glob("*"))


def _fill(vm: QemuVM, seed: int) -> None:
    """Random (so incompressible and not deduplicated) data over most of both disks."""
    for name, size in (("disk0", 64 * MiB), ("disk1", 20 * MiB)):
        src = vm.workdir / f"random-{seed}-{name}"
        src.write_bytes(random.Random(seed).randbytes(size))
        vm.write(name, f"write -s {src} 0 {size}")


def _after_failure_next_snapshot_is_complete(vm: QemuVM, before: list[str]
                                              ) -> dict[str, Any]:
    assert _records(vm) == before
    doc = snap(vm)
    assert_restores(vm, doc["id"], references(vm, f"next-{doc['id'][:6]}"))
    assert_clean(vm)
    return doc


def test_repository_failure_mid_backup(vm: QemuVM) -> None:
    _fill(vm, 1)
    snap(vm)
    before = _records(vm)
    _fill(vm, 3)   # every chunk dirty: the incremental is large
    bitmaps_before = {d: our_bitmaps(vm, d) for d in ("disk0", "disk1")}
    faulty = FaultyBackend(LocalBackend(vm.workdir / "repo"), {"put": "ok,fail*"},
                           key_prefix="data/")
    with pytest.raises(Exception, match="injected fault"):
        take_snapshot(_open_repo(vm, faulty), _source(vm), SnapshotOptions(vm="vm1"))
    assert_clean(vm)
    assert {d: our_bitmaps(vm, d) for d in ("disk0", "disk1")} == bitmaps_before
    # No dirty bit lost: the next snapshot is incremental and carries all changes.
    _after_failure_next_snapshot_is_complete(vm, before)
    assert disk(snap(vm), "disk0")["taken"] == "incremental"


class KillQemuOnFirstPack(BackendWrapper):
    """A backend that SIGKILLs QEMU when the first pack is stored."""

    def __init__(self, inner: Backend, pid: int) -> None:
        super().__init__(inner)
        self.pid = pid

    def put(self, key: str, data: Payload) -> None:
        if key.startswith("data/") and self.pid:
            os.kill(self.pid, signal.SIGKILL)
            self.pid = 0
        self.inner.put(key, data)


def test_qemu_killed_mid_backup(vm: QemuVM) -> None:
    _fill(vm, 5)
    before = _records(vm)
    assert vm.proc is not None
    backend = KillQemuOnFirstPack(LocalBackend(vm.workdir / "repo"), vm.proc.pid)
    with pytest.raises(SourceError) as exc:
        take_snapshot(_open_repo(vm, backend), _source(vm), SnapshotOptions(vm="vm1"))
    assert "QEMU" in str(exc.value)
    assert _records(vm) == before
    vm.kill()
    vm.start()
    _after_failure_next_snapshot_is_complete(vm, before)


def _kill_cli_mid_backup(vm: QemuVM, sig: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([vmrepo_bin(), "snapshot", "vm1"], cwd=vm.workdir, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if any(j.get("status") in ("running", "paused") for j in vm.cmd("query-jobs")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the snapshot ended before it could be interrupted"
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    return proc


def test_vmrepo_sigkill_mid_backup_is_cleaned_by_next_run(vm: QemuVM) -> None:
    vm.write("disk0", "write -P 9 0 1M")
    snap(vm)
    before = _records(vm)
    _fill(vm, 11)
    _kill_cli_mid_backup(vm, signal.SIGKILL)
    assert _records(vm) == before
    # The killed run left its job and node behind; the next run cleans them up.
    left = vm.state()
    assert left["nodes"] and left["jobs"]
    doc = _after_failure_next_snapshot_is_complete(vm, before)
    cleaned = doc["source"]["info"]["cleaned_up"]
    assert {f"job {j['id']}" for j in left["jobs"]} <= set(cleaned)
    assert {f"node {n}" for n in left["nodes"]} <= set(cleaned)
    assert len(our_bitmaps(vm, "disk0")) == 2  # the newest and the full's


def test_ctrl_c_mid_backup_leaves_qemu_clean(vm: QemuVM) -> None:
    snap(vm)
    before = _records(vm)
    bitmaps_before = our_bitmaps(vm, "disk0")
    _fill(vm, 13)
    proc = _kill_cli_mid_backup(vm, signal.SIGINT)
    assert proc.returncode == exitcodes.INTERRUPTED
    assert_clean(vm)
    assert our_bitmaps(vm, "disk0") == bitmaps_before
    _after_failure_next_snapshot_is_complete(vm, before)


@pytest.mark.parametrize(("signame", "operation", "prefix", "when"), [
    ("SIGINT", "put", "snapshots/", "after"),  # the record written, QEMU's jobs not done
    ("SIGTERM", "put", "snapshots/", "after"),
    ("SIGINT", "delete", "locks/", "before"),  # all done but the lock's release
])
def test_signal_as_the_record_is_written_completes_the_snapshot(
        vm: QemuVM, signame: str, operation: str, prefix: str, when: str) -> None:
    """Once the record is written, QEMU's jobs must be finished too, and the lock released:
    a signal then is noted, the snapshot completes (exit 0, said in a warning) and QEMU
    is left clean."""
    snap(vm)
    before = _records(vm)
    vm.write("disk0", "write -P 5 1M 1M")
    refs = references(vm, f"sig-{signame}")
    res = subprocess.run(killpoint(operation, prefix, "1", f"{when}:{signame}", "--",
                                   "snapshot", "vm1", "--json"),
                         cwd=vm.workdir, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{signame} came while the snapshot was being committed: it was completed" \
        in res.stderr
    assert "Traceback" not in res.stderr
    warnings = json.loads(res.stdout)["warnings"]  # its report, whole
    if prefix == "snapshots/":  # held inside the snapshot: in its report too
        assert warnings == [f"{signame} came while the snapshot was being committed: it was "
                            "completed"]
    assert_clean(vm)
    assert not list((vm.workdir / "repo" / "locks").iterdir())  # released, not left stale
    [new] = sorted(set(_records(vm)) - set(before))
    assert_restores(vm, new, refs)
    doc = snap(vm)  # the bitmaps moved on: the next snapshot is an incremental on it
    assert disk(doc, "disk0")["taken"] == "incremental"
    assert disk(doc, "disk0")["base"] == new


def test_job_error_fails_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(bad), "16M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 3 4M 1M", str(bad)], check=True,
                   capture_output=True)
    mapping = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(bad)],
                                        capture_output=True, text=True, check=True).stdout)
    extent = next(m for m in mapping
                  if m["data"] and m["start"] <= 4 * MiB < m["start"] + m["length"])
    sector = (extent["offset"] + 4 * MiB - extent["start"]) // 512  # where guest 4M lives
    machine = QemuVM(tmp_path, {})
    machine.start()
    try:
        machine.cmd("blockdev-add", {"driver": "qcow2", "node-name": "bad", "file": {
            "driver": "blkdebug", "image": {"driver": "file", "filename": str(bad)},
            "inject-error": [{"event": "none", "iotype": "read", "errno": 5,
                              "sector": sector, "once": False}]}})
        (tmp_path / "vmrepo.toml").write_text(
            f'repository = "repo"\n[vm.vm1]\nsource = "qmp"\nsocket = "{machine.qmp_path}"\n')
        run_cli("init", cwd=tmp_path)
        res = run_cli("snapshot", "vm1", cwd=tmp_path, check=False)
        assert res.returncode == exitcodes.SOURCE, res.stderr
        assert "backup job failed" in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        assert not list((tmp_path / "repo" / "snapshots").glob("*"))
        assert machine.state() == {"jobs": [], "nodes": [], "exports": []}
        assert [b["name"] for b in machine.bitmaps("bad")] == []
    finally:
        machine.kill()


def test_unreachable_qmp_socket_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "vmrepo.toml").write_text(
        f'repository = "repo"\n[vm.vm1]\nsource = "qmp"\nsocket = "{tmp_path}/nope.sock"\n')
    run_cli("init", cwd=tmp_path)
    res = run_cli("snapshot", "vm1", cwd=tmp_path, check=False)
    assert res.returncode == exitcodes.SOURCE
    assert "cannot connect to QMP" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_qmp_over_tcp(tmp_path: Path) -> None:
    from .test_nbd_client import free_port

    port = free_port()
    machine = QemuVM(tmp_path, {"disk0": 16 * MiB},
                     extra_args=["-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"])
    machine.start()
    try:
        machine.write("disk0", "write -P 4 0 1M")
        (tmp_path / "vmrepo.toml").write_text(
            f'repository = "repo"\n[vm.vm1]\nsource = "qmp"\nsocket = "127.0.0.1:{port}"\n')
        run_cli("init", cwd=tmp_path)
        doc = run_json("snapshot", "vm1", cwd=tmp_path)
        assert [d["name"] for d in doc["disks"]] == ["disk0"]
        assert doc["source"]["info"]["qmp"] == f"127.0.0.1:{port}"
        ref = machine.reference("disk0", tmp_path / "ref.raw")
        out = tmp_path / "out.raw"
        run_cli("restore", "vm1@latest", "--disk", "disk0", "-o", str(out), cwd=tmp_path)
        assert subprocess.run(["cmp", str(out), str(ref)]).returncode == 0
    finally:
        machine.kill()


def test_byte_count_mismatch_fails_the_disk() -> None:
    """The cross-check: QEMU must send exactly what the bitmap counted."""
    from vmrepo.sources.push import PushDisk
    from vmrepo.sources.qemu.bitmaps import Plan
    from vmrepo.sources.qemu.control import Node
    from vmrepo.sources.qemu.pushexport import PushExport

    export = PushExport("d0", 4 * MiB)
    disk = PushDisk(source=Node("disk0", "disk0", 4 * MiB, []),
                    plan=Plan("changes", "test", "bm", "s" * 64), index=0, new_bitmap="n",
                    temp_bitmap="t", export=export, expected=2 * CHUNK)
    export.pwrite(0, b"x" * CHUNK)
    export.end()
    got = []
    with pytest.raises(SourceError, match="QEMU sent 262144 bytes, the bitmap promised 524288"):
        for ext in disk.extents():
            got.append(ext)
    assert [e.offset for e in got] == [0]


def test_waiting_zeroes_join_in_any_order_and_data_keeps_its_order() -> None:
    from vmrepo.sources.qemu.pushexport import PushExport

    export = PushExport("d0", 16 * MiB)
    export.write_zeroes(MiB, MiB)
    export.pwrite(8 * MiB, b"a" * 4096)
    export.write_zeroes(3 * MiB, MiB)
    export.write_zeroes(0, MiB)  # before the first run: joins it
    export.pwrite(9 * MiB, b"b" * 4096)
    export.write_zeroes(4 * MiB, 2 * MiB)  # after the second run: joins it
    export.write_zeroes(2 * MiB, MiB)  # between the two: all one run now
    export.write_zeroes(7 * MiB, MiB)  # a gap before it: a run of its own
    export.end()
    got = [(e.offset, e.length, e.data) for e in export.extents()]
    assert got == [(0, 6 * MiB, None), (7 * MiB, MiB, None), (8 * MiB, 4096, b"a" * 4096),
                   (9 * MiB, 4096, b"b" * 4096)]
    assert export.requests == 8 and export.bytes_received == 7 * MiB + 8192


def _assemble(export: Any, size: int) -> None:
    """Take every extent of ``export`` into a chunk assembler, as a snapshot does."""
    from vmrepo.chunker import ChunkAssembler

    export.end()
    asm = ChunkAssembler(size, CHUNK, lambda i, d: None, lambda a, b: None)
    for e in export.extents():
        asm.add(e.offset, e.length, e.data)
    asm.finish(None)


@pytest.mark.parametrize("requests", [
    [("data", 0, CHUNK), ("zero", 0, CHUNK)],  # zeroes after data: taken before it
    [("zero", 0, 2 * MiB), ("zero", 0, MiB)],  # the same start, shorter
    [("zero", MiB, MiB), ("zero", 0, 2 * MiB)],  # the same end, longer
    [("zero", 0, 2 * MiB), ("zero", MiB, 2 * MiB)],  # partly over a waiting run
    [("zero", 10 * MiB, MiB), ("zero", 10 * MiB, 2 * MiB), ("zero", 8 * MiB, 2 * MiB),
     ("zero", 11 * MiB, MiB // 2)],  # once left a stale entry, then failed with EIO
])
def test_overlapping_requests_fail_the_disk_whatever_their_order(
        requests: list[tuple[str, int, int]]) -> None:
    from vmrepo.errors import ExtentError
    from vmrepo.sources.qemu.pushexport import PushExport

    export = PushExport("d0", 16 * MiB)
    for kind, offset, length in requests:
        if kind == "data":
            export.pwrite(offset, b"a" * length)
        else:
            export.write_zeroes(offset, length)
    assert export.requests == len(requests)
    with pytest.raises(ExtentError, match="overlapping extent"):
        _assemble(export, 16 * MiB)


def test_overlapping_writes_of_a_real_client_are_refused(tmp_path: Path) -> None:
    """qemu-io writes a chunk, then zeroes over it: the snapshot must not keep the data."""
    from vmrepo.errors import ExtentError
    from vmrepo.sources.nbd.server import NbdServer
    from vmrepo.sources.qemu.pushexport import PushExport

    export = PushExport("d0", 4 * CHUNK)
    server = NbdServer(str(tmp_path / "push.sock"), {"d0": export})
    server.start()
    try:
        res = subprocess.run(["qemu-io", "-f", "raw", f"nbd+unix:///d0?socket={server.path}",
                              "-c", f"write -P 0xaa 0 {CHUNK}", "-c", f"write -z 0 {CHUNK}"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        server.stop()
    assert export.bytes_received == 2 * CHUNK
    with pytest.raises(ExtentError, match="overlapping extent 0\\+262144"):
        _assemble(export, 4 * CHUNK)


def test_device_ids_name_disks(tmp_path: Path) -> None:
    """Disks configured by device id (as libvirt names them) resolve to their qcow2 nodes."""
    machine = QemuVM(tmp_path, {}, extra_args=["-M", "q35", "-S", "-blockdev",
                                               "driver=file,node-name=f0,filename="
                                               f"{tmp_path}/d.qcow2", "-blockdev",
                                               "driver=qcow2,node-name=disk0,file=f0",
                                               "-device", "virtio-blk-pci,drive=disk0,id=vda"])
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "d.qcow2"),
                    "16M"], check=True)
    machine.start()
    try:
        dev = "-d /machine/peripheral/vda/virtio-backend"
        machine.cmd("human-monitor-command",
                    {"command-line": f'qemu-io {dev} "write -P 6 1M 64k"'})
        (tmp_path / "vmrepo.toml").write_text(
            f'repository = "repo"\n[vm.vm1]\nsource = "qmp"\nsocket = "{machine.qmp_path}"\n'
            'disks = ["vda"]\n')
        run_cli("init", cwd=tmp_path)
        first = run_json("snapshot", "vm1", cwd=tmp_path)
        assert [(d["name"], d["source"]["node"]) for d in first["disks"]] == [("vda", "disk0")]
        machine.cmd("human-monitor-command",
                    {"command-line": f'qemu-io {dev} "write -P 7 2M 4k"'})
        second = run_json("snapshot", "vm1", cwd=tmp_path)
        assert second["disks"][0]["taken"] == "incremental"
        assert second["disks"][0]["stats"]["chunks"] == 1
        (tmp_path / "vmrepo.toml").write_text(
            f'repository = "repo"\n[vm.vm1]\nsource = "qmp"\nsocket = "{machine.qmp_path}"\n'
            'disks = ["vdb"]\n')
        res = run_cli("snapshot", "vm1", cwd=tmp_path, check=False)
        assert res.returncode == exitcodes.SOURCE
        assert "disk vdb: no block node or device of that name" in res.stderr
    finally:
        machine.kill()
