"""Instant restore benchmark: `vmrepo serve` against `vmrepo restore` of the same snapshot.

Builds a raw disk of random data (default 1 GiB), snapshots it into a fresh
local repository (256 KiB chunks, 32 MiB packs, the default encryption, the
passphrase from a file), then measures, best of
``--runs``, each command in its own process with the page cache warm:

* time to first byte: from starting ``vmrepo serve`` to the first 4 KiB of
  the disk read over NBD (the client polls for the socket, which appears
  when the exports are ready);
* a sequential read of the whole export, ``nbdcopy URL null:``, each run
  against a fresh server (its chunk cache cold), with the server's CPU time
  and peak RSS;
* ``vmrepo restore --disk disk0 --no-sync`` of the same snapshot into a raw
  file (``--no-sync``: the write-back of the image is not the subject).

    python bench/serve_bench.py [--size 1G] [--runs 3] [--encryption none]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import cpu_seconds, run_measured, vmrepo_bin
from vmrepo.sources.nbd.client import NbdAddress, NbdClient
from vmrepo.sources.nbd.errors import NbdError
from vmrepo.units import human_bytes, parse_size


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class Server:
    """``vmrepo serve`` of the benchmark snapshot, stopped by PID."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.sock = work / "serve.sock"
        self.url = f"nbd+unix:///disk0?socket={self.sock}"
        self.started = time.monotonic()
        self.proc = subprocess.Popen([vmrepo_bin(), "serve", "vm1@latest", "--socket",
                                      str(self.sock)], cwd=work, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def first_byte(self) -> float:
        """Seconds from the start of the process to the first 4 KiB read."""
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"bench: vmrepo serve exited with {self.proc.returncode}")
            try:
                with NbdClient(NbdAddress.parse(self.url)) as client:
                    client.pread(0, 4096)
                return time.monotonic() - self.started
            except NbdError:
                time.sleep(0.001)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            sys.exit("bench: vmrepo serve did not stop on SIGTERM")
        if code != 0:
            sys.exit(f"bench: vmrepo serve ended with exit code {code}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--encryption", default=None,
                    help="passed to `vmrepo init` (default: the repository default)")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="vmrepo-servebench-", dir="/var/tmp"))
    (work / "passphrase").write_text("serve-bench")
    env = {**os.environ, "VMREPO_CACHE_DIR": str(work / "cache"),
           "VMREPO_PASSWORD_FILE": str(work / "passphrase")}
    server: Server | None = None
    try:
        with open(work / "disk0.raw", "wb") as f:
            for _ in range(0, size, 64 << 20):
                f.write(os.urandom(min(64 << 20, size - f.tell())))
        (work / "vmrepo.toml").write_text('repository = "repo"\n[vm.vm1]\nsource = "file"\n'
                                          'disks = { disk0 = "disk0.raw" }\n')
        run_measured([vmrepo_bin(), "init", "--chunk-size", "256K", "--pack-size", "32M",
                      *(["--encryption", args.encryption] if args.encryption else [])],
                     env, work)
        run_measured([vmrepo_bin(), "snapshot", "vm1"], env, work)
        first, reads, restores = [], [], []
        for _ in range(args.runs):
            os.sync()
            server = Server(work, env)
            first.append(server.first_byte())
            before = cpu_seconds(server.proc.pid)
            t = time.monotonic()
            subprocess.run(["nbdcopy", server.url, "null:"], check=True)
            reads.append((time.monotonic() - t, cpu_seconds(server.proc.pid) - before,
                          peak_rss(server.proc.pid)))
            server.stop()
            server = None
            os.sync()
            out = work / "restored.raw"
            out.unlink(missing_ok=True)
            m = run_measured([vmrepo_bin(), "restore", "vm1@latest", "--disk", "disk0",
                              "--no-sync", "-o", str(out)], env, work)
            restores.append((m.seconds, m.cpu, m.max_rss))
        read, restore = min(reads), min(restores)
        gib = size / (1 << 30)
        print(f"disk: {human_bytes(size)} of random data, 256 KiB chunks, local repository "
              f"(encryption: {args.encryption or 'default'}); best of {args.runs}")
        print(f"vmrepo serve, start to first byte:  {min(first):.3f} s "
              f"(runs: {', '.join(f'{x:.3f}' for x in first)})")
        print(f"nbdcopy of the export:  {read[0]:.2f} s, {gib / read[0]:.2f} GiB/s, "
              f"server CPU {read[1]:.2f} s, server peak RSS {human_bytes(read[2])}")
        print(f"vmrepo restore --no-sync: {restore[0]:.2f} s, {gib / restore[0]:.2f} GiB/s, "
              f"CPU {restore[1]:.2f} s, peak RSS {human_bytes(restore[2])}")
        print(f"export read time / restore time: {read[0] / restore[0]:.2f}")
    finally:
        if server is not None:
            server.proc.kill()
            server.proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
