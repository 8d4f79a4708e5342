"""The libvirt source against a real (private) libvirt daemon and real TCG domains.

Every snapshot is restored through the CLI and compared byte for byte with a copy of the
disks taken while the domain was paused (or shut off) at that moment.
"""

from __future__ import annotations

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
from vmrepo.repository import Repository
from vmrepo.sources.libvirtctl import stop_leftover_servers
from vmrepo.storage.local import LocalBackend

from .helpers import run_cli, run_json, signal_when, vmrepo_bin
from .libvirtd import Domain, Libvirtd, MiB, require

GRANULE = 64 << 10  # libvirt's bitmaps: QEMU's default granularity


@pytest.fixture(scope="module")
def daemon() -> Iterator[Libvirtd]:
    require()
    d = Libvirtd().start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def web(daemon: Libvirtd, tmp_path: Path) -> Iterator[Domain]:
    dom = Domain(daemon, tmp_path, f"web{random.randrange(1 << 30)}",
                 {"vda": 64 * MiB, "vdb": 32 * MiB})
    dom.start()
    configure(dom)
    run_cli("init", "--chunk-size", "64K", "--pack-size", "1M", cwd=tmp_path)
    try:
        yield dom
    finally:
        dom.remove()


def configure(dom: Domain, extra: str = "") -> None:
    (dom.workdir / "vmrepo.toml").write_text(
        f'repository = "repo"\n[vm.web]\nsource = "libvirt"\ndomain = "{dom.name}"\n'
        f'uri = "{dom.daemon.uri}"\n{extra}')


def repo_id(dom: Domain) -> str:
    return Repository.open(LocalBackend(dom.workdir / "repo")).config.repository_id


def checkpoint(dom: Domain, snap: dict[str, Any]) -> str:
    return f"vmrepo-{repo_id(dom)[:16]}-{snap['id'][:32]}"


Writes = dict[str, list[tuple[int, int]]]


def guest_writes(dom: Domain, writes: Writes, seed: int) -> None:
    """Random data (or zeros, for an odd seed's last write) at scattered places."""
    rnd = random.Random(seed)
    for target, ranges in writes.items():
        for i, (off, n) in enumerate(ranges):
            if seed % 2 and i == len(ranges) - 1:
                dom.write(target, f"write -z {off} {n}")
                continue
            src = dom.workdir / f"rnd-{seed}-{target}-{i}"
            src.write_bytes(rnd.randbytes(n))
            dom.write(target, f"write -s {src} {off} {n}")


def dirty_bytes(*batches: Writes) -> dict[str, int]:
    """Bytes of the 64 KiB granules the writes touched, per disk."""
    out: dict[str, set[int]] = {}
    for batch in batches:
        for target, ranges in batch.items():
            for off, n in ranges:
                out.setdefault(target, set()).update(
                    range(off // GRANULE, (off + n - 1) // GRANULE + 1))
    return {t: len(g) * GRANULE for t, g in out.items()}


def references(dom: Domain, tag: str) -> dict[str, Path]:
    return {t: dom.reference(t, dom.workdir / f"ref-{tag}-{t}.raw") for t in dom.disks}


def assert_restores(dom: Domain, snap: dict[str, Any], refs: dict[str, Path]) -> None:
    for target, ref in refs.items():
        out = dom.workdir / f"out-{snap['id'][:8]}-{target}.raw"
        run_cli("restore", f"web@{snap['id'][:8]}", "--disk", target, "-o", str(out),
                cwd=dom.workdir)
        assert out.read_bytes() == ref.read_bytes(), f"{target} of {snap['id'][:8]}"


def taken(snap: dict[str, Any]) -> dict[str, str]:
    return {d["name"]: d["taken"] for d in snap["disks"]}


def read_bytes(snap: dict[str, Any]) -> dict[str, int]:
    return {d["name"]: d["stats"]["bytes_data"] + d["stats"]["bytes_zero"] for d in snap["disks"]}


def assert_no_leftovers(dom: Domain) -> None:
    assert not dom.has_job()
    repo8 = repo_id(dom)[:8]
    assert not list(Path(tempfile.gettempdir()).glob(f"vmrepo-lv*-{repo8}-*"))


def test_running_domain_full_incrementals_differential(web: Domain) -> None:
    # A checkpoint made by another tool: vmrepo never touches it.
    web.dom.checkpointCreateXML("<domaincheckpoint><name>other-tool</name></domaincheckpoint>")
    img = web.workdir / "img.raw"
    img.write_bytes(random.Random(9).randbytes(MiB))
    with open(web.workdir / "vmrepo.toml", "a") as f:
        f.write(f'[vm.img]\nsource = "file"\ndisks = {{ disk0 = "{img}" }}\n')
    guest_writes(web, {"vda": [(0, 3 * MiB)], "vdb": [(5 * MiB, MiB)]}, 2)
    every = run_json("snapshot", "--all", cwd=web.workdir)
    assert not every["failed"] and {s["vm"] for s in every["snapshots"]} == {"web", "img"}
    full = next(s for s in every["snapshots"] if s["vm"] == "web")
    assert taken(full) == {"vda": "full", "vdb": "full"}
    assert read_bytes(full)["vda"] == 64 * MiB  # unallocated areas come as zeros
    assert full["disks"][0]["stats"]["bytes_data"] == 3 * MiB
    snaps = [(full, references(web, "full"))]
    batches: list[Writes] = [
        {"vda": [(10 * MiB + 4096, 100_000), (40 * MiB, GRANULE), (20 * MiB, 128 << 10)],
         "vdb": [(MiB + 512, 1000)]},
        {"vda": [(10 * MiB, 4096), (63 * MiB, MiB)], "vdb": [(30 * MiB, 300_000)]},
        {"vda": [(33 * MiB + 1, 70_000)], "vdb": [(0, 4096), (2 * MiB, 8192)]},
    ]
    for i, batch in enumerate(batches[:2]):
        guest_writes(web, batch, 3 + i)
        inc = run_json("snapshot", "web", cwd=web.workdir)
        assert taken(inc) == {"vda": "incremental", "vdb": "incremental"}, inc["disks"]
        assert read_bytes(inc) == dirty_bytes(batch)  # only the written regions
        snaps.append((inc, references(web, f"inc{i}")))
        assert web.checkpoints() == sorted(
            ["other-tool", checkpoint(web, full), checkpoint(web, inc)])
    guest_writes(web, batches[2], 6)
    diff = run_json("snapshot", "web", "--differential", cwd=web.workdir)
    assert taken(diff) == {"vda": "differential", "vdb": "differential"}
    assert read_bytes(diff) == dirty_bytes(*batches)
    snaps.append((diff, references(web, "diff")))
    assert web.checkpoints() == sorted(["other-tool", checkpoint(web, full),
                                        checkpoint(web, diff)])
    for snap, refs in snaps:
        assert_restores(web, snap, refs)
    assert_no_leftovers(web)
    listed = run_json("bitmaps", "web", cwd=web.workdir)["bitmaps"]
    assert sorted({b["name"] for b in listed}) == sorted([checkpoint(web, full),
                                                          checkpoint(web, diff)])
    run_json("bitmaps", "web", "--remove", cwd=web.workdir)
    assert web.checkpoints() == ["other-tool"]


def test_signals_mid_snapshot_then_next_one_loses_nothing(web: Domain) -> None:
    full = run_json("snapshot", "web", cwd=web.workdir)
    guest_writes(web, {"vda": [(0, 48 * MiB)], "vdb": [(0, 24 * MiB)]}, 10)
    # SIGTERM: vmrepo rolls back itself: no job, no scratch file, no new checkpoint.
    code, err = signal_when(["snapshot", "web"], web.workdir, web.has_job, signal.SIGTERM)
    assert code == exitcodes.INTERRUPTED, err
    assert_no_leftovers(web)
    assert web.checkpoints() == [checkpoint(web, full)]
    # Deleting the rolled-back checkpoint lost no bit: the full's bitmap kept recording.
    assert web.dirty(checkpoint(web, full)) == {"vda": 48 * MiB, "vdb": 24 * MiB}
    # SIGKILL: nothing runs in vmrepo any more; the next snapshot tidies up.
    proc = subprocess.Popen([vmrepo_bin(), "snapshot", "web"], cwd=web.workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not web.has_job() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the snapshot ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    # The killed run left its job, its scratch files and an uncommitted checkpoint.
    assert web.has_job() and len(web.checkpoints()) == 2
    guest_writes(web, {"vda": [(50 * MiB, 100_000)], "vdb": [(31 * MiB, 4096)]}, 12)
    nxt = run_json("snapshot", "web", cwd=web.workdir)
    assert taken(nxt) == {"vda": "incremental", "vdb": "incremental"}
    cleaned = nxt["source"]["info"]["cleaned_up"]
    assert any(c.startswith("backup job") for c in cleaned) and any(
        c.startswith("checkpoint vmrepo-") for c in cleaned), cleaned
    assert_restores(web, nxt, references(web, "next"))
    assert web.checkpoints() == sorted([checkpoint(web, full), checkpoint(web, nxt)])
    assert_no_leftovers(web)


def test_shut_off_domain_then_crash_fallbacks(web: Domain) -> None:
    guest_writes(web, {"vda": [(0, 2 * MiB)], "vdb": [(MiB, MiB)]}, 20)
    full = run_json("snapshot", "web", cwd=web.workdir)
    running: Writes = {"vda": [(5 * MiB, 4096)], "vdb": [(7 * MiB, 70_000)]}
    guest_writes(web, running, 22)
    web.shutdown()  # QEMU stops cleanly: the checkpoints' bitmaps stay in the qcow2 files
    src = web.workdir / "offline-data"
    src.write_bytes(random.Random(5).randbytes(200_000))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {src} 9M 200000",
                    str(web.disks["vda"])], check=True, capture_output=True)
    off = run_json("snapshot", "web", cwd=web.workdir)
    assert off["source"]["info"]["state"] == "shut off"
    assert taken(off) == {"vda": "incremental", "vdb": "incremental"}, off["disks"]
    assert read_bytes(off) == dirty_bytes(running, {"vda": [(9 * MiB, 200_000)]})
    assert_restores(web, off, references(web, "off"))
    assert web.checkpoints() == [checkpoint(web, full)]  # libvirt makes none offline
    web.start()
    later: Writes = {"vda": [(60 * MiB, 4096)]}
    guest_writes(web, later, 24)
    back = run_json("snapshot", "web", cwd=web.workdir)
    # Changes since the offline snapshot, from the older checkpoint that kept recording.
    assert taken(back) == {"vda": "incremental", "vdb": "incremental"}, back["disks"]
    assert read_bytes(back) == dirty_bytes(running, later, {"vda": [(9 * MiB, 200_000)]})
    assert_restores(web, back, references(web, "back"))
    assert web.checkpoints() == sorted([checkpoint(web, full), checkpoint(web, back)])
    # QEMU killed: the bitmaps come back inconsistent; both kinds of read fall back to full.
    guest_writes(web, {"vdb": [(3 * MiB, 4096)]}, 26)
    os.kill(web.qemu_pid(), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while web.dom.isActive() and time.monotonic() < deadline:
        time.sleep(0.05)
    res = run_cli("snapshot", "web", "--json", cwd=web.workdir)
    crashed = json.loads(res.stdout)
    assert taken(crashed) == {"vda": "full", "vdb": "full"}
    # The checkpoint made in QEMU's last run is gone, the older one is inconsistent.
    assert all("has no bitmap in the image" in d["reason"] and "inconsistent" in d["reason"]
               for d in crashed["disks"]), crashed["disks"]
    assert "warning: disk vda: full instead of incremental" in res.stderr
    assert_restores(web, crashed, references(web, "crashed"))
    # Listed as what they are, not as merely disabled.
    listing = run_cli("bitmaps", "web", cwd=web.workdir).stdout
    assert "has no bitmap in the image" in listing and "disabled" not in listing, listing
    web.start()
    again = run_json("snapshot", "web", cwd=web.workdir)
    assert taken(again) == {"vda": "full", "vdb": "full"}
    assert all("checkpoint" in d["reason"] for d in again["disks"]), again["disks"]
    assert_restores(web, again, references(web, "again"))
    assert web.checkpoints() == [checkpoint(web, again)]
    assert_no_leftovers(web)


def test_libvirt_errors_in_one_line(web: Domain) -> None:
    (web.workdir / "vmrepo.toml").write_text(
        f'repository = "repo"\n[vm.web]\nsource = "libvirt"\ndomain = "no-such-domain"\n'
        f'uri = "{web.daemon.uri}"\n')
    res = run_cli("snapshot", "web", cwd=web.workdir, check=False)
    assert res.returncode == exitcodes.SOURCE
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "no-such-domain" in res.stderr and "libvirt" in res.stderr


def test_missing_binding_says_how_to_install(tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "libvirt.py").write_text("raise ImportError('no libvirt here')\n")
    (tmp_path / "vmrepo.toml").write_text('repository = "repo"\n[vm.web]\nsource = "libvirt"\n')
    run_cli("init", cwd=tmp_path)
    res = run_cli("snapshot", "web", cwd=tmp_path, check=False,
                  env={"PYTHONPATH": str(fake)})
    assert res.returncode == exitcodes.CONFIG, res.stderr
    assert "pip install 'vmrepo[libvirt]'" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_a_killed_runs_qemu_nbd_is_stopped_by_its_pid_file(tmp_path: Path) -> None:
    """A shut-off domain's images are served by qemu-nbd, which would outlive a killed
    vmrepo and hold the images' locks; the next run stops it through its pid file."""
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    left = tmp_path / "left"
    left.mkdir()
    pid_file = left / "vda.pid"
    proc = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", f"--pid-file={pid_file}",
                             f"--socket={left / 'nbd.sock'}", "--persistent", str(img)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        (left / "other.pid").write_text(f"{os.getpid()}\n")  # not a qemu-nbd: left alone
        stop_leftover_servers(str(left))
        assert proc.wait(10) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
