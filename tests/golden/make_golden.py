"""Writes the golden repository of format v1 (run once; the result is committed).

The golden repository MUST NOT be regenerated once committed: it is what
later versions prove they can still read. A new format version adds its own
golden directory beside this one.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

from vmrepo.backup import SnapshotOptions, take_snapshot
from vmrepo.config import RepoConfig
from vmrepo.repository import Repository
from vmrepo.sources.file import FileSource
from vmrepo.storage.local import LocalBackend


def main(target: Path) -> None:
    rnd = random.Random(1)
    work = target / "work"
    work.mkdir(parents=True)
    disk = work / "disk0.raw"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
        f.write(rnd.randbytes(100_000))
        f.seek(300_000)
        f.write(b"golden repository of vmrepo format v1\n" * 2000)
        f.seek((1 << 20) - 5000)
        f.write(rnd.randbytes(5000))
    cfg = RepoConfig.new(chunk_size=64 << 10, pack_size=128 << 10)
    repo = Repository.init(LocalBackend(target / "repo", create=True), cfg)
    expected = []
    for step in range(2):
        snap = take_snapshot(repo, FileSource("golden", {"disk0": str(disk)}),
                             SnapshotOptions(vm="golden", tags=[f"step{step}"]))
        expected.append({"id": snap.id, "disk0_sha256": hashlib.sha256(disk.read_bytes())
                         .hexdigest(), "size": disk.stat().st_size})
        with open(disk, "r+b") as f:
            f.seek(70_000)
            f.write(rnd.randbytes(4096))
            f.seek(500_000)
            f.write(bytes(65536))
    (target / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    for p in work.iterdir():
        p.unlink()
    work.rmdir()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
