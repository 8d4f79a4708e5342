"""A real QEMU process for tests: started on a private QMP socket, stopped by PID.

No guest OS: ``-M none`` with qcow2 disks added through ``blockdev-add``; guest
writes are simulated with HMP ``qemu-io``. ``reference()`` pauses the VM,
flushes and copies a disk's content at that instant for comparisons.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from vmrepo.sources.qemu.qmp import QmpConnection, QmpDisconnected


class QemuVM:
    def __init__(self, workdir: Path, disks: dict[str, int] | None = None,
                 name: str = "vm", extra_args: list[str] | None = None) -> None:
        self.workdir = workdir
        self.extra_args = extra_args or []
        self.name = name
        self.qmp_path = workdir / f"{name}.qmp"  # for vmrepo
        self.test_qmp_path = workdir / f"{name}-test.qmp"  # for the test itself
        self.disks: dict[str, Path] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QmpConnection | None = None
        for disk, size in (disks or {}).items():
            path = workdir / f"{name}-{disk}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                           check=True)
            self.disks[disk] = path

    def start(self) -> QemuVM:
        """Start QEMU; if it does not come up, it is stopped again (by PID) before raising."""
        try:
            return self._start()
        except BaseException:
            self.kill()
            raise

    def _start(self) -> QemuVM:
        for path in (self.qmp_path, self.test_qmp_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with open(self.workdir / f"{self.name}.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
                 "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                 "-qmp", f"unix:{self.test_qmp_path},server=on,wait=off", *self.extra_args],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while not (self.qmp_path.exists() and self.test_qmp_path.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not start: {self.log()}")
            time.sleep(0.02)
        while True:  # the socket file appears at bind(), a moment before listen()
            try:
                self.qmp = QmpConnection(str(self.test_qmp_path))
                break
            except QmpDisconnected:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        for disk, path in self.disks.items():
            self.cmd("blockdev-add", {"driver": "qcow2", "node-name": disk,
                                      "file": {"driver": "file", "filename": str(path)}})
        return self

    def log(self) -> str:
        p = self.workdir / f"{self.name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def cmd(self, command: str, args: dict[str, Any] | None = None) -> Any:
        assert self.qmp is not None
        return self.qmp.execute(command, args)

    def write(self, disk: str, qemu_io_cmd: str) -> None:
        """Guest-like write through the disk node (or the backup filter above it)."""
        out = self.cmd("human-monitor-command",
                       {"command-line": f'qemu-io {disk} "{qemu_io_cmd}"'})
        if out and ("error" in out.lower() or "failed" in out.lower()):
            raise RuntimeError(f"qemu-io {disk} {qemu_io_cmd}: {out}")

    def bitmaps(self, disk: str) -> list[dict[str, Any]]:
        for node in self.cmd("query-named-block-nodes", {"flat": True}):
            if node.get("node-name") == disk:
                return [b for b in node.get("dirty-bitmaps", []) if b.get("name")]
        raise KeyError(disk)

    def reference(self, disk: str, dest: Path) -> Path:
        """The disk's content now, as a raw file (VM paused while copying)."""
        self.cmd("stop")
        try:
            self.write(disk, "flush")
            subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw",
                            str(self.disks[disk]), str(dest)], check=True)
        finally:
            self.cmd("cont")
        return dest

    def state(self) -> dict[str, Any]:
        """Leftovers vmrepo must not leave: jobs, its nodes, exports."""
        nodes = [n["node-name"] for n in self.cmd("query-named-block-nodes", {"flat": True})
                 if n.get("node-name", "").startswith("vmrepo")]
        return {"jobs": self.cmd("query-jobs"), "nodes": nodes,
                "exports": self.cmd("query-block-exports")}

    def quit(self) -> None:
        """Clean shutdown (persistent bitmaps are stored)."""
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.execute("quit")
            self.qmp.close()
            self.qmp = None
        self._reap(timeout=30)

    def kill(self) -> None:
        """SIGKILL: persistent bitmaps come back inconsistent."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        self._reap(timeout=30)

    def _reap(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> QemuVM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill() if exc[0] is not None else self.quit()
