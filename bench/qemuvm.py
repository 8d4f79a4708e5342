"""A paused QEMU with qcow2 disks for the benchmarks: started on private QMP sockets, stopped
by PID. No guest OS (``-M none``); guest writes go through HMP ``qemu-io``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from measure import cpu_seconds
from vmrepo.sources.qemu.qmp import QmpConnection, QmpDisconnected


class BenchVM:
    def __init__(self, work: Path, image: Path | Mapping[str, Path]) -> None:
        """One image as node ``disk0``, or several by node name."""
        self.work = work
        self.images = dict(image) if isinstance(image, Mapping) else {"disk0": image}
        self.qmp_path = work / "vm.qmp"  # for vmrepo
        self.own_path = work / "bench.qmp"  # for the benchmark
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QmpConnection | None = None

    def start(self) -> BenchVM:
        for p in (self.qmp_path, self.own_path):
            p.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
             "-accel", "kvm", "-accel", "tcg",
             "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
             "-qmp", f"unix:{self.own_path},server=on,wait=off"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.own_path.exists():
                    self.qmp = QmpConnection(str(self.own_path))
                    break
            except QmpDisconnected:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("QEMU did not start")
            time.sleep(0.05)
        for node, image in self.images.items():
            self.cmd("blockdev-add", {"driver": "qcow2", "node-name": node,
                                      "file": {"driver": "file", "filename": str(image)}})
        return self

    def cpu_seconds(self) -> float:
        """QEMU's CPU time so far (user and system)."""
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        assert self.qmp is not None
        return self.qmp.execute(name, args)

    def write(self, command: str, node: str = "disk0") -> None:
        out = self.cmd("human-monitor-command", {"command-line": f'qemu-io {node} "{command}"'})
        if out and ("error" in out.lower() or "failed" in out.lower()):
            raise RuntimeError(f"qemu-io {command}: {out}")

    def stop(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.execute("quit")
            self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None
