"""The TOML configuration: repository location and VM definitions.

Looked up in order (:mod:`vmrepo.configfile`): ``--config``, ``$VMREPO_CONFIG``,
``./vmrepo.toml``, ``~/.config/vmrepo/config.toml``, ``/etc/vmrepo/config.toml``. A file
named explicitly must exist; otherwise a missing file just means no VMs defined.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .configfile import find_config
from .errors import ConfigError
from .retention import Policy
from .spec import VM_NAME_RE

#: Keys of the config file's top level, and the core's own keys of a VM's table.
TOP_KEYS = frozenset({"repository", "vm", "storage", "remote", "keep"})
CORE_VM_KEYS = frozenset({"source", "keep"})
#: The core's own keys of a ``[remote.NAME]`` table (the rest are storage settings).
REMOTE_KEYS = frozenset({"repository", "keep", "password_file", "password_command",
                         "key_file"})


@dataclass
class Settings:
    path: Path | None = None
    repository: str | None = None
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Settings for the repository's storage backend (``[storage]``: endpoint, region, ...).
    storage: dict[str, Any] = field(default_factory=dict)
    #: Other repositories by name (``[remote.NAME]``: ``repository`` and storage settings).
    remotes: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The retention policy of VMs without their own (top-level ``keep``).
    keep: Policy | None = None

    def policy(self, vm: str) -> Policy | None:
        """The retention policy of ``vm``'s snapshots: its own ``keep``, else the top-level
        one, else None."""
        table = self.vms.get(vm, {})
        if "keep" in table:
            return self._policy(table["keep"], f"[vm.{vm}] keep")
        return self.keep

    def remote_policy(self, name: str) -> Policy | None:
        """The retention policy a ``[remote.NAME]`` applies after each copy, if any."""
        table = self.remotes.get(name, {})
        return self._policy(table["keep"], f"[remote.{name}] keep") if "keep" in table else None

    def _policy(self, table: Any, where: str) -> Policy:
        return parse_policy(table, where, self.path)

    def location(self, name_or_url: str) -> tuple[str, dict[str, Any]]:
        """A remote's repository URL and storage settings, or a URL or path as it is."""
        remote = self.remotes.get(name_or_url)
        if remote is None:
            return name_or_url, {}
        options = {k: v for k, v in remote.items() if k not in REMOTE_KEYS}
        return str(remote["repository"]), options

    def vm(self, name: str) -> dict[str, Any]:
        """The table of VM ``name``; ConfigError naming the known VMs otherwise."""
        if name not in self.vms:
            where = f" in {self.path}" if self.path else " (no config file found)"
            known = ", ".join(sorted(self.vms)) or "none"
            raise ConfigError(f"unknown VM {name!r}{where}; defined VMs: {known}",
                              str(self.path) if self.path else None)
        return self.vms[name]

    def check_vm(self, name: str, plugin_keys: frozenset[str]) -> None:
        """Refuse keys in VM ``name``'s table that neither the core nor its source knows."""
        check_keys(self.vms[name], CORE_VM_KEYS | plugin_keys, f"[vm.{name}]", self.path)


def check_keys(table: Mapping[str, Any], allowed: frozenset[str], where: str,
               path: Path | None) -> None:
    """ConfigError naming the first unknown key of ``table`` and the nearest known one."""
    for key in table:
        if key in allowed:
            continue
        near = difflib.get_close_matches(str(key), sorted(allowed), n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else \
            f"; known keys: {', '.join(sorted(allowed)) or 'none'}"
        origin = f"config file {path}: " if path else ""
        raise ConfigError(f"{origin}{where}: unknown key {key!r}{hint}",
                          str(path) if path else None)


def parse_policy(table: Any, where: str, path: Path | None) -> Policy:
    """A ``keep = { daily = 7, ... }`` table as a policy; ConfigError saying what is wrong."""
    origin = f"config file {path}: " if path else ""
    if not isinstance(table, dict):
        raise ConfigError(f"{origin}{where}: expected a table such as "
                          "{ daily = 7, weekly = 5, monthly = 12 }", str(path) if path else None)
    try:
        policy = Policy.from_mapping(table)
    except ValueError as exc:
        raise ConfigError(f"{origin}{where}: {exc}", str(path) if path else None) from None
    if policy.empty:
        raise ConfigError(f"{origin}{where}: no keep rule (every count is 0)",
                          str(path) if path else None)
    return policy


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
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start} is "
                          f"{exc.object[exc.start]:#04x})", str(path)) from None
    check_keys(doc, TOP_KEYS, "top level", path)
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
    remotes = doc.get("remote", {})
    if not isinstance(remotes, dict) or not all(isinstance(t, dict) for t in remotes.values()):
        raise ConfigError(f"config file {path}: [remote.NAME] tables expected", str(path))
    for name, table in remotes.items():
        if not isinstance(table.get("repository"), str) or not table["repository"]:
            raise ConfigError(f"config file {path}: remote {name} needs repository = \"...\"",
                              str(path))
        if "://" not in table["repository"] and not table["repository"].startswith("/"):
            table["repository"] = str((path.parent / table["repository"]).absolute())
        for secret in ("password_file", "password_command"):
            if not isinstance(table.get(secret, ""), str):
                raise ConfigError(f"config file {path}: remote {name}: {secret} must be a "
                                  "string", str(path))
        if "key_file" in table:  # like its repository, relative to the config file
            if not isinstance(table["key_file"], str) or not table["key_file"]:
                raise ConfigError(f"config file {path}: remote {name}: key_file must be a "
                                  "non-empty string", str(path))
            table["key_file"] = str((path.parent / os.path.expanduser(table["key_file"]))
                                    .absolute())
    settings = Settings(path, os.path.expanduser(repo) if repo else None, vms, storage, remotes,
                        parse_policy(doc["keep"], "keep", path) if "keep" in doc else None)
    for name in vms:  # a bad policy is reported when the file is read, not when used
        settings.policy(name)
    for name in remotes:
        settings.remote_policy(name)
    return settings
