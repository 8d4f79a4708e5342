"""Snapshot benchmark: vmrepo against borg and restic on the same image, side by side.

Builds a raw image (default 2 GiB: a third random, a third text-like, a
third holes), then for each tool: a full backup, 4 KiB writes into 1% of
the 64 KiB blocks, a second backup. Prints wall time, CPU time, peak memory
and bytes added for each, the ratios against vmrepo, and checks that
vmrepo's restores are byte-identical and that its differential qcow2 on top
of the first restore equals the second image (qemu-img compare).

    python bench/snapshot_bench.py [--size 2G] [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sampleimage import make_image
from vmrepo.units import human_bytes, parse_size


@dataclass
class Run:
    tool: str
    phase: str
    seconds: float
    cpu: float
    max_rss: int
    added: int


# A small wrapper process starts the tool, so the tool's peak RSS is its own and
# not inherited from this (large) process at fork time.
_WRAP = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stderr=subprocess.DEVNULL)\n"
    "_, st, ru = os.wait4(p.pid, 0)\n"
    "sys.stderr.write(f'{os.waitstatus_to_exitcode(st)} {ru.ru_utime + ru.ru_stime} "
    "{ru.ru_maxrss}')\n"
)


def run_measured(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
                 ) -> tuple[float, float, int, str]:
    """Run ``cmd``; return wall seconds, CPU seconds, peak RSS bytes and its stdout."""
    t = time.monotonic()
    res = subprocess.run([sys.executable, "-c", _WRAP, *cmd], env={**os.environ, **(env or {})},
                         cwd=cwd, capture_output=True, text=True)
    wall = time.monotonic() - t
    code, cpu, rss = res.stderr.split()
    if int(code) != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed with exit code {code}")
    return wall, float(cpu), int(rss) * 1024, res.stdout


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def change_image(path: Path, size: int, rnd: random.Random) -> int:
    blocks = rnd.sample(range(size // 65536), size // 65536 // 100)
    with open(path, "r+b") as f:
        for b in sorted(blocks):
            f.seek(b * 65536)
            f.write(rnd.randbytes(4096))
    return len(blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--keep", type=Path, help="work in DIR and keep it")
    ap.add_argument("--skip", action="append", default=[], help="skip a tool (borg, restic)")
    ap.add_argument("--repeat", type=int, default=3, help="full runs per tool (best counts)")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = args.keep or Path(tempfile.mkdtemp(prefix="vmrepo-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    vmrepo = str(Path(sys.executable).parent / "vmrepo")
    try:
        bench(work, size, vmrepo, args.skip, args.repeat)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def bench(work: Path, size: int, vmrepo: str, skip: list[str], repeat: int) -> None:
    rnd = random.Random(42)
    img = work / "disk0.raw"
    print(f"bench: building a {human_bytes(size)} image in {work}", flush=True)
    make_image(img, size, rnd)
    ref1 = work / "ref1.raw"
    subprocess.run(["cp", "--sparse=always", str(img), str(ref1)], check=True)
    change_rnd = random.Random(7)
    (work / "vmrepo.toml").write_text(
        f'repository = "{work}/vmrepo"\n[vm.bench]\nsource = "file"\n'
        f'disks = {{ disk0 = "{img}" }}\n')
    tools = ["vmrepo"] + [t for t in ("borg", "restic") if t not in skip and shutil.which(t)]
    env_borg = {"BORG_REPO": str(work / "borg"), "BORG_PASSPHRASE": "",
                "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                "BORG_BASE_DIR": str(work / "borgbase")}
    env_restic = {"RESTIC_REPOSITORY": str(work / "restic"), "RESTIC_PASSWORD": "bench",
                  "RESTIC_CACHE_DIR": str(work / "restic-cache")}
    cfg = ["--config", str(work / "vmrepo.toml")]

    def init(tool: str) -> None:
        shutil.rmtree(work / tool, ignore_errors=True)
        if tool == "vmrepo":
            subprocess.run([vmrepo, "init", *cfg], check=True, stdout=subprocess.DEVNULL)
        elif tool == "borg":
            shutil.rmtree(work / "borgbase", ignore_errors=True)
            subprocess.run(["borg", "init", "--encryption", "none"],
                           env={**os.environ, **env_borg}, check=True)
        else:
            shutil.rmtree(work / "restic-cache", ignore_errors=True)
            subprocess.run(["restic", "init", "-q"], env={**os.environ, **env_restic},
                           check=True)

    def backup(tool: str, phase: str) -> tuple[Run, str]:
        before = dir_size(work / tool)
        os.sync()  # no tool pays for the write-back of the image or of another tool
        if tool == "vmrepo":
            wall, cpu, rss, out = run_measured([vmrepo, "snapshot", "bench", "--json", *cfg])
        elif tool == "borg":
            wall, cpu, rss, out = run_measured(
                ["borg", "create", "--compression", "zstd,3", f"::{phase}", img.name],
                env=env_borg, cwd=work)
        else:
            wall, cpu, rss, out = run_measured(
                ["restic", "backup", "-q", "--compression", "auto", img.name],
                env=env_restic, cwd=work)
        r = Run(tool, phase, wall, cpu, rss, dir_size(work / tool) - before)
        print(f"  {tool:7} {phase:7} {r.seconds:7.2f} s  cpu {r.cpu:6.2f} s  "
              f"peak rss {human_bytes(r.max_rss):>10}  added {human_bytes(r.added):>10}  "
              f"{human_bytes(size / r.seconds)}/s of disk", flush=True)
        return r, out

    snaps: list[dict[str, object]] = []
    full_runs: dict[str, list[Run]] = {t: [] for t in tools}
    for rep in range(repeat):
        # Tools take turns, so a noisy moment hits them alike; each full starts empty.
        for tool in tools:
            init(tool)
            r, out = backup(tool, "full")
            full_runs[tool].append(r)
            if tool == "vmrepo" and rep == repeat - 1:
                snaps.append(json.loads(out))
    runs = [min(full_runs[t], key=lambda r: r.seconds) for t in tools]
    n = change_image(img, size, change_rnd)
    print(f"bench: changed {n} blocks of 64 KiB with 4 KiB writes", flush=True)
    for tool in tools:
        r, out = backup(tool, "second")
        runs.append(r)
        if tool == "vmrepo":
            snaps.append(json.loads(out))
    if repeat > 1:
        print(f"\nbest of {repeat} full runs: "
              + ", ".join(f"{r.tool} {r.seconds:.2f} s" for r in runs[: len(tools)]))

    print("\nvmrepo figures")
    for label, s in zip(("full", "second"), snaps, strict=True):
        tot = s["totals"]  # type: ignore[index]
        print(f"  {label:7} read {human_bytes(tot['bytes_data'])}, {tot['chunks_new']} new chunks"
              f" ({human_bytes(tot['bytes_stored'])} stored), {tot['pages_new']} new manifest "
              f"pages ({human_bytes(tot['bytes_manifest'])} incl. root)")
    print("\nratios (tool time / vmrepo time, tool added / vmrepo added)")
    by = {(r.tool, r.phase): r for r in runs}
    for tool in tools[1:]:
        for phase in ("full", "second"):
            a, b = by[(tool, phase)], by[("vmrepo", phase)]
            print(f"  {tool:7} {phase:7} time x{a.seconds / b.seconds:5.2f}   "
                  f"added x{a.added / max(b.added, 1):5.2f}   "
                  f"peak rss x{a.max_rss / max(b.max_rss, 1):5.2f}")
    verify(work, vmrepo, snaps, ref1, img)


def verify(work: Path, vmrepo: str, snaps: list[dict[str, object]], ref1: Path,
           img: Path) -> None:
    cfg = ["--config", str(work / "vmrepo.toml")]
    ids = [str(s["id"])[:8] for s in snaps]
    out = work / "restore"
    out.mkdir()
    for sid, ref in zip(ids, (ref1, img), strict=True):
        t = time.monotonic()
        subprocess.run([vmrepo, "restore", f"bench@{sid}", "--disk", "disk0", *cfg,
                        "-o", str(out / f"{sid}.raw")], check=True, stdout=subprocess.DEVNULL)
        wall = time.monotonic() - t
        same = subprocess.run(["cmp", str(out / f"{sid}.raw"), str(ref)]).returncode == 0
        print(f"restore {sid}: {wall:.2f} s, {'byte-identical' if same else 'DIFFERS'}")
        (out / f"{sid}.raw").unlink()
        if not same:
            sys.exit("bench: restore differs")
    subprocess.run([vmrepo, "restore", f"bench@{ids[0]}", "--disk", "disk0", "--format",
                    "qcow2", *cfg, "-o", str(out / "a.qcow2")], check=True,
                   stdout=subprocess.DEVNULL)
    t = time.monotonic()
    subprocess.run([vmrepo, "restore", f"bench@{ids[1]}", "--since", f"bench@{ids[0]}",
                    "--format", "qcow2", "--backing", str(out / "a.qcow2"), "--disk", "disk0",
                    *cfg, "-o", str(out / "b.qcow2")], check=True, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - t
    res = subprocess.run(["qemu-img", "compare", str(out / "b.qcow2"), str(img)],
                         capture_output=True, text=True)
    print(f"differential qcow2: {wall:.2f} s, {human_bytes((out / 'b.qcow2').stat().st_size)}"
          f" on disk; qemu-img compare with the second image: {res.stdout.strip()}")
    if res.returncode != 0:
        sys.exit("bench: differential image differs")


if __name__ == "__main__":
    main()
