"""A private libvirt daemon for tests, and TCG domains without a guest OS on it.

As root, ``libvirtd`` always runs in system mode with the host's configuration. The tests
instead start it inside a user namespace that maps root to an unprivileged user, where it
runs as a *session* daemon whose XDG directories (configuration, runtime sockets, cache,
data) all lie under a temporary directory; ``qemu.conf`` there sets
``stdio_handler = "file"`` so that no virtlogd is spawned. Clients reach it with
``qemu:///session?socket=...``. Nothing of the host's libvirt setup is read or changed.

:meth:`Libvirtd.stop` destroys the domains it started (QEMU outlives a stopped daemon),
kills any QEMU still named by the daemon's PID files, then stops the daemon, all by PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

MiB = 1 << 20


def skip_reason() -> str | None:
    """Why this machine cannot run a private libvirt daemon with QEMU (None if it can)."""
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "the libvirt Python binding is missing (pip install -e '.[test]')"
    for tool in ("libvirtd", "qemu-system-x86_64", "qemu-img", "unshare"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} is not installed (make test installs it)"
    res = subprocess.run(["unshare", "--map-user=65534", "--map-group=65534", "--", "true"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot create a user namespace here: {res.stderr.strip()}"
    return None


def _libvirtd() -> str:
    return shutil.which("libvirtd") or "/usr/sbin/libvirtd"


class Libvirtd:
    """A session-mode libvirtd under a private directory, stopped by PID."""

    def __init__(self) -> None:
        # Short: QEMU's monitor socket lands several levels below it.
        self.base = Path(tempfile.mkdtemp(prefix="vmlv-"))
        self.env = {**os.environ, "HOME": str(self.base)}
        for var, sub in (("XDG_CONFIG_HOME", "c"), ("XDG_RUNTIME_DIR", "r"),
                         ("XDG_CACHE_HOME", "k"), ("XDG_DATA_HOME", "d")):
            (self.base / sub).mkdir(mode=0o700)
            self.env[var] = str(self.base / sub)
        (self.base / "c" / "libvirt").mkdir()
        (self.base / "c" / "libvirt" / "qemu.conf").write_text('stdio_handler = "file"\n')
        self.socket = self.base / "r" / "libvirt" / "libvirt-sock"
        self.uri = f"qemu:///session?socket={self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._conn: Any = None

    def start(self) -> Libvirtd:
        try:
            with open(self.base / "libvirtd.log", "ab") as log:
                # unshare execs libvirtd: the PID is the daemon's.
                self.proc = subprocess.Popen(
                    ["unshare", "--map-user=65534", "--map-group=65534", "--", _libvirtd()],
                    env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            deadline = time.monotonic() + 30
            while not self.socket.exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"libvirtd did not start: {self.log()}")
                time.sleep(0.05)
            self.conn()  # the first connection probes QEMU's capabilities (seconds)
        except BaseException:
            self.stop()
            raise
        return self

    def log(self) -> str:
        p = self.base / "libvirtd.log"
        return p.read_text(errors="replace")[-3000:] if p.exists() else ""

    def conn(self) -> Any:
        import libvirt

        if self._conn is None:
            libvirt.registerErrorHandler(lambda _c, _e: None, None)
            self._conn = libvirt.open(self.uri)
        return self._conn

    def qemu_pids(self) -> list[int]:
        pids = []
        for f in (self.base / "r" / "libvirt" / "qemu" / "run").glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pids.append(int(f.read_text().strip()))
        return pids

    def stop(self) -> None:
        """Destroy the domains, kill leftover QEMUs, stop the daemon; all by PID."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                for dom in self._conn.listAllDomains(0):
                    if dom.isActive():
                        dom.destroy()
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        for pid in self.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        shutil.rmtree(self.base, ignore_errors=True)


def domain_xml(name: str, disks: dict[str, Path]) -> str:
    """A TCG domain with virtio disks (targets as given) and no OS: it sits in its BIOS."""
    devs = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{path}'/><target dev='{target}' bus='virtio'/></disk>"
        for target, path in disks.items())
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
            "<vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os>"
            "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
            f"{devs}<controller type='usb' model='none'/><memballoon model='none'/>"
            "</devices></domain>")


class Domain:
    """A defined domain with qcow2 disks in ``workdir``; guest writes through the monitor."""

    def __init__(self, daemon: Libvirtd, workdir: Path, name: str,
                 sizes: dict[str, int]) -> None:
        self.daemon, self.workdir, self.name = daemon, workdir, name
        self.disks = {t: workdir / f"{name}-{t}.qcow2" for t in sizes}
        for t, size in sizes.items():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.disks[t]),
                            str(size)], check=True)
        self.dom = daemon.conn().defineXML(domain_xml(name, self.disks))

    def start(self) -> None:
        self.dom.create()

    def shutdown(self) -> None:
        """Stop QEMU with SIGTERM (``destroy`` tries that first): bitmaps are stored."""
        self.dom.destroy()

    def qemu_pid(self) -> int:
        path = self.daemon.base / "r" / "libvirt" / "qemu" / "run" / f"{self.name}.pid"
        return int(path.read_text().strip())

    def hmp(self, command: str) -> str:
        import libvirt_qemu

        return str(libvirt_qemu.qemuMonitorCommand(
            self.dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP))

    def write(self, target: str, qemu_io: str) -> None:
        """A guest write through the disk's device (libvirt's alias virtio-diskN)."""
        index = sorted(self.disks).index(target)
        out = self.hmp(f'qemu-io -d /machine/peripheral/virtio-disk{index}/virtio-backend '
                       f'"{qemu_io}"')
        if "error" in out.lower() or "failed" in out.lower():
            raise RuntimeError(f"qemu-io {target} {qemu_io}: {out}")

    def reference(self, target: str, dest: Path) -> Path:
        """The disk's content now, as a raw file; a running domain is paused meanwhile."""
        running = bool(self.dom.isActive())
        if running:
            self.dom.suspend()
            self.write(target, "flush")
        try:
            subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw",
                            str(self.disks[target]), str(dest)], check=True)
        finally:
            if running:
                self.dom.resume()
        return dest

    def checkpoints(self) -> list[str]:
        return sorted(cp.getName() for cp in self.dom.listAllCheckpoints(0))

    def dirty(self, checkpoint: str) -> dict[str, int]:
        """Dirty bytes per disk that libvirt counts in a checkpoint's bitmaps."""
        import libvirt

        xml = self.dom.checkpointLookupByName(checkpoint).getXMLDesc(
            libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE | libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
        return {str(d.get("name")): int(d.get("size", -1))
                for d in ET.fromstring(xml).iterfind("disks/disk")}

    def has_job(self) -> bool:
        import libvirt

        try:
            self.dom.backupGetXMLDesc(0)
            return True
        except libvirt.libvirtError:
            return False

    def remove(self) -> None:
        with contextlib.suppress(Exception):
            if self.dom.isActive():
                self.dom.destroy()
        with contextlib.suppress(Exception):
            for cp in self.dom.listAllCheckpoints(0):
                cp.delete(2)  # metadata only: the domain is undefined next
            self.dom.undefine()


def require() -> None:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
