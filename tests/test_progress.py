"""Progress: bytes done of bytes to read, rate and time left, on a terminal only."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path

from vmrepo.progress import line

from .helpers import random_image_vm, vmrepo_bin


def test_the_progress_line() -> None:
    text = line("restore vm1", 512 << 20, 2 << 30, 2.0)
    assert text.startswith("restore vm1  512.00 MiB / 2.00 GiB")
    assert " 25.0%" in text and "256.00 MiB/s" in text and "ETA 0:06" in text
    assert "ETA" not in line("x", 10, 10, 1.0)


def _on_a_terminal(args: list[str], cwd: Path) -> str:
    """Run vmrepo with stderr on a pseudo-terminal; return what it wrote there."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([vmrepo_bin(), *args], cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    out = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        out += data
    proc.wait()
    os.close(leader)
    assert proc.returncode == 0, out
    return out.decode(errors="replace")


def test_progress_shows_on_a_terminal_and_counts_only_data(tmp_path: Path) -> None:
    random_image_vm(tmp_path, 64)
    with open(tmp_path / "big.raw", "r+b") as f:
        f.truncate(256 << 20)  # 192 MiB of holes more: not counted
    shown = _on_a_terminal(["snapshot", "vm1"], tmp_path)
    assert "snapshot vm1" in shown and "64.00 MiB / 64.00 MiB" in shown and "100.0%" in shown
    shown = _on_a_terminal(["restore", "vm1@latest", "-o", str(tmp_path / "out")], tmp_path)
    assert "restore vm1" in shown and "/ 64.00 MiB" in shown
    quiet = _on_a_terminal(["restore", "vm1@latest", "-o", str(tmp_path / "out2"),
                            "--no-progress"], tmp_path)
    assert "MiB /" not in quiet
    piped = subprocess.run([vmrepo_bin(), "snapshot", "vm1"], cwd=tmp_path,
                           capture_output=True, text=True, check=True)
    assert "MiB /" not in piped.stderr
