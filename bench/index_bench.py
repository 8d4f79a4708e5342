"""Index scaling: a repository with 10 million indexed blobs, and what commands cost in it.

Writes index segments naming 10 million blobs in about 78,000 packs of the
repository's pack size (the pack files are created sparse, so listings see
them at their full size), then snapshots a 3 GiB image (a third random, a
third text-like, a third holes) and measures, each in its own process:

* the first command that reads the index (it builds the local index);
* ``vmrepo snapshots``;
* an incremental snapshot after a third of the image (1 GiB) was rewritten;
* a restore of that snapshot (checked with ``cmp``).

Prints wall time, CPU time and peak RSS of each, against the targets.

    python bench/index_bench.py [--blobs 10M] [--image 3G] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import Measured, run_measured, vmrepo_bin
from sampleimage import make_image
from vmrepo.format import pack_key
from vmrepo.repository import Repository
from vmrepo.segments import ENTRY, encode_packed
from vmrepo.storage.local import LocalBackend
from vmrepo.units import human_bytes, parse_size

PER_SEGMENT = 100_000


def synthesize(repo_dir: Path, blobs: int) -> tuple[int, int]:
    """Index segments naming ``blobs`` blobs in sparse packs; return (packs, segments)."""
    repo = Repository.open(LocalBackend(repo_dir))
    cfg = repo.config
    per_pack = cfg.pack_size // cfg.chunk_size
    packs_total = segments = 0
    done = 0
    while done < blobs:
        n = min(PER_SEGMENT, blobs - done)
        npacks = -(-n // per_pack)
        pack_ids = [os.urandom(32) for _ in range(npacks)]
        ids = os.urandom(32 * n)
        stored = cfg.chunk_size // 2
        recs = sorted(ENTRY.pack(ids[i * 32 : i * 32 + 32], i // per_pack,
                                 8 + (i % per_pack) * stored, stored, cfg.chunk_size, 0)
                      for i in range(n))
        key, raw = encode_packed(repo.codec, repo.hasher, pack_ids,
                                 [cfg.pack_size] * npacks, b"".join(recs))
        repo.store.put_segment(key, raw)
        for pid in pack_ids:
            path = repo_dir / pack_key(pid)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(cfg.pack_size)
        done += n
        packs_total += npacks
        segments += 1
        if segments % 10 == 0:
            print(f"  {done:,} blobs indexed", flush=True)
    return packs_total, segments


def report(label: str, m: Measured, time_target: float | None, mem_target: int) -> bool:
    ok = m.max_rss <= mem_target and (time_target is None or m.seconds <= time_target)
    target = f"target {'< ' + format(time_target, '.0f') + ' s, ' if time_target else ''}" \
             f"< {human_bytes(mem_target)}"
    print(f"{label:44} {m.seconds:8.2f} s  cpu {m.cpu:7.2f} s  peak rss "
          f"{human_bytes(m.max_rss):>10}   ({target}: {'ok' if ok else 'MISSED'})", flush=True)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blobs", default="10M", help="indexed blobs (K and M suffixes)")
    ap.add_argument("--image", default="3G")
    ap.add_argument("--quick", action="store_true", help="200K blobs, a 192 MiB image")
    ap.add_argument("--keep", type=Path, help="work in DIR and keep it")
    args = ap.parse_args()
    blobs = int(args.blobs.upper().replace("M", "000000").replace("K", "000"))
    size = parse_size(args.image)
    if args.quick:
        blobs, size = 200_000, 192 << 20
    work = args.keep or Path(tempfile.mkdtemp(prefix="vmrepo-index-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ok = bench(work, blobs, size)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if not ok:
        sys.exit("bench: a target was missed")


def bench(work: Path, blobs: int, size: int) -> bool:
    vmrepo = vmrepo_bin()
    env = {"VMREPO_CACHE_DIR": str(work / "cache")}
    img = work / "disk0.raw"
    (work / "vmrepo.toml").write_text(
        f'repository = "{work}/repo"\n[vm.big]\nsource = "file"\n'
        f'disks = {{ disk0 = "{img}" }}\n')
    cfg = ["--config", str(work / "vmrepo.toml")]
    subprocess.run([vmrepo, "init", "--encryption", "none", *cfg], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, **env})
    t = time.monotonic()
    npacks, nseg = synthesize(work / "repo", blobs)
    print(f"bench: {blobs:,} blobs in {npacks:,} packs and {nseg} segments written in "
          f"{time.monotonic() - t:.1f} s", flush=True)
    rnd = random.Random(1)
    make_image(img, size, rnd)
    print(f"bench: {human_bytes(size)} image built", flush=True)
    ok = True
    m = run_measured([vmrepo, "snapshot", "big", *cfg], env=env)
    print(f"{'first snapshot (builds the local index)':44} {m.seconds:8.2f} s  cpu "
          f"{m.cpu:7.2f} s  peak rss {human_bytes(m.max_rss):>10}", flush=True)
    m = run_measured([vmrepo, "snapshots", *cfg], env=env)
    ok &= report("snapshots", m, 1.0, 100 << 20)
    third = size // 3 // (64 << 20) * (64 << 20)
    with open(img, "r+b") as f:
        for off in range(0, third, 64 << 20):
            f.seek(off)
            f.write(rnd.randbytes(min(64 << 20, third - off)))
    m = run_measured([vmrepo, "snapshot", "big", "--json", *cfg], env=env)
    ok &= report(f"snapshot after a {human_bytes(third)} change", m, None, 300 << 20)
    out = work / "restored.raw"
    m = run_measured([vmrepo, "restore", "big@latest", "--disk", "disk0", "-o", str(out),
                      *cfg], env=env)
    ok &= report("restore of that snapshot", m, None, 300 << 20)
    same = subprocess.run(["cmp", str(out), str(img)]).returncode == 0
    print(f"restore byte-identical: {'yes' if same else 'NO'}")
    cache = sum(p.stat().st_size for p in (work / "cache").rglob("*") if p.is_file())
    print(f"local index on disk: {human_bytes(cache)}")
    return ok and same


if __name__ == "__main__":
    main()
