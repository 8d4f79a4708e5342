"""The documents that claim to describe the code agree with it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from vmrepo import exitcodes
from vmrepo.pack import PACK_MAGIC, TRAILER_MAGIC

DOCS = Path(__file__).parent.parent / "docs"


def test_exit_code_table_matches_the_code() -> None:
    text = (DOCS / "exit-codes.md").read_text()
    documented = {int(m) for m in re.findall(r"^\|\s*(\d+)\s*\|", text, re.M)}
    defined = {v for k, v in vars(exitcodes).items() if k.isupper() and isinstance(v, int)}
    assert documented == defined


def test_format_spec_names_the_magic_numbers() -> None:
    text = (DOCS / "format.md").read_text()
    assert PACK_MAGIC.decode() in text and TRAILER_MAGIC.decode() in text


def test_architecture_names_every_module() -> None:
    """Each package's section of docs/architecture.md names each of its modules."""
    text = (DOCS / "architecture.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    top = DOCS.parent
    missing = []
    for package in ("repo", "sources", "storage"):
        section = next(s for s in sections if f"(`{package}/`)" in s.splitlines()[0])
        for path in sorted((top / package).rglob("*.py")):
            rel = path.relative_to(top / package).as_posix()
            if not rel.endswith("__init__.py") and f"`{rel}`" not in section:
                missing.append(f"{package}/{rel}")
    assert missing == []


@pytest.mark.parametrize("document", ["README.md", "docs/operations.md"])
def test_every_command_block_runs_as_written(document: str, tmp_path: Path) -> None:
    import shutil
    import subprocess

    from . import docsrun

    if os.geteuid() != 0 or subprocess.run(["unshare", "--mount", "--pid", "--fork", "true"],
                                           capture_output=True).returncode != 0:
        pytest.skip("the sandbox needs root and private mount and PID namespaces")
    if not Path(docsrun.FAKETIME).exists() or not shutil.which("losetup"):
        pytest.skip("the sandbox needs libfaketime (Debian faketime) and losetup")
    results = docsrun.run(DOCS.parent / document, tmp_path)
    assert results, f"{document} has no command to run"
    failed = [f"{cmd!r} exited {code}:\n{out}" for cmd, code, out in results if code != 0]
    assert not failed, "\n\n".join(failed)
