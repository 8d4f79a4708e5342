"""vmrepo's NBD server against QEMU's own NBD client (qemu-io, qemu-img)."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest
from vmrepo.sources.nbd import protocol as p
from vmrepo.sources.nbd.server import Export, ExportError, NbdServer


class RamExport(Export):
    def __init__(self, name: str, size: int, writable: bool = True) -> None:
        self.name, self.size, self.writable = name, size, writable
        self.buf = bytearray(size)
        self.log: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()
        self.fail_writes = False

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset : offset + length])

    def pwrite(self, offset: int, data: bytes) -> None:
        if self.fail_writes:
            raise ExportError(p.ENOSPC)
        with self.lock:
            self.buf[offset : offset + len(data)] = data
            self.log.append(("write", offset, len(data)))

    def write_zeroes(self, offset: int, length: int) -> None:
        with self.lock:
            self.buf[offset : offset + length] = bytes(length)
            self.log.append(("zero", offset, length))


@pytest.fixture
def served(tmp_path: Path):  # type: ignore[no-untyped-def]
    exports = {"disk0": RamExport("disk0", 4 << 20), "ro": RamExport("ro", 1 << 20, False)}
    server = NbdServer(str(tmp_path / "nbd.sock"), exports)
    server.start()
    try:
        yield server, exports
    finally:
        server.stop()


def url(server: NbdServer, name: str) -> str:
    return f"nbd+unix:///{name}?socket={server.path}"


def qemu_io(target: str, *cmds: str) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw", target]
    for c in cmds:
        args += ["-c", c]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_qemu_writes_and_reads_back(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, exports = served
    res = qemu_io(url(server, "disk0"), "write -P 0xab 65536 131072", "write -z 0 4096",
                  "read -P 0xab 65536 131072", "read -P 0 0 4096", "flush")
    assert res.returncode == 0, res.stdout + res.stderr
    buf = exports["disk0"].buf
    assert buf[65536 : 65536 + 131072] == b"\xab" * 131072
    assert ("zero", 0, 4096) in exports["disk0"].log


def test_qemu_img_convert_into_export(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, exports = served
    src = tmp_path / "src.raw"
    data = os.urandom(4 << 20)
    src.write_bytes(data)
    res = subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src),
                          url(server, "disk0")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert bytes(exports["disk0"].buf) == data


def test_size_info_and_read_only(served) -> None:  # type: ignore[no-untyped-def]
    server, _ = served
    info = subprocess.run(["qemu-img", "info", "--output=json", url(server, "ro")],
                          capture_output=True, text=True, timeout=60)
    assert '"virtual-size": 1048576' in info.stdout
    res = qemu_io(url(server, "ro"), "write -P 1 0 512")
    assert res.returncode != 0 or "failed" in (res.stdout + res.stderr).lower()


def test_errors_reach_the_client_and_unknown_export_is_refused(served) -> None:  # type: ignore[no-untyped-def]
    server, exports = served
    exports["disk0"].fail_writes = True
    res = qemu_io(url(server, "disk0"), "write -P 1 0 4096")
    assert "No space left" in res.stdout + res.stderr
    res = qemu_io(url(server, "nope"), "read 0 512")
    assert res.returncode != 0
