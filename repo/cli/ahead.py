"""Unlocking ahead: scrypt for the command line's repository, started before its imports.

A command opened by a passphrase spends 0.1 s importing its modules and then 0.15 s in
scrypt, one after the other on one core. :func:`start` runs first, from
:func:`vmrepo.cli.main` with nothing heavy imported. When the command line names a local
repository (``-r``, ``--repo``, ``$VMREPO_REPOSITORY`` or the config file's
``repository``) and ``$VMREPO_PASSWORD_FILE`` its passphrase (and no ``$VMREPO_KEY_FILE``
is set), it reads the repository's passphrase key records and hands their scrypt
parameters to :func:`vmrepo.passphrase.derive_ahead`: scrypt then runs beside the imports.

It is a guess: the command itself still resolves its repository and passphrase the usual
way (config file, remotes, key files, a prompt) and reads the key records again;
:func:`vmrepo.passphrase.scrypt` takes a result derived ahead only for the very same
passphrase, salt and parameters. A guess that does not apply (another repository, a remote,
a command that opens none) costs one scrypt's CPU on a thread nobody waits for; nothing
that fails here is reported, as the command reports it in its own words.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import msgpack

from ..configfile import find_config
from ..errors import NoPassphrase
from ..format import ENVELOPE_PLAIN, KEY_PREFIX, parse_hex_name
from ..passphrase import Params, derive_ahead, passphrase_from_env

#: A key record is a few hundred bytes; anything much larger is not one.
_RECORD_MAX = 64 << 10


def option_value(argv: Sequence[str], *names: str) -> str | None:
    """The value the first of ``names`` (``-r``, ``--repo``) is given on the command line
    (``-r X``, ``-rX``, ``--repo X``, ``--repo=X``), as click would read it; None if none."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        for name in names:
            if arg == name:
                return argv[i + 1] if i + 1 < len(argv) else None
            joined = name + "=" if name.startswith("--") else name
            if arg.startswith(joined) and not (joined == name and arg.startswith("--")):
                return arg[len(joined):]
    return None


def repository_argument(argv: Sequence[str], env: Mapping[str, str]) -> str | None:
    """The repository as the command will resolve it: ``-r``/``--repo``, else
    ``$VMREPO_REPOSITORY``, else the config file's ``repository``; None if none names one
    (or the config file cannot be read: the command says why)."""
    named = option_value(argv, "-r", "--repo") or env.get("VMREPO_REPOSITORY")
    if named:
        return named
    path = find_config(option_value(argv, "--config"), env)
    if path is None:
        return None
    import tomllib

    try:
        with open(path, "rb") as f:
            repository = tomllib.load(f).get("repository")
    except (OSError, ValueError):
        return None
    return repository if isinstance(repository, str) and repository else None


def local_directory(location: str) -> str | None:
    """The directory of a local repository's location (a path or ``file://``); None for
    other schemes."""
    if location.startswith("file://"):
        return location[len("file://"):] or None
    return None if "://" in location else location


def scrypt_params(directory: str) -> list[Params]:
    """The scrypt parameters of the passphrase key records in a local repository's
    ``keys/``, in name order; records that cannot be read are left out."""
    params = []
    keys_dir = os.path.join(directory, KEY_PREFIX)
    for name in sorted(os.listdir(keys_dir)):
        if parse_hex_name(name, "", 32) is None:
            continue
        try:
            with open(os.path.join(keys_dir, name), "rb") as f:
                raw = f.read(_RECORD_MAX + 1)
            if not raw or raw[0] != ENVELOPE_PLAIN or len(raw) > _RECORD_MAX:
                continue
            kdf = msgpack.unpackb(raw[1:], raw=False, strict_map_key=False)["kdf"]
            if kdf["algorithm"] == "scrypt" and isinstance(kdf["salt"], bytes):
                params.append((kdf["salt"], int(kdf["n"]), int(kdf["r"]), int(kdf["p"])))
        except (OSError, ValueError, TypeError, KeyError, msgpack.UnpackException):
            continue
    return params


def start(argv: Sequence[str], env: Mapping[str, str]) -> bool:
    """Derive ahead the key of the repository and passphrase the command line names, if
    it names both and the repository is local; whether a derivation started."""
    if env.get("VMREPO_KEY_FILE") or not env.get("VMREPO_PASSWORD_FILE"):
        return False
    location = repository_argument(argv, env)
    directory = local_directory(location) if location else None
    if directory is None:
        return False
    try:
        params = scrypt_params(directory)
        passphrase = passphrase_from_env({"VMREPO_PASSWORD_FILE": env["VMREPO_PASSWORD_FILE"]})
    except (OSError, NoPassphrase):
        return False
    if not passphrase or not params:
        return False
    return derive_ahead(passphrase, params) is not None
