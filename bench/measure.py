"""Running a command and measuring it: wall time, CPU time, peak memory, its output."""

from __future__ import annotations

import compileall
import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# A small wrapper process starts the command, so the peak RSS is the command's own and
# not inherited from the (large) benchmark process at fork time; it also times the command
# from its start to its exit, without the wrapper's own start-up.
_WRAP = (
    "import os, subprocess, sys, time\n"
    "t = time.monotonic()\n"
    "p = subprocess.Popen(sys.argv[1:], stderr=subprocess.DEVNULL)\n"
    "_, st, ru = os.wait4(p.pid, 0)\n"
    "wall = time.monotonic() - t\n"
    "sys.stderr.write(f'{os.waitstatus_to_exitcode(st)} {ru.ru_utime + ru.ru_stime} "
    "{ru.ru_maxrss} {wall}')\n"
)


@dataclass
class Measured:
    seconds: float
    cpu: float
    max_rss: int
    stdout: str


def run_measured(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
                 ) -> Measured:
    """Run ``cmd``; exit the benchmark if it fails."""
    res = subprocess.run([sys.executable, "-c", _WRAP, *cmd],
                         env={**os.environ, **(env or {})}, cwd=cwd, capture_output=True,
                         text=True, check=False)
    code, cpu, rss, wall = res.stderr.split()[-4:]
    if int(code) != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed with exit code {code}")
    return Measured(float(wall), float(cpu), int(rss) * 1024, res.stdout)


def cpu_seconds(pid: int) -> float:
    """A running process's CPU time so far (user and system, from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@functools.cache
def vmrepo_bin() -> str:
    """The ``vmrepo`` command, its modules byte-compiled first as an installed program's
    are (an editable install under ``PYTHONDONTWRITEBYTECODE`` would compile every module
    on every run: 0.1 s of each command's time)."""
    root = Path(__file__).resolve().parent.parent
    for package in ("repo", "sources", "storage"):
        compileall.compile_dir(root / package, quiet=1)
    return str(Path(sys.executable).parent / "vmrepo")
