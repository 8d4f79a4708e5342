"""What the program imports is what its package declares: a module another package happens
to pull in (the test tools pull in many) would be missing from a plain install."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level modules outside the standard library and vmrepo, and the files importing
    each."""
    found: dict[str, set[str]] = {}
    for package in ("repo", "sources", "storage"):
        for path in (TOP / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "vmrepo":
                        found.setdefault(top, set()).add(str(path.relative_to(TOP)))
    return found


def _requirement_name(req: str) -> str:
    for stop in "<>=!~[; ":
        req = req.split(stop)[0]
    return req.strip().lower().replace("_", "-")


def test_every_imported_package_is_a_declared_dependency() -> None:
    project = tomllib.loads((TOP / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    optional = {_requirement_name(r) for r in project["optional-dependencies"]["libvirt"]}
    dists = packages_distributions()
    imports = _third_party_imports()
    assert {"cryptography", "boto3", "zstandard", "blake3"} <= set(imports)  # it looks
    missing = {}
    for module, files in sorted(imports.items()):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & (declared | optional):
            missing[module] = sorted(files)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
