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


def test_golden_v1_is_written_only_after_an_upgrade(tmp_path: Path) -> None:
    from vmrepo import exitcodes

    from .helpers import write_sample_image

    repo = tmp_path / "repo"
    shutil.copytree(GOLDEN / "repo", repo)
    write_sample_image(tmp_path / "new.raw", 2 << 20, seed=9)
    (tmp_path / "vmrepo.toml").write_text(
        f'repository = "{repo}"\n[vm.golden]\nsource = "file"\n'
        'disks = { disk0 = "new.raw" }\n')
    refused = run_cli("snapshot", "golden", cwd=tmp_path, check=False)
    assert refused.returncode == exitcodes.INCOMPATIBLE
    assert "vmrepo upgrade" in refused.stderr and "Traceback" not in refused.stderr
    upgraded = run_json("upgrade", cwd=tmp_path)
    assert (upgraded["changed"], upgraded["from"], upgraded["to"]) == (True, 1, 2)
    assert run_json("upgrade", cwd=tmp_path)["changed"] is False
    new = run_json("snapshot", "golden", cwd=tmp_path)
    expected = json.loads((GOLDEN / "expected.json").read_text())
    for e in expected:
        out = tmp_path / f"{e['id'][:8]}.raw"
        run_cli("restore", f"golden@{e['id'][:8]}", "--disk", "disk0", "-o", str(out),
                cwd=tmp_path)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == e["disk0_sha256"]
    out = tmp_path / "new-restored.raw"
    run_cli("restore", f"golden@{new['id'][:8]}", "--disk", "disk0", "-o", str(out),
            cwd=tmp_path)
    assert out.read_bytes() == (tmp_path / "new.raw").read_bytes()
