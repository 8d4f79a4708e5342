"""Scale: a large sparse disk against a small one holding the same data, and the metadata of an
incremental snapshot of the large one.

Builds 1 GiB of the benchmark's data (bench/sampleimage.py: 64 pieces of
16 MiB, alternately random and text-like) as

* a 1 GiB disk holding the pieces end to end, and
* a 100 GiB sparse disk holding the same pieces at spread offsets (piece i
  at i x 1.5625 GiB), the rest holes,

each as a raw file and as a qcow2 image, both images attached to one paused
QEMU VM (nodes ``small`` and ``big``). Through each source (``file`` reads
the raw files; ``qmp`` and ``nbd`` the VM's disks), a full snapshot of each
disk into a fresh repository (256 KiB chunks, encrypted), best of
``--rounds``, the sources taking turns; the ratio of the large disk's time
to the small one's (target: at most 2).

Then 4 KiB writes into 100 distinct chunks spread across the large disk
(through QEMU for the VM, the same bytes into the raw file) and an
incremental snapshot of it through each source, reporting the metadata it
wrote: the repository's growth minus the chunk data (``bytes_stored``), that
is manifest pages and root (``bytes_manifest``), pack headers, index
segments and the snapshot record, with the growth of each top-level
directory (target: under 1 MiB).

A run without ``--quick`` writes the results into docs/benchmarks.md between
``<!-- scale_bench.py: begin -->`` and ``<!-- scale_bench.py: end -->``
(``--docs PATH`` elsewhere, ``--no-docs`` not at all). ``--quick``: 64 MiB of
data, a 10 GiB sparse disk, one round (writes only with ``--docs``).

    python bench/scale_bench.py [--data 1G] [--sparse 100G] [--rounds 2] [--quick]
                                [--skip SOURCE] [--keep DIR] [--docs PATH | --no-docs]
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
from dataclasses import dataclass
from pathlib import Path

import docsgen
from measure import Measured, run_measured, vmrepo_bin

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qemuvm import BenchVM
from sampleimage import sample_data
from vmrepo.units import human_bytes, parse_size

SOURCES = ("file", "qmp", "nbd")
DISKS = ("small", "big")
PIECES = 64
CHUNK = 256 << 10
CHANGES = 100
#: The targets: the large disk's full snapshot time over the small one's, and the metadata of
#: the incremental snapshot.
TIME_RATIO = 2.0
METADATA_LIMIT = 1 << 20
KiB, MiB = 1 << 10, 1 << 20


def size_label(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{n} B"


def tree_sizes(path: Path) -> dict[str, int]:
    """Bytes of the files under each top-level directory of a repository (files at the top
    count under their own name)."""
    out: dict[str, int] = {}
    for p in path.rglob("*"):
        if p.is_file():
            top = p.relative_to(path).parts[0]
            out[top] = out.get(top, 0) + p.stat().st_size
    return out


@dataclass
class Full:
    source: str
    disk: str
    m: Measured
    read: int
    zero: int


@dataclass
class Incremental:
    source: str
    m: Measured
    totals: dict[str, int]
    taken: list[str]
    growth: dict[str, int]

    @property
    def metadata(self) -> int:
        return sum(self.growth.values()) - self.totals["bytes_stored"]


class Scale:
    def __init__(self, work: Path, data: int, sparse: int, sources: list[str]) -> None:
        self.work = work
        self.data = data
        self.sparse = sparse
        self.sources = sources
        self.piece = data // PIECES
        self.spacing = sparse // PIECES // MiB * MiB
        if self.piece % (64 << 10) or self.spacing < self.piece:
            sys.exit("scale: the data must be a multiple of 4 MiB, the sparse disk 64 times "
                     "larger at least")
        self.sizes = {"small": data, "big": sparse}
        self.raw = {d: work / f"{d}.raw" for d in DISKS}
        self.qcow2 = {d: work / f"{d}.qcow2" for d in DISKS}
        self.cfg = work / "vmrepo.toml"
        self.vm: BenchVM | None = None
        self.vmrepo = vmrepo_bin()

    def prepare(self) -> None:
        print(f"scale: writing {size_label(self.data)} of data into a {size_label(self.data)} "
              f"disk and a {size_label(self.sparse)} sparse disk in {self.work}", flush=True)
        rnd = random.Random(42)
        with open(self.raw["small"], "wb") as small, open(self.raw["big"], "wb") as big:
            small.truncate(self.data)
            big.truncate(self.sparse)
            for i in range(PIECES):
                piece = sample_data(rnd, self.piece, text=i % 2 == 1)
                small.write(piece)
                big.seek(i * self.spacing)
                big.write(piece)
        for d in DISKS:
            subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2",
                            str(self.raw[d]), str(self.qcow2[d])], check=True)
        sections = []
        for d in DISKS:
            sections.append(f'[vm.file-{d}]\nsource = "file"\n'
                            f'disks = {{ disk0 = "{self.raw[d]}" }}\n')
            sections.append(f'[vm.qmp-{d}]\nsource = "qmp"\nsocket = "{self.work}/vm.qmp"\n'
                            f'disks = ["{d}"]\n')
            sections.append(f'[vm.nbd-{d}]\nsource = "nbd"\nsocket = "{self.work}/vm.qmp"\n'
                            f'disks = ["{d}"]\nscratch = "{self.work}"\n'
                            'fleece_reserve = "256M"\n')
        self.cfg.write_text("".join(sections))
        (self.work / "passphrase").write_text("scale passphrase\n")
        if "qmp" in self.sources or "nbd" in self.sources:
            self.vm = BenchVM(self.work, self.qcow2).start()

    def close(self) -> None:
        if self.vm is not None:
            self.vm.stop()

    def repo(self, vm: str) -> Path:
        return self.work / f"repo-{vm}"

    def env(self, vm: str) -> dict[str, str]:
        return {"VMREPO_CACHE_DIR": str(self.work / f"cache-{vm}"),
                "VMREPO_PASSWORD_FILE": str(self.work / "passphrase")}

    def _vmrepo(self, vm: str, *args: str) -> list[str]:
        return [self.vmrepo, "-r", str(self.repo(vm)), "--config", str(self.cfg), *args]

    def init(self, vm: str) -> None:
        env = {**os.environ, **self.env(vm)}
        if not vm.startswith("file") and (self.repo(vm) / "config").exists():
            subprocess.run(self._vmrepo(vm, "bitmaps", vm, "--remove"), env=env, check=True,
                           stdout=subprocess.DEVNULL)
        shutil.rmtree(self.repo(vm), ignore_errors=True)
        shutil.rmtree(self.work / f"cache-{vm}", ignore_errors=True)
        subprocess.run(self._vmrepo(vm, "init", "--chunk-size", str(CHUNK)), env=env,
                       check=True, stdout=subprocess.DEVNULL)

    def snapshot(self, vm: str) -> tuple[Measured, dict[str, object]]:
        os.sync()
        m = run_measured(self._vmrepo(vm, "snapshot", vm, "--json"), env=self.env(vm))
        return m, json.loads(m.stdout)

    def full(self, source: str, disk: str) -> Full:
        vm = f"{source}-{disk}"
        self.init(vm)
        m, doc = self.snapshot(vm)
        tot = doc["totals"]
        assert isinstance(tot, dict)
        f = Full(source, disk, m, int(tot["bytes_data"]), int(tot["bytes_zero"]))
        print(f"  {source:4} {size_label(self.sizes[disk]):>8} full  {m.seconds:7.2f} s  "
              f"cpu {m.cpu:6.2f} s  peak rss {human_bytes(m.max_rss):>10}  read "
              f"{human_bytes(f.read):>10}  zero {human_bytes(f.zero):>10}", flush=True)
        return f

    def change(self) -> list[int]:
        """4 KiB into each of ``CHANGES`` distinct chunks spread across the large disk, each
        with its own byte (so that no two new chunks are equal), in the VM and the raw file."""
        step = self.sparse // CHANGES // CHUNK * CHUNK
        offsets = [j * step + (j * 7 % (CHUNK // 4096)) * 4096 for j in range(CHANGES)]
        with open(self.raw["big"], "r+b") as f:
            for j, off in enumerate(offsets):
                f.seek(off)
                f.write(bytes([j + 1]) * 4096)
                if self.vm is not None:
                    self.vm.write(f"write -P {j + 1} {off} 4k", node="big")
        if self.vm is not None:
            self.vm.write("flush", node="big")
        return offsets

    def incremental(self, source: str) -> Incremental:
        vm = f"{source}-big"
        before = tree_sizes(self.repo(vm))
        m, doc = self.snapshot(vm)
        after = tree_sizes(self.repo(vm))
        growth = {k: after.get(k, 0) - before.get(k, 0) for k in sorted({*before, *after})}
        tot = doc["totals"]
        disks = doc["disks"]
        assert isinstance(tot, dict) and isinstance(disks, list)
        r = Incremental(source, m, {k: int(v) for k, v in tot.items()},
                        sorted({d["taken"] for d in disks}), growth)
        print(f"  {source:4} incremental {m.seconds:7.2f} s  cpu {m.cpu:6.2f} s  peak rss "
              f"{human_bytes(m.max_rss):>10}  taken {','.join(r.taken)}  read "
              f"{human_bytes(tot['bytes_data'])}  chunks new {tot['chunks_new']}  stored "
              f"{human_bytes(tot['bytes_stored'])}  manifest {human_bytes(tot['bytes_manifest'])}"
              f"  growth {growth}  metadata {human_bytes(r.metadata)}", flush=True)
        return r


def full_table(s: Scale, fulls: dict[tuple[str, str], Full]) -> tuple[str, list[bool]]:
    small, big = size_label(s.data), size_label(s.sparse)
    header = ["source", f"{small} disk, s", f"{big} sparse disk, s", f"{big} / {small}",
              "goal", "verdict", f"CPU s, {small} / {big}", f"peak RSS MiB, {small} / {big}",
              f"read from the {big} disk, MiB"]
    rows, verdicts = [], []
    for source in s.sources:
        a, b = fulls[(source, "small")], fulls[(source, "big")]
        ratio = b.m.seconds / a.m.seconds
        verdicts.append(ratio <= TIME_RATIO)
        rows.append([source, f"{a.m.seconds:.2f}", f"{b.m.seconds:.2f}", f"{ratio:.2f}",
                     f"≤ {TIME_RATIO:g}", "met" if ratio <= TIME_RATIO else "missed",
                     f"{a.m.cpu:.2f} / {b.m.cpu:.2f}",
                     f"{a.m.max_rss / MiB:.1f} / {b.m.max_rss / MiB:.1f}", f"{b.read / MiB:.1f}"])
    return docsgen.md_table(header, rows, "lrrrrl"), verdicts


def incremental_table(s: Scale, incs: dict[str, Incremental]) -> tuple[str, list[bool]]:
    others = sorted({k for r in incs.values() for k, v in r.growth.items()
                     if v and k not in ("data", "index", "snapshots")})
    header = ["source", "taken", "seconds", "read KiB", "new chunks", "chunk data KiB",
              "manifest blobs KiB", "data/ KiB", "index/ KiB", "snapshots/ KiB",
              *(f"{k}/ KiB" for k in others), "metadata KiB", "goal", "verdict"]
    rows, verdicts = [], []
    for source in s.sources:
        r = incs[source]
        t, g = r.totals, r.growth
        ok = r.metadata < METADATA_LIMIT
        verdicts.append(ok)
        rows.append([source, ",".join(r.taken), f"{r.m.seconds:.2f}",
                     f"{t['bytes_data'] / KiB:.1f}", str(t["chunks_new"]),
                     f"{t['bytes_stored'] / KiB:.1f}", f"{t['bytes_manifest'] / KiB:.1f}",
                     *(f"{g.get(k, 0) / KiB:.1f}" for k in ("data", "index", "snapshots", *others)),
                     f"{r.metadata / KiB:.1f}", "< 1024", "met" if ok else "missed"])
    return docsgen.md_table(header, rows, "ll" + "r" * (len(header) - 3) + "l"), verdicts


def docs_section(s: Scale, rounds: int, full: str, inc: str) -> str:
    para, cmd = docsgen.para, docsgen.command("scale_bench.py")
    small, big = size_label(s.data), size_label(s.sparse)
    return "\n\n".join([
        "## Scale: a large sparse disk, and the metadata of an incremental",
        para(f"`{cmd}` writes {small} of the benchmark's data ({PIECES} pieces of "
             f"{size_label(s.piece)}, alternately random and text-like) into a {small} disk, end "
             f"to end, and into a {big} sparse disk, piece i at i × {size_label(s.spacing)}, the "
             "rest holes; each disk is a raw file and a qcow2 image of one paused QEMU VM. "
             "Through each source (`file` reads the raw files, `qmp` and `nbd` the VM's disks) "
             "it takes a full snapshot of each disk into a fresh, encrypted repository of "
             f"256 KiB chunks (best of {rounds}, the sources taking turns), each command in "
             "its own process after a `sync`:"),
        full,
        para(f"Then it writes 4 KiB into each of {CHANGES} distinct chunks spread across the "
             f"{big} disk (each its own byte; through QEMU for the VM, the same bytes into the "
             "raw file) and takes an incremental snapshot of it through each source (the file "
             "source re-reads the allocated data, QMP and NBD read what QEMU's bitmap names). "
             "The metadata is what the snapshot added to the repository besides chunk data "
             "(`bytes_stored`): the manifest pages and root (`bytes_manifest`), pack headers "
             "(both in `data/`), index segments and the snapshot record:"),
        inc,
        para(f"Machine: {docsgen.machine()}."),
        para(f"Command: `{cmd}` ({docsgen.today()})."),
    ]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="1G", help="data on each disk, and the small disk's size")
    ap.add_argument("--sparse", default="100G", help="the sparse disk's size")
    ap.add_argument("--rounds", type=int, default=2, help="full snapshots per disk (best counts)")
    ap.add_argument("--quick", action="store_true",
                    help="64 MiB of data, a 10 GiB sparse disk, one round")
    ap.add_argument("--skip", action="append", default=[], choices=SOURCES,
                    help="leave out a source")
    ap.add_argument("--keep", type=Path, help="work in DIR and keep it")
    ap.add_argument("--docs", type=Path, help="write the results into this document "
                    "(default for a run without --quick or --skip: docs/benchmarks.md)")
    ap.add_argument("--no-docs", action="store_true", help="write no document")
    args = ap.parse_args()
    data, sparse, rounds = parse_size(args.data), parse_size(args.sparse), args.rounds
    if args.quick:
        data, sparse, rounds = 64 << 20, 10 << 30, 1
    docs = args.docs
    if docs is None and not (args.quick or args.skip or args.no_docs):
        docs = docsgen.DEFAULT_DOCS
    if args.no_docs:
        docs = None
    sources = [x for x in SOURCES if x not in args.skip]
    work = args.keep or Path(tempfile.mkdtemp(prefix="vmrepo-scalebench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    s = Scale(work, data, sparse, sources)
    try:
        s.prepare()
        runs: dict[tuple[str, str], list[Full]] = {}
        for _ in range(rounds):
            for source in sources:
                for disk in DISKS:
                    runs.setdefault((source, disk), []).append(s.full(source, disk))
        fulls = {k: min(v, key=lambda f: f.m.seconds) for k, v in runs.items()}
        s.change()
        print(f"scale: {CHANGES} writes of 4 KiB into distinct chunks of the "
              f"{size_label(sparse)} disk", flush=True)
        incs = {source: s.incremental(source) for source in sources}
        full, full_ok = full_table(s, fulls)
        inc, inc_ok = incremental_table(s, incs)
        print(f"\nfull snapshots:\n{full}\n\nincremental snapshot of the {size_label(sparse)} "
              f"disk after {CHANGES} changed chunks:\n{inc}")
        print(f"\ntargets: {size_label(sparse)} / {size_label(data)} time ≤ {TIME_RATIO:g} "
              f"through every source: {'met' if all(full_ok) else 'missed'}; incremental "
              f"metadata < 1 MiB through every source: {'met' if all(inc_ok) else 'missed'}")
        if docs is not None:
            docsgen.write_section(docs, "scale_bench.py", docs_section(s, rounds, full, inc),
                                  after="bench.py",
                                  after_heading="Every path beside borg and restic")
            print(f"\nscale: results written into {docs}", flush=True)
    finally:
        s.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
