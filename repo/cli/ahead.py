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
a command that opens none) costs scrypt's CPU for each passphrase record, on the other core
in a child process that is stopped once the command has its key or exits. Files are read
ahead only when they are regular files (a passphrase on a pipe is read once, by the
command); nothing that fails here is reported, as the command meets it again and reports it
in its own words.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence

import msgpack

from ..configfile import find_config
from ..format import ENVELOPE_PLAIN, KEY_PREFIX, KEY_VERSION, parse_hex_name
from ..passphrase import Params, derive_ahead, passphrase_from_env, record_params

#: A key record is a few hundred bytes; anything much larger is not one.
_RECORD_MAX = 64 << 10
#: What unlocking needs of every key record before it tries one (``keys._info``).
_RECORD_FIELDS = frozenset({"id", "created", "host", "kdf"})


def option_value(argv: Sequence[str], *names: str) -> str | None:
    """The value the last of ``names`` (``-r``, ``--repo``) is given on the command line
    (``-r X``, ``-rX``, ``--repo X``, ``--repo=X``), as click reads it (the last one given
    wins); None if none."""
    value = None
    args = iter(argv)
    for arg in args:
        if arg == "--":
            break
        for name in names:
            joined = name + "=" if name.startswith("--") else name
            if arg == name:
                value = next(args, None)
            elif arg.startswith(joined) and not (joined == name and arg.startswith("--")):
                value = arg[len(joined):]
    return value


def repository_argument(argv: Sequence[str], env: Mapping[str, str]) -> str | None:
    """The repository as the command will resolve it: ``-r``/``--repo``, else
    ``$VMREPO_REPOSITORY``, else the config file's ``repository``; None if none names one
    (or the config file cannot be read: the command says why)."""
    named = option_value(argv, "-r", "--repo") or env.get("VMREPO_REPOSITORY")
    if named:
        return named
    path = find_config(option_value(argv, "--config"), env)
    if path is None or not _regular_file(str(path)):
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
        path = location[len("file://"):]
        return path if path.startswith("/") else None
    return None if "://" in location else location or None


def _regular_file(path: str) -> bool:
    """Whether ``path`` is a regular file: a pipe, a terminal or a device is read once,
    by the command, never by a guess."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def scrypt_params(directory: str) -> list[Params]:
    """The scrypt parameters of the passphrase key records in a local repository's
    ``keys/`` that unlocking would try, in the order it tries them (by id). Records it
    would pass over are left out: not a plain map of a version this vmrepo reads, without
    the fields every key record has, or not opened by a passphrase. Anything but a
    regular file is left alone (a pipe or a device is not opened)."""
    found = []
    keys_dir = os.path.join(directory, KEY_PREFIX)
    for name in os.listdir(keys_dir):
        if parse_hex_name(name, "", 32) is None:
            continue
        try:
            fd = os.open(os.path.join(keys_dir, name),
                         os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            raw = f.read(_RECORD_MAX + 1)
        if not raw or raw[0] != ENVELOPE_PLAIN or len(raw) > _RECORD_MAX:
            continue
        try:
            record = msgpack.unpackb(raw[1:], raw=False, strict_map_key=False)
            version = record["v"]
            if (not isinstance(version, int) or isinstance(version, bool)
                    or version > KEY_VERSION or not record.keys() >= _RECORD_FIELDS):
                continue
            params = record_params(record)
        except (ValueError, TypeError, KeyError, OverflowError, AttributeError,
                msgpack.UnpackException):
            continue
        if params is not None:
            found.append((str(record["id"]), params))
    return [params for _, params in sorted(found, key=lambda found: found[0])]


def start(argv: Sequence[str], env: Mapping[str, str]) -> bool:
    """Derive ahead the key of the repository and passphrase the command line names, if
    it names both, the repository is local and the passphrase file a regular file; whether
    a derivation started. Never raises: whatever goes wrong here, the command meets again
    and reports in its own words."""
    try:
        password_file = env.get("VMREPO_PASSWORD_FILE")
        if env.get("VMREPO_KEY_FILE") or not password_file or not _regular_file(password_file):
            return False
        location = repository_argument(argv, env)
        directory = local_directory(location) if location else None
        if directory is None:
            return False
        params = scrypt_params(directory)
        passphrase = passphrase_from_env({"VMREPO_PASSWORD_FILE": password_file})
        if not passphrase or not params:
            return False
        return derive_ahead(passphrase, params)
    except Exception:  # noqa: BLE001 - a guess: the command itself reports any of this
        return False
