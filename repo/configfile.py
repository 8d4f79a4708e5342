"""Where the TOML configuration file is: ``--config``, ``$VMREPO_CONFIG``, ``./vmrepo.toml``,
``~/.config/vmrepo/config.toml``, ``/etc/vmrepo/config.toml``, the first that is given or
exists (:mod:`vmrepo.settings` reads it). Imports nothing heavy: the command line looks here
before it loads its modules (:mod:`vmrepo.cli.ahead`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SEARCH_PATH = (
    Path("vmrepo.toml"),
    Path("~/.config/vmrepo/config.toml"),
    Path("/etc/vmrepo/config.toml"),
)


def find_config(explicit: str | None, env: Mapping[str, str] = os.environ) -> Path | None:
    """The config file named (``explicit``, else ``$VMREPO_CONFIG``), else the first of
    :data:`SEARCH_PATH` that exists; None if there is none."""
    if explicit:
        return Path(explicit)
    if env.get("VMREPO_CONFIG"):
        return Path(env["VMREPO_CONFIG"])
    for candidate in SEARCH_PATH:
        path = candidate.expanduser()
        if path.is_file():
            return path
    return None
