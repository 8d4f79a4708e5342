"""The TOML configuration: repository location and VM definitions.

Looked up in order: ``--config``, ``$VMREPO_CONFIG``, ``./vmrepo.toml``,
``~/.config/vmrepo/config.toml``, ``/etc/vmrepo/config.toml``. A file named
explicitly must exist; otherwise a missing file just means no VMs defined.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .spec import VM_NAME_RE

SEARCH_PATH = (
    Path("vmrepo.toml"),
    Path("~/.config/vmrepo/config.toml"),
    Path("/etc/vmrepo/config.toml"),
)


@dataclass
class Settings:
    path: Path | None = None
    repository: str | None = None
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Settings for the repository's storage backend (``[storage]``: endpoint, region, ...).
    storage: dict[str, Any] = field(default_factory=dict)

    def vm(self, name: str) -> dict[str, Any]:
        """The table of VM ``name``; ConfigError naming the known VMs otherwise."""
        if name not in self.vms:
            where = f" in {self.path}" if self.path else " (no config file found)"
            known = ", ".join(sorted(self.vms)) or "none"
            raise ConfigError(f"unknown VM {name!r}{where}; defined VMs: {known}",
                              str(self.path) if self.path else None)
        return self.vms[name]


def find_config(explicit: str | None, env: Mapping[str, str] = os.environ) -> Path | None:
    if explicit:
        return Path(explicit)
    if env.get("VMREPO_CONFIG"):
        return Path(env["VMREPO_CONFIG"])
    for candidate in SEARCH_PATH:
        path = candidate.expanduser()
        if path.is_file():
            return path
    return None


def load_settings(explicit: str | None, env: Mapping[str, str] = os.environ) -> Settings:
    path = find_config(explicit, env)
    if path is None:
        return Settings()
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}", str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}", str(path)) from exc
    repo = doc.get("repository")
    if repo is not None and not isinstance(repo, str):
        raise ConfigError(f"config file {path}: repository must be a string", str(path))
    vms = doc.get("vm", {})
    if not isinstance(vms, dict):
        raise ConfigError(f"config file {path}: [vm.NAME] tables expected", str(path))
    for name, table in vms.items():
        if not VM_NAME_RE.fullmatch(name) or not isinstance(table, dict):
            raise ConfigError(f"config file {path}: invalid VM entry {name!r}", str(path))
        if not isinstance(table.get("source"), str):
            raise ConfigError(f"config file {path}: vm {name} needs source = \"...\"", str(path))
    if repo is not None and not repo.startswith(("/", "~")) and "://" not in repo:
        repo = str((path.parent / repo).absolute())
    storage = doc.get("storage", {})
    if not isinstance(storage, dict):
        raise ConfigError(f"config file {path}: [storage] must be a table", str(path))
    return Settings(path, os.path.expanduser(repo) if repo else None, vms, storage)
