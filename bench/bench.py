"""Every vmrepo data path beside restic and borg, on one disk, in one run.

Builds a disk image (default 2 GiB: a third random, a third text-like, a
third holes) as a raw file and as the qcow2 disk of a paused QEMU VM, then:

* full backups through vmrepo's file source, QMP push and NBD pull (each into
  an encrypted repository opened by passphrase, the default, and into one with
  ``--encryption none``; the file source and QMP push also into an encrypted
  one opened by a key file; QMP push also into repositories of 64 KiB and
  1 MiB chunks), borg (``--compression zstd,3``, no encryption) and restic,
  into fresh repositories, the tools taking turns, best of ``--rounds``;
* in each round, 4 KiB writes of new bytes into the same 1% of the 64 KiB blocks
  (through QEMU for the VM, the same bytes into the raw file), then an incremental
  backup with each (vmrepo through QEMU's bitmaps; restic, borg and the file
  source re-read), the tools taking turns, best of ``--rounds``;
* a restore of the latest snapshot with each, checked with ``cmp`` (the
  benchmark exits with status 1 if one differs), best of ``--rounds`` with the
  tools taking turns (vmrepo reports its request count);

and prints one markdown table with throughput, bytes read and stored, peak
memory, CPU time (QEMU's too) and the ratios against borg and restic, then the
targets (each ratio, met or missed), the least time each timed target's CPU
work allows with every core busy, and the cost of encryption. A run that
leaves out no path (no ``--skip`` or ``--only``) writes the same into
docs/benchmarks.md, between the markers
``<!-- bench.py: begin -->`` and ``<!-- bench.py: end -->`` (``--docs PATH``
elsewhere, ``--no-docs`` not at all; ``--quick`` writes only with ``--docs``).

    python bench/bench.py [--size 2G] [--rounds 2] [--quick] [--skip PATH] [--only PATH]
                          [--keep DIR] [--docs PATH | --no-docs]
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docsgen
from measure import Measured, dir_size, run_measured, vmrepo_bin

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qemuvm import BenchVM
from sampleimage import make_image
from vmrepo.units import human_bytes, parse_size

from tests.s3server import MotoServer  # noqa: E402 - the tests' loopback S3 endpoint

VMREPO_PATHS = ("file", "plain", "file-key", "qmp", "qmp-plain", "qmp-key", "qmp-64k",
                "qmp-1m", "nbd", "nbd-plain", "s3")
LOCAL_PATHS = tuple(p for p in VMREPO_PATHS if p != "s3")
#: vmrepo paths into repositories without encryption, as borg runs (the others encrypted).
PLAIN = ("plain", "qmp-plain", "nbd-plain")
#: Encrypted paths opened with a key file (``VMREPO_KEY_FILE``), the others by passphrase.
KEY_FILE = ("file-key", "qmp-key")
#: vmrepo paths reading the disk through the QEMU VM (their incrementals use its bitmaps).
QEMU_PATHS = ("qmp", "qmp-plain", "qmp-key", "qmp-64k", "qmp-1m", "nbd", "nbd-plain")
#: The source each vmrepo path reads (its VM's section in the config).
SOURCE = {p: "qmp" if p.startswith("qmp") else "nbd" if p.startswith("nbd") else "file"
          for p in VMREPO_PATHS}
#: Chunk sizes other than the default 256 KiB.
CHUNK = {"qmp-64k": "64K", "qmp-1m": "1M"}
OTHERS = ("borg", "restic")
PHASES = ("full", "incremental", "restore")
MiB = 1 << 20
#: The memory target, in bytes (MB, not MiB).
RSS_LIMIT = 200_000_000
CORES = len(os.sched_getaffinity(0))

LEGEND = {
    "file": "the file source reading the raw file",
    "plain": "the same into a repository without encryption (`init --encryption none`)",
    "file-key": "the file source into an encrypted repository opened with a key file "
                "(`VMREPO_KEY_FILE`: no scrypt) instead of a passphrase",
    "qmp-plain": "QMP push into a repository without encryption",
    "qmp-key": "QMP push into an encrypted repository opened with a key file",
    "nbd-plain": "NBD pull into a repository without encryption",
    "qmp": "QMP push (QEMU's backup job writes into vmrepo over NBD)",
    "qmp-64k": "QMP push into a repository of 64 KiB chunks",
    "qmp-1m": "QMP push into a repository of 1 MiB chunks",
    "nbd": "NBD pull (image fleecing)",
    "s3": "the file source into S3 (`moto_server` on loopback)",
    "borg": "`borg create --compression zstd,3`, no encryption",
    "restic": "`restic backup --compression auto`",
}


@dataclass
class Result:
    path: str
    phase: str
    m: Measured
    added: int = 0
    extra: dict[str, object] = field(default_factory=dict)
    #: QEMU's CPU seconds during the run (paths through the VM), beside the command's own.
    qemu_cpu: float = 0.0

    @property
    def cpu(self) -> float:
        return self.m.cpu + self.qemu_cpu

    def busy(self) -> float:
        """The share of the machine's cores the run kept busy (its CPU and QEMU's)."""
        return self.cpu / (self.m.seconds * CORES)


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
        #: Every measured run, best or not (the memory target covers them all).
        self.runs: list[Result] = []

    # -- set-up ----------------------------------------------------------------

    def prepare(self) -> None:
        print(f"bench: building a {human_bytes(self.size)} image in {self.work}", flush=True)
        make_image(self.raw, self.size, random.Random(42))
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(self.raw),
                        str(self.qcow2)], check=True)
        how = {"file": f'disks = {{ disk0 = "{self.raw}" }}\n',
               "qmp": f'socket = "{self.work}/vm.qmp"\ndisks = ["disk0"]\n',
               "nbd": f'socket = "{self.work}/vm.qmp"\ndisks = ["disk0"]\n'
                      f'scratch = "{self.work}"\nfleece_reserve = "256M"\n'}
        sections = [f'[vm.{p}]\nsource = "{SOURCE[p]}"\n{how[SOURCE[p]]}' for p in VMREPO_PATHS]
        self.cfg.write_text("".join(sections))
        (self.work / "passphrase").write_text("bench passphrase\n")
        if any(p in self.paths for p in QEMU_PATHS):
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
        env = {"VMREPO_CACHE_DIR": str(self.work / f"cache-{path}"), "VMREPO_KEY_FILE": "",
               "VMREPO_PASSWORD_COMMAND": ""}  # not the operator's own
        if path in KEY_FILE:
            env.update(VMREPO_KEY_FILE=str(self._key_file(path)), VMREPO_PASSWORD_FILE="")
        else:
            env["VMREPO_PASSWORD_FILE"] = str(self.work / "passphrase")
        if path == "s3" and self.s3 is not None:
            env.update(AWS_ENDPOINT_URL=self.s3.endpoint, AWS_ACCESS_KEY_ID="bench",
                       AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1")
        return env

    def _key_file(self, path: str) -> Path:
        return self.work / f"{path}.key"

    def _vmrepo(self, path: str, *args: str) -> list[str]:
        return [self.vmrepo, "-r", self.location(path), "--config", str(self.cfg), *args]

    def init(self, path: str) -> None:
        env = {**os.environ, **self.env(path)}
        if path in OTHERS:
            shutil.rmtree(self.repo(path), ignore_errors=True)
            shutil.rmtree(self.work / ("borgbase" if path == "borg" else "restic-cache"),
                          ignore_errors=True)
            cmd = ["borg", "init", "--encryption", "none"] if path == "borg" else \
                ["restic", "init", "-q"]
        else:
            if path in QEMU_PATHS and (self.repo(path) / "config").exists():
                # The old repository's bitmaps would slow QEMU down for nothing.
                subprocess.run(self._vmrepo(path, "bitmaps", path, "--remove"), env=env,
                               check=True, stdout=subprocess.DEVNULL)
            shutil.rmtree(self.repo(path), ignore_errors=True)
            shutil.rmtree(self.work / f"cache-{path}", ignore_errors=True)
            self._s3_round += path == "s3"
            cmd = self._vmrepo(path, "init", "--chunk-size", CHUNK.get(path, "256K"),
                               "--encryption", "none" if path in PLAIN else "aes-256-gcm")
        if path in KEY_FILE:  # made with a passphrase, then opened by the key file alone
            env = {**env, "VMREPO_PASSWORD_FILE": str(self.work / "passphrase"),
                   "VMREPO_KEY_FILE": ""}
            self._key_file(path).unlink(missing_ok=True)
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        if path in KEY_FILE:
            subprocess.run(self._vmrepo(path, "key", "add", "--key-file",
                                        str(self._key_file(path))),
                           env=env, check=True, stdout=subprocess.DEVNULL)

    # -- phases ----------------------------------------------------------------

    def backup(self, path: str, phase: str) -> Result:
        before = dir_size(self.repo(path))
        os.sync()  # nobody pays for another's write-back
        qemu_cpu = 0.0
        if path == "borg":
            # An archive's name is unique in its repository (an incremental per round).
            m = run_measured(["borg", "create", "--compression", "zstd,3",
                              f"::{phase}-{len(self.runs)}", self.raw.name],
                             env=self.env(path), cwd=self.work)
        elif path == "restic":
            m = run_measured(["restic", "backup", "-q", "--compression", "auto",
                              self.raw.name], env=self.env(path), cwd=self.work)
        else:
            vm = self.vm if path in QEMU_PATHS else None
            q0 = vm.cpu_seconds() if vm else 0.0
            m = run_measured(self._vmrepo(path, "snapshot", path, "--json"),
                             env=self.env(path))
            qemu_cpu = vm.cpu_seconds() - q0 if vm else 0.0
        r = Result(path, phase, m, dir_size(self.repo(path)) - before, qemu_cpu=qemu_cpu)
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

    def change(self, writes: dict[int, int]) -> int:
        """A 4 KiB write of byte ``pattern`` at the start of each 64 KiB ``block`` of
        ``writes`` ({block: pattern}), the same bytes in the VM and the file."""
        with open(self.raw, "r+b") as f:
            for b, pattern in sorted(writes.items()):
                f.seek(b * 65536)
                f.write(bytes([pattern]) * 4096)
                if self.vm is not None:
                    self.vm.write(f"write -P {pattern} {b * 65536} 4k")
        if self.vm is not None:
            self.vm.write("flush")
        return len(writes)

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
        self.runs.append(r)
        more = "".join(f"  {k} {v}" for k, v in r.extra.items())
        qemu = f" + qemu {r.qemu_cpu:.2f} s" if r.qemu_cpu else ""
        print(f"  {r.path:7} {r.phase:12} {r.m.seconds:7.2f} s  cpu {r.m.cpu:6.2f} s{qemu}  "
              f"peak rss {human_bytes(r.m.max_rss):>10}  added {human_bytes(r.added):>10}{more}",
              flush=True)


def rewrites(blocks: int, rnd: random.Random) -> Iterator[dict[int, int]]:
    """The writes of each round, {block: pattern}: the same 1% of ``blocks``, chosen at
    random, every round; each block's byte another than in the round before (one that came
    back would store nothing new)."""
    chosen = sorted(rnd.sample(range(blocks), blocks // 100))
    last: dict[int, int] = {}
    while True:
        # 1 to 255, never the block's last one: one of the 254 others, at random.
        last = {b: (last[b] + rnd.randrange(1, 255) - 1) % 255 + 1 if b in last
                else rnd.randrange(1, 256) for b in chosen}
        yield dict(last)


def turns(paths: list[str], r: int, rounds: int) -> list[str]:
    """The order of round ``r``: the paths take turns, each round starting elsewhere (the
    first run after other work is the slowest, whichever tool makes it)."""
    k = r * len(paths) // max(1, rounds)
    return paths[k:] + paths[:k]


def best(results: list[Result]) -> Result:
    return min(results, key=lambda r: r.m.seconds)


def best_of_rounds(paths: list[str], rounds: int, run: Callable[[str], Result],
                   before: Callable[[int], None] | None = None) -> dict[str, Result]:
    """Each path's best of ``rounds`` runs, the paths taking turns (:func:`turns`);
    ``before(r)`` runs ahead of round ``r``."""
    runs: dict[str, list[Result]] = {p: [] for p in paths}
    for r in range(rounds):
        if before is not None:
            before(r)
        for path in turns(paths, r, rounds):
            runs[path].append(run(path))
    return {p: best(rs) for p, rs in runs.items()}


# -- the report ------------------------------------------------------------------


def results_table(b: Bench, table: dict[tuple[str, str], Result]) -> str:
    header = ["path", "phase", "seconds", "disk MiB/s", "read MiB", "added MiB",
              "peak RSS MiB", "CPU s", "QEMU CPU s", "cores busy %", "vs borg", "vs restic",
              "requests"]
    rows = []
    for phase in PHASES:
        for path in b.paths:
            r = table.get((path, phase))
            if r is None:
                continue
            ratios = []
            for other in OTHERS:
                o = table.get((other, phase))
                ratios.append(f"{o.m.seconds / r.m.seconds:.2f}" if o else "")
            read = r.extra.get("read")
            rows.append([path, phase, f"{r.m.seconds:.2f}", f"{b.size / MiB / r.m.seconds:.1f}",
                         f"{int(read) / MiB:.1f}" if isinstance(read, int) else "",
                         f"{r.added / MiB:.2f}" if phase != "restore" else "",
                         f"{r.m.max_rss / MiB:.1f}", f"{r.m.cpu:.2f}",
                         f"{r.qemu_cpu:.2f}" if path in QEMU_PATHS and phase != "restore"
                         else "", f"{100 * r.busy():.0f}", *ratios,
                         str(r.extra.get("requests", ""))])
    return docsgen.md_table(header, rows, "ll")


@dataclass
class Target:
    what: str
    goal: str
    value: float | None  # None: not measured (a path was left out)
    met: bool = False
    shown: str = ""
    #: For a target on time: the run's seconds, the seconds the goal allows, and the least
    #: seconds its CPU time (with QEMU's) would take with every core busy throughout.
    timing: tuple[float, float, float] | None = None

    def row(self) -> list[str]:
        if self.value is None:
            return [self.what, "not measured", self.goal, "-"]
        return [self.what, self.shown or f"{self.value:.3g}", self.goal,
                "met" if self.met else "missed"]


def targets(b: Bench, table: dict[tuple[str, str], Result]) -> list[Target]:
    def t(path: str, phase: str) -> Result | None:
        return table.get((path, phase))

    out = []

    def faster(path: str, label: str, phase: str, other: str, goal: float) -> None:
        r, o = t(path, phase), t(other, phase)
        v = o.m.seconds / r.m.seconds if r and o else None
        out.append(Target(f"{label}: throughput over {other}'s", f"≥ {goal:g}", v,
                          v is not None and v >= goal,
                          timing=(r.m.seconds, o.m.seconds / goal, r.cpu / CORES)
                          if r and o else None))

    def fraction(path: str, label: str, what: str, other: str, goal: float) -> None:
        r, o = t(path, "incremental"), t(other, "incremental")
        v = None
        if r and o:
            v = (r.m.seconds / o.m.seconds if what == "time"
                 else r.added / o.added if o.added else float("inf"))
        out.append(Target(f"{label}: {what} over {other}'s", f"≤ {goal:g}", v,
                          v is not None and v <= goal,
                          timing=(r.m.seconds, o.m.seconds * goal, r.cpu / CORES)
                          if r and o and what == "time" else None))

    # Against borg (run without encryption): vmrepo encrypted, and without encryption as
    # borg; against restic (which always encrypts): opened by passphrase as restic is, and
    # by a key file, as an unattended host would run it.
    for path, plain, label, goal in (("qmp", "qmp-plain", "QMP push", 2.5),
                                     ("nbd", "nbd-plain", "NBD pull", 2.5),
                                     ("file", "plain", "file source", 3)):
        faster(path, f"full, {label}, encrypted", "full", "borg", goal)
        faster(plain, f"full, {label}, no encryption (as borg)", "full", "borg", goal)
    faster("file", "full, file source, passphrase", "full", "restic", 4)
    faster("file-key", "full, file source, key file", "full", "restic", 4)
    for path, label in (("qmp", "QMP push, passphrase"), ("nbd", "NBD pull, passphrase"),
                        ("qmp-key", "QMP push, key file")):
        fraction(path, f"incremental through QEMU ({label}, 256 KiB chunks)", "time",
                 "restic", 0.1)
    for path, label in (("qmp", "QMP push"), ("nbd", "NBD pull")):
        fraction(path, f"incremental through QEMU ({label}, 256 KiB chunks)", "added bytes",
                 "restic", 0.5)
    fraction("qmp-64k", "incremental through QEMU (QMP push, 64 KiB chunks)", "added bytes",
             "restic", 0.2)
    for path, label in (("file", "file source, passphrase"), ("qmp", "QMP push, passphrase"),
                        ("nbd", "NBD pull, passphrase"), ("qmp-key", "QMP push, key file")):
        faster(path, f"restore, {label}", "restore", "restic", 3)
    # The memory target covers the runs the targets name: every source at every chunk
    # size into a local repository; S3 (boto3 adds some 40 MB) is reported beside it.
    for label, paths in (("every local vmrepo run", LOCAL_PATHS), ("the S3 runs", ("s3",))):
        mine = [r for r in b.runs if r.path in paths]
        if not mine:
            continue
        worst = max(mine, key=lambda r: r.m.max_rss)
        over = sorted({f"{r.path} {r.phase}" for r in mine if r.m.max_rss >= RSS_LIMIT})
        out.append(Target(
            f"peak RSS of {label} ({len(mine)} runs; the largest: {worst.path} "
            f"{worst.phase}" + (f"; over the limit: {', '.join(over)}" if over else "") + ")",
            f"< {RSS_LIMIT // 1_000_000} MB", worst.m.max_rss / 1e6, not over,
            f"{worst.m.max_rss / 1e6:.1f} MB"))
    return out


def targets_table(ts: list[Target]) -> str:
    return docsgen.md_table(["target", "measured", "goal", "verdict"], [x.row() for x in ts],
                            "lrrl")


def cpu_bounds(ts: list[Target]) -> str | None:
    """For each target on time: the least time its CPU work allows beside the goal's."""
    parts = []
    for x in ts:
        if x.timing is not None:
            took, allowed, least = x.timing
            parts.append(f"{x.what.split(': ')[0]}: {least:.2f} s against {allowed:.2f} s "
                         f"(took {took:.2f} s)")
    if not parts:
        return None
    return (f"Least time with all {CORES} cores busy throughout (a run's CPU seconds, the "
            f"command's and QEMU's, over {CORES}), against the time each goal allows: "
            + "; ".join(parts) + ".")


def encryption_cost(table: dict[tuple[str, str], Result]) -> str | None:
    parts = []
    for phase in PHASES:
        enc, plain = table.get(("file", phase)), table.get(("plain", phase))
        if enc and plain:
            parts.append(f"{phase} {enc.m.seconds / plain.m.seconds:.2f} × the time "
                         f"({enc.m.cpu / plain.m.cpu:.2f} × the CPU)")
    if not parts:
        return None
    return ("Encryption cost (path `file`, aes-256-gcm, over path `plain`, no encryption): "
            + "; ".join(parts) + ".")


def legend(paths: list[str]) -> str:
    return ("Paths: " + "; ".join(f"`{p}` {LEGEND[p]}" for p in paths) + ". Every vmrepo "
            "repository but the `plain` ones is encrypted (aes-256-gcm) and opened by "
            "passphrase (scrypt, as restic's) unless its name says `key`, and of 256 KiB chunks "
            "unless its name says otherwise. Columns: wall seconds; the disk's size over that "
            "time; "
            "what vmrepo read from the source (an incremental through QEMU's bitmaps reads only "
            "what changed); the repository's growth; the command's peak RSS; its CPU seconds "
            "(user and system, all threads); QEMU's CPU seconds meanwhile (snapshots through "
            "the VM); the share of the machine's cores the two kept busy from the command's "
            "start to its end; the other tool's time over this one's (above 1: faster); "
            "storage requests of a restore (and of an S3 snapshot).")


def docs_section(b: Bench, rounds: int, writes: int, results: str, tgts: str,
                 notes: list[str]) -> str:
    para, cmd = docsgen.para, docsgen.command("bench.py")
    versions = docsgen.tool_versions()
    tools = []
    if "borg" in b.paths:
        tools.append(f"borg {versions.get('borg', '')} runs `create --compression zstd,3` "
                     "without encryption")
    if "restic" in b.paths:
        tools.append(f"restic {versions.get('restic', '')} `backup --compression auto`")
    parts = [
        "## Every path beside borg and restic",
        para(f"`{cmd}` builds a {human_bytes(b.size)} disk (a third random data, a third "
             "text-like data, a third holes) as a raw file and as the qcow2 disk of a paused "
             "QEMU VM, and runs with each path in turn: a full backup into a fresh repository "
             f"(best of {rounds}, the tools taking turns, each round starting elsewhere in "
             "the order), then in each round 4 KiB writes of new bytes into the same 1% of "
             f"the 64 KiB blocks ({writes} writes, through QEMU for the VM, the same bytes in "
             f"the raw file) and an incremental backup (best of {rounds}, the tools taking "
             "turns), "
             f"and a restore of the latest snapshot (best of {rounds}, checked with `cmp`). "
             + ("; ".join(tools) + ". " if tools else "")
             + "vmrepo's restores run with `--no-sync`, like restic's and borg's, which do not "
             "wait for the disk either. Each command runs in its own process, after a `sync`, "
             "timed from its start to its exit."),
        para(f"Machine: {docsgen.machine()}."),
        results,
        para(legend(b.paths)),
        para("Targets (a ratio of throughputs is the inverse ratio of the times, the disk "
             "being the same):"),
        tgts,
    ]
    parts += [para(n) for n in notes]
    parts.append(para(f"Command: `{cmd}` ({docsgen.today()})."))
    return "\n\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--rounds", type=int, default=None,
                    help="runs per path (best counts; default 2, with --quick 1)")
    ap.add_argument("--quick", action="store_true", help="a 192 MiB disk, one round unless "
                    "--rounds says otherwise")
    ap.add_argument("--skip", action="append", default=[], choices=(*VMREPO_PATHS, *OTHERS),
                    help="leave out a path")
    ap.add_argument("--only", action="append", default=[], choices=(*VMREPO_PATHS, *OTHERS),
                    help="run only this path (repeatable)")
    ap.add_argument("--keep", type=Path, help="work in DIR and keep it")
    ap.add_argument("--docs", type=Path, help="write the results into this document "
                    "(default for a run without --quick, --skip or --only: docs/benchmarks.md)")
    ap.add_argument("--no-docs", action="store_true", help="write no document")
    args = ap.parse_args()
    if args.rounds is not None and args.rounds < 1:
        ap.error("--rounds: at least 1")
    size = parse_size(args.size)
    rounds = args.rounds or (1 if args.quick else 2)
    if args.quick:
        size = 192 << 20
    docs = args.docs
    if docs is None and not (args.quick or args.skip or args.only or args.no_docs):
        docs = docsgen.DEFAULT_DOCS
    if args.no_docs:
        docs = None
    wanted = [p for p in (*VMREPO_PATHS, *OTHERS) if p not in args.skip
              and (not args.only or p in args.only)]
    paths = [p for p in wanted if p in VMREPO_PATHS or shutil.which(p)]
    if not paths:
        ap.error("no path left to run (--only and --skip leave none, or borg and restic are "
                 "not installed)")
    missing = [p for p in OTHERS if p in wanted and p not in paths]
    if missing:
        print(f"bench: {' and '.join(missing)} not installed, left out", flush=True)
    work = args.keep or Path(tempfile.mkdtemp(prefix="vmrepo-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    b = Bench(work, size, paths)
    try:
        b.prepare()
        table: dict[tuple[str, str], Result] = {}

        def full(path: str) -> Result:
            b.init(path)  # every full starts from an empty repository
            return b.backup(path, "full")

        # Every round writes new bytes into the same 1% of the blocks, and every tool backs
        # that up: one incremental is one sample, as noisy as one full. The latest snapshot
        # then differs from the full in that 1% alone, as after a single round.
        plan = rewrites(b.size // 65536, random.Random(7))
        writes = 0

        def change(_round: int) -> None:
            nonlocal writes
            writes = b.change(next(plan))
            print(f"bench: {writes} writes of 4 KiB into 1% of the 64 KiB blocks", flush=True)

        phases = {"full": (full, None),
                  "incremental": (lambda path: b.backup(path, "incremental"), change),
                  "restore": (b.restore, None)}
        for phase, (run, before) in phases.items():
            for path, result in best_of_rounds(paths, rounds, run, before).items():
                table[(path, phase)] = result
        results = results_table(b, table)
        ts = targets(b, table)
        tgts = targets_table(ts)
        notes = [n for n in (cpu_bounds(ts), encryption_cost(table)) if n]
        print(f"\n{results}\n(vs borg, vs restic: the other tool's time over this path's; "
              f"above 1 means faster)\n\ntargets:\n{tgts}")
        for note in notes:
            print(f"\n{note}")
        if docs is not None:
            docsgen.write_section(docs, "bench.py",
                                  docs_section(b, rounds, writes, results, tgts, notes),
                                  replaces="Every path beside borg and restic")
            print(f"\nbench: results written into {docs}", flush=True)
    finally:
        b.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
