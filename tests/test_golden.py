"""The golden repository of format v1 must stay readable by every later version."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from .helpers import run_cli, run_json

GOLDEN = Path(__file__).parent / "golden" / "v1"


def test_golden_v1_restores_exactly(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(GOLDEN / "repo", repo)
    expected = json.loads((GOLDEN / "expected.json").read_text())
    listed = run_json("snapshots", "-r", str(repo))["snapshots"]
    assert [s["id"] for s in listed] == [e["id"] for e in expected]
    assert [s["tags"] for s in listed] == [["step0"], ["step1"]]
    for e in expected:
        out = tmp_path / f"{e['id'][:8]}.raw"
        run_cli("restore", f"golden@{e['id'][:8]}", "-r", str(repo), "--disk", "disk0",
                "-o", str(out))
        assert out.stat().st_size == e["size"]
        assert hashlib.sha256(out.read_bytes()).hexdigest() == e["disk0_sha256"]
