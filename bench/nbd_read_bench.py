"""NBD read benchmark: vmrepo's NBD client against nbdcopy on the same export, same run.

Builds a raw image (default 2 GiB: a third random, a third text-like, a third
holes), exports it read-only with qemu-nbd on a unix socket, and reads the
whole export: with ``nbdcopy URL null:``, with vmrepo's client (extents from
base:allocation, zeros skipped as nbdcopy does, several reads in flight),
and through a full ``vmrepo snapshot`` of the export (hashing, compression,
packing). Prints seconds, rates and the ratio to nbdcopy.

    python bench/nbd_read_bench.py [--size 2G] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sampleimage import make_image
from vmrepo.memtune import tune_malloc
from vmrepo.sources.nbd.client import NbdAddress, NbdClient
from vmrepo.sources.nbdread import ALLOCATION, ReadCounters, read_disk
from vmrepo.units import human_bytes, parse_size


def timed(fn: object) -> float:
    t = time.monotonic()
    fn()  # type: ignore[operator]
    return time.monotonic() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tune_malloc()  # as the vmrepo command does
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="vmrepo-nbdbench-", dir="/var/tmp"))
    img, sock = work / "disk.raw", work / "nbd.sock"
    proc = None
    try:
        make_image(img, size, random.Random(42))
        os.sync()
        proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "raw", "-x", "vda", "-e", "8",
                                 f"--socket={sock}", str(img)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not sock.exists():
            time.sleep(0.02)
        time.sleep(0.2)
        url = f"nbd+unix:///vda?socket={sock}"
        data = 0

        def ours() -> None:
            nonlocal data
            counters = ReadCounters()
            with NbdClient(NbdAddress.parse(url), [ALLOCATION]) as c:
                for _ in read_disk(c, [(0, c.size)], counters):
                    pass
            data = counters.bytes_read

        def nbdcopy() -> None:
            subprocess.run(["nbdcopy", url, "null:"], check=True)

        ours()  # warm the page cache
        best = {"nbdcopy": min(timed(nbdcopy) for _ in range(args.runs)),
                "vmrepo client": min(timed(ours) for _ in range(args.runs))}
        cfg = work / "vmrepo.toml"
        cfg.write_text(f'repository = "{work}/repo"\n[vm.b]\nsource = "nbd"\nurl = "{url}"\n')
        vmrepo = str(Path(sys.executable).parent / "vmrepo")
        subprocess.run([vmrepo, "init", "--encryption", "none", "--config", str(cfg)], check=True,
                       stdout=subprocess.DEVNULL)
        best["vmrepo snapshot"] = timed(lambda: subprocess.run(
            [vmrepo, "snapshot", "b", "--config", str(cfg)], check=True,
            stdout=subprocess.DEVNULL))
        print(f"export: {human_bytes(size)}, {human_bytes(data)} of data (the rest holes)")
        for name, secs in best.items():
            print(f"  {name:16} {secs:6.2f} s  {human_bytes(data / secs)}/s of data  "
                  f"{best['nbdcopy'] / secs:5.2f} x nbdcopy's rate")
    finally:
        if proc is not None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
