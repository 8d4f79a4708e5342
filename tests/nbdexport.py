"""A qemu-nbd export of an image for tests, on a unix socket, stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


class QemuNbd:
    def __init__(self, image: Path, sock: Path, *, fmt: str = "qcow2", name: str = "vda",
                 bitmap: str | None = None, writable: bool = False) -> None:
        self.sock = sock
        self.name = name
        args = ["qemu-nbd", "-t", "-f", fmt, "-x", name, f"--socket={sock}", "-e", "4"]
        if not writable:
            args.append("-r")
        if bitmap:
            args += ["-B", bitmap]
        args.append(str(image))
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not self._accepting():  # the socket file appears before listen()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                self.stop()
                raise RuntimeError(f"qemu-nbd did not start: {err}")
            time.sleep(0.02)

    def _accepting(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.sock))
            except OSError:
                return False
        return True

    @property
    def url(self) -> str:
        return f"nbd+unix:///{self.name}?socket={self.sock}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()

    def __enter__(self) -> QemuNbd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
