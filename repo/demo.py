"""The built-in example behind ``make demo``: back up a running QEMU VM twice and prove it.

Starts QEMU (no guest OS: ``-M none``) with two qcow2 disks on private QMP
sockets in a fresh work directory, writes data into the disks through QEMU
(HMP ``qemu-io``, as a guest would), then runs the real ``vmrepo`` command as
a user would: init, a full snapshot, more guest writes, an incremental
snapshot, and a restore of each. Every restore is compared with a reference
copy of the disks taken while the VM was paused at that point. QEMU is
stopped by PID whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from .units import human_bytes, ratio

MiB = 1 << 20
DISKS = {"disk0": 1024 * MiB, "disk1": 256 * MiB}
_TEXT = bytes(b" etaoinshrdlucmfwypvbgkqjxz\n"[i % 28] for i in range(256))


class DemoVM:
    """A QEMU process with one QMP socket for vmrepo and one for the demo."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.qmp_path = work / "vm1.qmp"
        self.proc: subprocess.Popen[bytes] | None = None
        self.monitor: QEMUMonitorProtocol | None = None

    def start(self) -> None:
        own = self.work / "demo.qmp"
        for name, size in DISKS.items():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                            str(self.work / f"{name}.qcow2"), str(size)], check=True)
        with open(self.work / "qemu.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
                 "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                 "-qmp", f"unix:{own},server=on,wait=off"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while not own.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("demo: QEMU did not start (see qemu.log)")
            time.sleep(0.05)
        while True:  # the socket file appears at bind(), a moment before listen()
            try:
                self.monitor = QEMUMonitorProtocol(str(own))
                self.monitor.connect()
                break
            except (OSError, QMPError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit("demo: cannot connect to QEMU's monitor (see qemu.log)")
                time.sleep(0.05)
        for name in DISKS:
            self.cmd("blockdev-add", {"driver": "qcow2", "node-name": name, "file": {
                "driver": "file", "filename": str(self.work / f"{name}.qcow2")}})

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        assert self.monitor is not None
        reply = self.monitor.cmd_raw(name, args)
        if "error" in reply:
            sys.exit(f"demo: QEMU refused {name}: {reply['error'].get('desc')}")
        return reply["return"]

    def guest_write(self, disk: str, command: str) -> None:
        out = self.cmd("human-monitor-command", {"command-line": f'qemu-io {disk} "{command}"'})
        if "error" in out.lower() or "failed" in out.lower():
            sys.exit(f"demo: guest write failed: {out.strip()}")

    def write_bytes(self, disk: str, offset: int, data: bytes) -> None:
        src = self.work / "payload.bin"
        src.write_bytes(data)
        self.guest_write(disk, f"write -s {src} {offset} {len(data)}")
        src.unlink()

    def reference(self, disk: str, dest: Path) -> Path:
        """The disk as it is now, copied while the VM is paused."""
        self.cmd("stop")
        try:
            self.guest_write(disk, "flush")
            subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw",
                            str(self.work / f"{disk}.qcow2"), str(dest)], check=True)
        finally:
            self.cmd("cont")
        return dest

    def stop(self) -> None:
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                self.monitor.cmd_raw("quit")
            with contextlib.suppress(Exception):
                self.monitor.close()
        if self.proc is not None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def vmrepo(work: Path, *args: str) -> Any:
    exe = Path(sys.executable).parent / "vmrepo"
    # The demo repository is encrypted (the default); its passphrase is in a file.
    env = {**os.environ, "VMREPO_PASSWORD_FILE": str(work / "passphrase")}
    res = subprocess.run([str(exe), *args, "--json"], cwd=work, capture_output=True, text=True,
                         env=env)
    if res.returncode != 0:
        sys.exit(f"demo: vmrepo {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return json.loads(res.stdout)


def fill(vm: DemoVM, rnd: random.Random) -> None:
    """Random data, text-like data and repeated blocks; the rest stays unallocated."""
    for i in range(12):  # 192 MiB random
        vm.write_bytes("disk0", i * 16 * MiB, rnd.randbytes(16 * MiB))
    for i in range(8):   # 128 MiB text-like
        vm.write_bytes("disk0", 512 * MiB + i * 16 * MiB, rnd.randbytes(16 * MiB).translate(_TEXT))
    block = rnd.randbytes(MiB)
    for i in range(32):  # 32 MiB of one repeated MiB
        vm.write_bytes("disk1", i * 4 * MiB, block)


def change(vm: DemoVM, rnd: random.Random) -> int:
    """4 KiB guest writes into 1% of disk0's 64 KiB blocks, and a zeroed region."""
    blocks = rnd.sample(range(DISKS["disk0"] // 65536), DISKS["disk0"] // 65536 // 100)
    for b in blocks:
        vm.guest_write("disk0", f"write -P {rnd.randrange(1, 255)} {b * 65536} 4k")
    vm.guest_write("disk1", "write -z 0 8M")
    return len(blocks)


def main() -> None:
    if not shutil.which("qemu-system-x86_64"):
        sys.exit("demo: qemu-system-x86_64 is missing (make demo installs it)")
    work = Path(tempfile.mkdtemp(prefix="vmrepo-demo-"))
    vm = DemoVM(work)
    try:
        vm.start()
        run(work, vm)
    finally:
        vm.stop()
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, vm: DemoVM) -> None:
    rnd = random.Random(2024)
    (work / "vmrepo.toml").write_text(
        f'repository = "repo"\n[vm.vm1]\nsource = "qmp"\nsocket = "{vm.qmp_path}"\n')
    print(f"demo: QEMU pid {vm.proc.pid if vm.proc else '?'} with disks "
          + ", ".join(f"{n} ({human_bytes(s)} qcow2)" for n, s in DISKS.items()))
    fill(vm, rnd)
    print("demo: guest wrote 192 MiB random, 128 MiB text-like and 32 MiB repeated data")
    (work / "passphrase").write_text(f"demo {rnd.randbytes(12).hex()}\n")
    os.chmod(work / "passphrase", 0o600)
    created = vmrepo(work, "init")
    print(f"demo: created repository {created['id'][:8]} (encryption {created['encryption']}, "
          "passphrase in a file named by VMREPO_PASSWORD_FILE)")
    snaps, refs = [], []
    for step in ("full", "incremental"):
        if step == "incremental":
            n = change(vm, rnd)
            print(f"demo: guest made {n} writes of 4 KiB and zeroed 8 MiB")
        t = time.monotonic()
        snap = vmrepo(work, "snapshot", "vm1", "--tag", "demo")
        elapsed = time.monotonic() - t
        snaps.append(snap)
        refs.append({d: vm.reference(d, work / f"ref-{step}-{d}.raw") for d in DISKS})
        tot = snap["totals"]
        added = tot["bytes_stored"] + tot["bytes_manifest"]
        taken = ", ".join(f"{d['name']} {d['taken']}" for d in snap["disks"])
        print(f"demo: snapshot {snap['id'][:8]} ({taken}) in {elapsed:.2f} s: QEMU sent "
              f"{human_bytes(tot['bytes_data'])} of data + {human_bytes(tot['bytes_zero'])} of "
              f"zeros; {tot['chunks_new']} new chunks, {human_bytes(added)} added "
              f"(ratio {ratio(tot['bytes_data'], added)})")
    ok = True
    for snap, ref in zip(snaps, refs, strict=True):
        out = work / f"restore-{snap['id'][:8]}"
        out.mkdir()
        t = time.monotonic()
        vmrepo(work, "restore", f"vm1@{snap['id'][:8]}", "-o", str(out))
        elapsed = time.monotonic() - t
        for disk, path in ref.items():
            res = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw",
                                  str(out / f"{disk}.raw"), str(path)])
            ok &= res.returncode == 0
            print(f"demo: restored {snap['id'][:8]} {disk} in {elapsed:.2f} s: "
                  f"{'identical' if res.returncode == 0 else 'DIFFERS'} to the paused VM's disk")
    repo_size = sum(p.stat().st_size for p in (work / "repo").rglob("*") if p.is_file())
    print(f"demo: repository holds {human_bytes(repo_size)} for two snapshots of "
          f"{human_bytes(sum(DISKS.values()))} of disks")
    if not ok:
        sys.exit("demo: a restore differs from its reference")
    print("demo: OK")


if __name__ == "__main__":
    main()
