"""A private qemu-nbd: an image exported on a unix socket in a 0700 directory, stopped by PID.

Used to read images in formats QEMU knows (qcow2, vmdk, ...) and to write
new qcow2 images through the NBD client, without ever building a command
string from a path. When qemu-nbd cannot export the image (missing, wrong
format, locked by a running QEMU), its own error text is what the caller's
exception carries.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence

from .client import NbdAddress
from .errors import NbdConnectError

log = logging.getLogger(__name__)


class QemuNbd:
    """``qemu-nbd`` serving one image as export ``name`` until :meth:`stop`."""

    def __init__(self, image: str, fmt: str, *, writable: bool = False, name: str = "d",
                 extra: Sequence[str] = (), timeout: float = 30.0) -> None:
        self.image = image
        self._dir = tempfile.mkdtemp(prefix="vmrepo-qemu-nbd-")
        self.socket = os.path.join(self._dir, "nbd.sock")
        self.address = NbdAddress(name, unix=self.socket)
        args = ["qemu-nbd", f"--format={fmt}", f"--export-name={name}",
                f"--socket={self.socket}", "--persistent", "--shared=8", *extra]
        if not writable:
            args.append("--read-only")
        args.append(image)
        try:
            self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)
        except FileNotFoundError:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise NbdConnectError("qemu-nbd is missing (install qemu-utils)") from None
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _failure(self, fallback: str) -> NbdConnectError:
        err = ""
        if self._proc is not None and self._proc.poll() is not None and self._proc.stderr:
            err = self._proc.stderr.read().decode(errors="replace").strip()
        lines = [ln.removeprefix("qemu-nbd: ") for ln in err.splitlines() if ln.strip()]
        return NbdConnectError(f"qemu-nbd cannot export {self.image}: "
                               f"{'; '.join(lines[-3:]) if lines else fallback}")

    def _wait(self, timeout: float) -> None:
        """Until the socket accepts connections; qemu-nbd's error if it exits first."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise self._failure(f"it exited with {self._proc.returncode}")
            if os.path.exists(self.socket):
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(self.socket)
                        return
                    except OSError as exc:
                        log.debug("qemu-nbd not ready yet: %s", exc)
            if time.monotonic() > deadline:
                raise self._failure(f"not ready within {timeout:.0f} s")
            time.sleep(0.01)

    def failure(self) -> NbdConnectError | None:
        """qemu-nbd's own error, if it has exited."""
        if self._proc is not None and self._proc.poll() is not None:
            return self._failure(f"it exited with {self._proc.returncode}")
        return None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> QemuNbd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
