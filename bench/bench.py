"""Every vmrepo data path beside restic and borg, on one disk, in one run.

Builds a disk image (default 2 GiB: a third random, a third text-like, a
third holes) as a raw file and as the qcow2 disk of a paused QEMU VM, then:

* full backups through vmrepo's file source, QMP push and NBD pull, borg
  (``--compression zstd,3``, no encryption) and restic, into fresh
  repositories, the tools taking turns, best of ``--rounds``;
* 4 KiB writes into 1% of the 64 KiB blocks (through QEMU for the VM, the same
  bytes into the raw file), then an incremental backup with each (vmrepo
  through QEMU's bitmaps; restic, borg and the file source re-read);
* a restore of the latest snapshot with each, checked with ``cmp``, best of
  ``--rounds`` with the tools taking turns (vmrepo reports its request count);

and prints one table with throughput, stored bytes, peak memory and the
ratios against borg and restic.

    python bench/bench.py [--size 2G] [--rounds 2] [--quick] [--keep DIR]
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
from dataclasses import dataclass, field
from pathlib import Path

from measure import Measured, dir_size, run_measured, vmrepo_bin

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qemuvm import BenchVM
from sampleimage import make_image
from vmrepo.units import human_bytes, parse_size

from tests.s3server import MotoServer  # noqa: E402 - the tests' loopback S3 endpoint

VMREPO_PATHS = ("file", "qmp", "nbd", "s3")
OTHERS = ("borg", "restic")


@dataclass
class Result:
    path: str
    phase: str
    m: Measured
    added: int = 0
    extra: dict[str, object] = field(default_factory=dict)


class Bench:
    def __init__(self, work: Path, size: int, paths: list[str]) -> None:
        self.work = work
        self.size = size
        self.paths = paths
        self.raw = work / "disk0.raw"
        self.qcow2 = work / "disk0.qcow2"
        self.vm: BenchVM | None = None
        self.s3: MotoServer | None = None
        self._s3_round = 0
        self.vmrepo = vmrepo_bin()
        self.cfg = work / "vmrepo.toml"

    # -- set-up ----------------------------------------------------------------

    def prepare(self) -> None:
        print(f"bench: building a {human_bytes(self.size)} image in {self.work}", flush=True)
        make_image(self.raw, self.size, random.Random(42))
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(self.raw),
                        str(self.qcow2)], check=True)
        self.cfg.write_text(
            f'[vm.file]\nsource = "file"\ndisks = {{ disk0 = "{self.raw}" }}\n'
            f'[vm.qmp]\nsource = "qmp"\nsocket = "{self.work}/vm.qmp"\ndisks = ["disk0"]\n'
            f'[vm.nbd]\nsource = "nbd"\nsocket = "{self.work}/vm.qmp"\ndisks = ["disk0"]\n'
            f'scratch = "{self.work}"\nfleece_reserve = "256M"\n'
            f'[vm.s3]\nsource = "file"\ndisks = {{ disk0 = "{self.raw}" }}\n')
        if any(p in self.paths for p in ("qmp", "nbd")):
            self.vm = BenchVM(self.work, self.qcow2).start()
        if "s3" in self.paths:
            self.s3 = MotoServer()

    def close(self) -> None:
        if self.vm is not None:
            self.vm.stop()
        if self.s3 is not None:
            self.s3.stop()

    def repo(self, path: str) -> Path:
        return self.work / f"repo-{path}"

    def location(self, path: str) -> str:
        """Where a path's repository is (a fresh S3 prefix after each init)."""
        return f"s3://bench/repo-{self._s3_round}" if path == "s3" else str(self.repo(path))

    def env(self, path: str) -> dict[str, str]:
        if path == "borg":
            return {"BORG_REPO": str(self.repo(path)), "BORG_PASSPHRASE": "",
                    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                    "BORG_BASE_DIR": str(self.work / "borgbase")}
        if path == "restic":
            return {"RESTIC_REPOSITORY": str(self.repo(path)), "RESTIC_PASSWORD": "bench",
                    "RESTIC_CACHE_DIR": str(self.work / "restic-cache")}
        env = {"VMREPO_CACHE_DIR": str(self.work / f"cache-{path}")}
        if path == "s3" and self.s3 is not None:
            env.update(AWS_ENDPOINT_URL=self.s3.endpoint, AWS_ACCESS_KEY_ID="bench",
                       AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1")
        return env

    def _vmrepo(self, path: str, *args: str) -> list[str]:
        return [self.vmrepo, "-r", self.location(path), "--config", str(self.cfg), *args]

    def init(self, path: str, chunk: str = "256K") -> None:
        env = {**os.environ, **self.env(path)}
        if path in OTHERS:
            shutil.rmtree(self.repo(path), ignore_errors=True)
            shutil.rmtree(self.work / ("borgbase" if path == "borg" else "restic-cache"),
                          ignore_errors=True)
            cmd = ["borg", "init", "--encryption", "none"] if path == "borg" else \
                ["restic", "init", "-q"]
        else:
            if path in ("qmp", "nbd") and (self.repo(path) / "config").exists():
                # The old repository's bitmaps would slow QEMU down for nothing.
                subprocess.run(self._vmrepo(path, "bitmaps", path, "--remove"), env=env,
                               check=True, stdout=subprocess.DEVNULL)
            shutil.rmtree(self.repo(path), ignore_errors=True)
            shutil.rmtree(self.work / f"cache-{path}", ignore_errors=True)
            self._s3_round += path == "s3"
            cmd = self._vmrepo(path, "init", "--chunk-size", chunk)
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)

    # -- phases ----------------------------------------------------------------

    def backup(self, path: str, phase: str) -> Result:
        before = dir_size(self.repo(path))
        os.sync()  # nobody pays for another's write-back
        if path == "borg":
            m = run_measured(["borg", "create", "--compression", "zstd,3", f"::{phase}",
                              self.raw.name], env=self.env(path), cwd=self.work)
        elif path == "restic":
            m = run_measured(["restic", "backup", "-q", "--compression", "auto",
                              self.raw.name], env=self.env(path), cwd=self.work)
        else:
            m = run_measured(self._vmrepo(path, "snapshot", path, "--json"),
                             env=self.env(path))
        r = Result(path, phase, m, dir_size(self.repo(path)) - before)
        if path in VMREPO_PATHS:
            doc = json.loads(m.stdout)
            tot = doc["totals"]
            r.extra = {"taken": sorted({d["taken"] for d in doc["disks"]}),
                       "read": tot["bytes_data"]}
            if path == "s3":
                r.added = tot["bytes_stored"] + tot["bytes_manifest"]
                r.extra["requests"] = sum(doc["storage_requests"][self.location(path)].values())
        self._say(r)
        return r

    def change(self, rnd: random.Random) -> int:
        """4 KiB writes into 1% of the 64 KiB blocks, the same bytes in the VM and the file."""
        blocks = sorted(rnd.sample(range(self.size // 65536), self.size // 65536 // 100))
        with open(self.raw, "r+b") as f:
            for b in blocks:
                pattern = rnd.randrange(1, 256)
                f.seek(b * 65536)
                f.write(bytes([pattern]) * 4096)
                if self.vm is not None:
                    self.vm.write(f"write -P {pattern} {b * 65536} 4k")
        if self.vm is not None:
            self.vm.write("flush")
        return len(blocks)

    def restore(self, path: str) -> Result:
        out = self.work / "restore"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        os.sync()
        extra: dict[str, object] = {}
        if path == "borg":
            arch = subprocess.run(["borg", "list", "--short", "--last", "1"],
                                  env={**os.environ, **self.env(path)}, check=True,
                                  capture_output=True, text=True).stdout.strip()
            m = run_measured(["borg", "extract", f"::{arch}"], env=self.env(path), cwd=out)
            got = out / self.raw.name
        elif path == "restic":
            m = run_measured(["restic", "restore", "latest", "-q", "--target", str(out)],
                             env=self.env(path))
            got = out / self.raw.name
        else:
            got = out / "disk0.raw"
            # Like restic and borg, without waiting for the disk (durable: restore_sync).
            m = run_measured(self._vmrepo(path, "restore", f"{path}@latest", "--disk", "disk0",
                                          "-o", str(got), "--json", "--no-sync"),
                             env=self.env(path))
            extra["requests"] = json.loads(m.stdout)["disks"][0]["requests"]
        same = subprocess.run(["cmp", "-s", str(got), str(self.raw)]).returncode == 0
        if not same:
            sys.exit(f"bench: the {path} restore differs from the disk")
        r = Result(path, "restore", m, 0, extra)
        self._say(r)
        shutil.rmtree(out, ignore_errors=True)
        return r

    def _say(self, r: Result) -> None:
        more = "".join(f"  {k} {v}" for k, v in r.extra.items())
        print(f"  {r.path:7} {r.phase:12} {r.m.seconds:7.2f} s  cpu {r.m.cpu:6.2f} s  peak rss "
              f"{human_bytes(r.m.max_rss):>10}  added {human_bytes(r.added):>10}{more}",
              flush=True)


def best(results: list[Result]) -> Result:
    return min(results, key=lambda r: r.m.seconds)


def report(b: Bench, table: dict[tuple[str, str], Result]) -> None:
    size = b.size
    print(f"\n{'path':8} {'phase':12} {'seconds':>8} {'disk/s':>11} {'added':>11} "
          f"{'peak rss':>10} {'vs borg':>8} {'vs restic':>9}")
    for phase in ("full", "incremental", "restore"):
        for path in b.paths:
            r = table.get((path, phase))
            if r is None:
                continue
            ratios = []
            for other in OTHERS:
                o = table.get((other, phase))
                ratios.append(f"x{o.m.seconds / r.m.seconds:5.2f}" if o else "-")
            print(f"{path:8} {phase:12} {r.m.seconds:8.2f} {human_bytes(size / r.m.seconds):>9}/s"
                  f" {human_bytes(r.added):>11} {human_bytes(r.m.max_rss):>10} "
                  f"{ratios[0]:>8} {ratios[1]:>9}")
    print("(ratios: the other tool's time over this path's time; above 1 means faster)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--rounds", type=int, default=2, help="runs per path (best counts)")
    ap.add_argument("--quick", action="store_true", help="a 192 MiB disk, one round")
    ap.add_argument("--skip", action="append", default=[], help="leave out a path")
    ap.add_argument("--keep", type=Path, help="work in DIR and keep it")
    args = ap.parse_args()
    size = parse_size(args.size)
    rounds = args.rounds
    if args.quick:
        size, rounds = 192 << 20, 1
    paths = [p for p in (*VMREPO_PATHS, *OTHERS) if p not in args.skip
             and (p in VMREPO_PATHS or shutil.which(p))]
    work = args.keep or Path(tempfile.mkdtemp(prefix="vmrepo-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    b = Bench(work, size, paths)
    try:
        b.prepare()
        table: dict[tuple[str, str], Result] = {}
        fulls: dict[str, list[Result]] = {p: [] for p in paths}
        for _ in range(rounds):
            for path in paths:  # taking turns; every full starts from an empty repository
                b.init(path)
                fulls[path].append(b.backup(path, "full"))
        for path in paths:
            table[(path, "full")] = best(fulls[path])
        n = b.change(random.Random(7))
        print(f"bench: {n} writes of 4 KiB into 1% of the 64 KiB blocks", flush=True)
        for path in paths:
            table[(path, "incremental")] = b.backup(path, "incremental")
        restores: dict[str, list[Result]] = {p: [] for p in paths}
        for _ in range(rounds):
            for path in paths:
                restores[path].append(b.restore(path))
        for path in paths:
            table[(path, "restore")] = best(restores[path])
        report(b, table)
    finally:
        b.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
