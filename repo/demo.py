"""The built-in example behind ``make demo``: back up a sample disk twice and prove both.

Creates a sparse sample disk image, a repository and a config in a fresh
work directory, then runs the real ``vmrepo`` command as a user would:
init, snapshot, change the disk, snapshot again, restore both snapshots
and compare each with the disk as it was. Prints a short summary.
"""

from __future__ import annotations

import filecmp
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .units import human_bytes, ratio

DISK_SIZE = 256 << 20
_TEXT = bytes(b" etaoinshrdlucmfwypvbgkqjxz\n"[i % 28] for i in range(256))


def make_disk(path: Path, rnd: random.Random) -> None:
    """A third random data, a third text-like data, a third holes."""
    third = DISK_SIZE // 3 // (1 << 20) * (1 << 20)
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
        f.write(rnd.randbytes(third))
        f.write(rnd.randbytes(third).translate(_TEXT))


def change_disk(path: Path, rnd: random.Random, fraction: float = 0.01) -> int:
    """4 KiB writes into ``fraction`` of the disk's 64 KiB blocks; returns how many."""
    blocks = rnd.sample(range(DISK_SIZE // 65536), int(DISK_SIZE // 65536 * fraction))
    with open(path, "r+b") as f:
        for b in blocks:
            f.seek(b * 65536)
            f.write(rnd.randbytes(4096))
    return len(blocks)


def vmrepo(work: Path, *args: str) -> Any:
    exe = Path(sys.executable).parent / "vmrepo"
    res = subprocess.run([str(exe), *args, "--json"], cwd=work, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"demo: vmrepo {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return json.loads(res.stdout)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="vmrepo-demo-"))
    try:
        run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path) -> None:
    rnd = random.Random(2024)
    disk = work / "vm1-disk0.raw"
    (work / "vmrepo.toml").write_text(
        f'repository = "repo"\n[vm.vm1]\nsource = "file"\ndisks = {{ disk0 = "{disk}" }}\n')
    print(f"demo: work directory {work}")
    make_disk(disk, rnd)
    vmrepo(work, "init")
    print(f"demo: sample disk of {human_bytes(DISK_SIZE)} "
          "(1/3 random, 1/3 text-like, 1/3 holes)")
    t0 = time.monotonic()
    first = vmrepo(work, "snapshot", "vm1", "--tag", "demo")
    t1 = time.monotonic()
    shutil.copyfile(disk, work / "reference-1.raw")
    changed = change_disk(disk, rnd)
    print(f"demo: changed the disk with {changed} writes of 4 KiB")
    second = vmrepo(work, "snapshot", "vm1", "--tag", "demo")
    t2 = time.monotonic()
    for label, snap, t in (("full", first, t1 - t0), ("second", second, t2 - t1)):
        tot = snap["totals"]
        added = tot["bytes_stored"] + tot["bytes_manifest"]
        print(f"demo: snapshot {snap['id'][:8]} ({label}): read {human_bytes(tot['bytes_data'])}"
              f", stored {tot['chunks_new']} new chunks + {tot['pages_new']} manifest pages = "
              f"{human_bytes(added)}, dedup+compression ratio "
              f"{ratio(tot['bytes_data'], added)}, {t:.2f} s")
    out = work / "restored"
    out.mkdir()
    ok = True
    for snap, ref in ((first, work / "reference-1.raw"), (second, disk)):
        target = out / f"{snap['id'][:8]}.raw"
        t = time.monotonic()
        vmrepo(work, "restore", f"vm1@{snap['id'][:8]}", "--disk", "disk0", "-o", str(target))
        same = filecmp.cmp(target, ref, shallow=False)
        ok &= same
        print(f"demo: restored {snap['id'][:8]} in {time.monotonic() - t:.2f} s: "
              f"{'bit-identical' if same else 'DIFFERS'} to the disk at that time")
    repo_size = sum(p.stat().st_size for p in (work / "repo").rglob("*") if p.is_file())
    print(f"demo: repository holds {human_bytes(repo_size)} for two snapshots of a "
          f"{human_bytes(DISK_SIZE)} disk")
    if not ok:
        sys.exit("demo: a restore differs from its reference")
    print("demo: OK")


if __name__ == "__main__":
    main()
