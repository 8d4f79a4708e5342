"""The benchmarks run end to end in their quick modes and report real figures.

``bench/bench.py --quick`` (every path but S3, which its own tests cover; borg and restic where
installed) and ``bench/scale_bench.py --quick`` run as the user would run them, against a real
paused QEMU VM; the tables they print are parsed back.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent
BENCH = TOP / "bench"
PHASES = ("full", "incremental", "restore")
VMREPO_PATHS = ("file", "plain", "file-key", "qmp", "qmp-plain", "qmp-key", "qmp-64k",
                "qmp-1m", "nbd", "nbd-plain")
QEMU_PATHS = ("qmp", "qmp-plain", "qmp-key", "qmp-64k", "qmp-1m", "nbd", "nbd-plain")

pytestmark = pytest.mark.slow


def run(script: str, *args: str, timeout: float = 300) -> str:
    res = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=TOP,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (f"{script} exited {res.returncode}\n"
                                 f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res.stdout


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in ``text``, as rows keyed by the header's cells."""
    found: list[list[dict[str, str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|:"):
            header = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("| "):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                assert len(cells) == len(header), lines[i]
                rows.append(dict(zip(header, cells, strict=True)))
                i += 1
            found.append(rows)
        else:
            i += 1
    return found


def positive(cell: str) -> float:
    value = float(cell)
    assert value > 0, cell
    return value


def test_bench_quick_runs_every_path(tmp_path: Path) -> None:
    others = [p for p in ("borg", "restic") if shutil.which(p)]
    for p in {"borg", "restic"} - set(others):
        warnings.warn(f"{p} is not installed: the benchmark ran without it", stacklevel=1)
    docs = tmp_path / "benchmarks.md"
    shutil.copy(TOP / "docs" / "benchmarks.md", docs)
    before = docs.read_text()
    out = run("bench.py", "--quick", "--skip", "s3", "--docs", str(docs))
    results, targets = tables(out)[:2]

    paths = [*VMREPO_PATHS, *others]
    rows = {(r["path"], r["phase"]): r for r in results}
    assert sorted(rows) == sorted((p, ph) for p in paths for ph in PHASES)
    for (path, phase), r in rows.items():
        positive(r["seconds"])
        positive(r["disk MiB/s"])
        positive(r["peak RSS MiB"])
        positive(r["CPU s"])
        assert 0 < float(r["cores busy %"]) <= 105, r  # CPU time is sampled at clock ticks
        if path in QEMU_PATHS and phase == "full":
            positive(r["QEMU CPU s"])
        elif path in QEMU_PATHS and phase == "incremental":
            # A quick incremental can take QEMU less than one clock tick (10 ms).
            assert float(r["QEMU CPU s"]) >= 0, r
        else:
            assert r["QEMU CPU s"] == "", r
        if phase != "restore":
            positive(r["added MiB"])
        if path in VMREPO_PATHS:
            if phase == "restore":
                positive(r["requests"])
            else:
                positive(r["read MiB"])
        for other in others:
            positive(r[f"vs {other}"])
    for path in QEMU_PATHS:  # incrementals through QEMU's bitmaps read only what changed
        assert float(rows[(path, "incremental")]["read MiB"]) < \
            float(rows[(path, "full")]["read MiB"]) / 4
    # The file source has no bitmap: it reads the whole disk again.
    assert rows[("file", "incremental")]["read MiB"] == rows[("file", "full")]["read MiB"]
    # Smaller chunks store less for the same small writes.
    assert float(rows[("qmp-64k", "incremental")]["added MiB"]) < \
        float(rows[("qmp", "incremental")]["added MiB"]) < \
        float(rows[("qmp-1m", "incremental")]["added MiB"])

    assert len(targets) == 19
    for t in targets:
        if "borg" in t["target"] and "borg" not in others or \
                "restic" in t["target"] and "restic" not in others:
            assert (t["measured"], t["verdict"]) == ("not measured", "-")
        else:
            assert t["verdict"] in ("met", "missed"), t
            positive(t["measured"].removesuffix(" MB"))
    assert "Encryption cost" in out
    # Each target on time is set beside the least time its CPU work allows.
    bounds = re.search(r"Least time with all \d+ cores busy throughout.*?: (.*)\.\n",
                       out)
    assert bounds, out
    on_time = [t for t in targets if "time" in t["target"] or "throughput" in t["target"]]
    measured = [t for t in on_time if t["verdict"] != "-"]
    assert len(re.findall(r"[\d.]+ s against [\d.]+ s \(took [\d.]+ s\)", bounds[1])) == \
        len(measured)

    text = docs.read_text()
    begin, end = "<!-- bench.py: begin -->", "<!-- bench.py: end -->"
    section = text.split(begin)[1].split(end)[0]
    assert "## Every path beside borg and restic" in section
    assert f"`python bench/bench.py --quick --skip s3 --docs {docs}`" in " ".join(section.split())
    assert "Machine: " in section and "QEMU " in section
    assert [len(t) for t in tables(section)] == [len(results), len(targets)]
    # What was outside the section is still there.
    if begin in before:
        head, tail = before.split(begin)[0], before.split(end)[1]
    else:
        head, _, rest = before.partition("## Every path beside borg and restic")
        after = re.search(r"^(## |<!-- )", rest, re.M)
        tail = rest[after.start():] if after else ""
    assert text.startswith(head) and text.endswith(tail.lstrip("\n"))


def test_bench_rounds_take_every_phase_again(tmp_path: Path) -> None:
    """Each round runs every phase of every path again, the incremental after writes of its
    own (borg's archives, restic's snapshots and the VM's bitmaps carry over the rounds)."""
    others = [p for p in ("borg", "restic") if shutil.which(p)]
    paths = ["file", "qmp", *others]
    out = run("bench.py", "--quick", "--rounds", "2", *(a for p in paths for a in ("--only", p)),
              "--no-docs")
    runs = re.findall(r"^  (\S+)\s+(full|incremental|restore)\s+([\d.]+) s", out, re.M)
    # Both rounds rewrite the same blocks: QEMU's bitmap names the same bytes each time.
    reads = re.findall(r"^  qmp\s+incremental .* read (\d+)", out, re.M)
    assert len(reads) == 2 and reads[0] == reads[1], reads
    assert sorted((p, ph) for p, ph, _ in runs) == sorted(
        (p, ph) for p in paths for ph in PHASES for _ in range(2))
    assert out.count("writes of 4 KiB into 1% of the 64 KiB blocks") == 2
    rows = {(r["path"], r["phase"]): r for r in tables(out)[0]}
    for path, phase in rows:  # the table keeps each path's best run
        best = min(float(s) for p, ph, s in runs if (p, ph) == (path, phase))
        assert float(rows[(path, phase)]["seconds"]) == pytest.approx(best, abs=0.006)
    assert float(rows[("qmp", "incremental")]["read MiB"]) < \
        float(rows[("qmp", "full")]["read MiB"]) / 4
    res = subprocess.run([sys.executable, str(BENCH / "bench.py"), "--rounds", "0"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--rounds: at least 1" in res.stderr


def test_scale_bench_quick() -> None:
    out = run("scale_bench.py", "--quick")
    assert "results written" not in out  # --quick writes no document by itself
    full, inc = tables(out)[:2]
    assert [r["source"] for r in full] == ["file", "qmp", "nbd"]
    for r in full:
        small, big = positive(r["64 MiB disk, s"]), positive(r["10 GiB sparse disk, s"])
        # The ratio is of the unrounded times; the times are shown to 0.01 s.
        assert float(r["10 GiB / 64 MiB"]) == pytest.approx(big / small, rel=0.05)
        assert r["verdict"] in ("met", "missed")
        # The holes of the large disk are not read: it has the small one's data.
        assert float(r["read from the 10 GiB disk, MiB"]) == pytest.approx(64, abs=1)
    assert [r["source"] for r in inc] == ["file", "qmp", "nbd"]
    for r in inc:
        assert r["new chunks"] == "100"
        assert r["taken"] == ("full" if r["source"] == "file" else "incremental")
        metadata = positive(r["metadata KiB"])
        assert positive(r["manifest blobs KiB"]) < metadata
        positive(r["index/ KiB"])
        positive(r["snapshots/ KiB"])
        assert float(r["data/ KiB"]) + float(r["index/ KiB"]) + float(r["snapshots/ KiB"]) \
            == pytest.approx(float(r["chunk data KiB"]) + metadata, abs=0.5)
        assert r["verdict"] == ("met" if metadata < 1024 else "missed")
    qmp = next(r for r in inc if r["source"] == "qmp")
    file = next(r for r in inc if r["source"] == "file")
    assert float(qmp["read KiB"]) < float(file["read KiB"]) / 4
