"""The key command: the passphrases and key files that open an encrypted repository's master key."""

from __future__ import annotations

from pathlib import Path

import click
from vmrepo.storage.base import Backend

from .. import keys
from ..errors import ConfigError, KeyRefused, NoPassphrase, OutputError, WrongPassphrase
from ..keys import MasterKey
from ..repository import Repository
from ..store import RepoStore
from .app import Context, command

ACTIONS = ("list", "add", "remove", "passwd", "export")
#: How ``key list`` names what opens a key record (its ``kdf``).
_KINDS = {"scrypt": "passphrase", keys.KDF_NONE: "key file"}


def _unlocked(ctx: Context, backend: Backend | None = None
              ) -> tuple[Repository, keys.KeyInfo]:
    """The repository (at ``backend``, if given), unlocked, and the key that opened it."""
    r = ctx.open_repo(backend=backend)
    if r.master is None or r.key_used is None:
        raise ConfigError(f"{r.backend.location} is not encrypted: it has no keys")
    return r, r.key_used


@command()
@click.argument("action", type=click.Choice(ACTIONS))
@click.argument("key_id", required=False, metavar="[ID]")
@click.option("--label", default="", help="A note stored with a new key (add, passwd).")
@click.option("--from-export", "from_export", type=click.Path(path_type=Path), default=None,
              help="add: the master key from `vmrepo key export` (when every passphrase is "
                   "lost); no passphrase is asked for it.")
@click.option("--key-file", "key_file", type=click.Path(path_type=Path), default=None,
              help="add: write a new key file here (for unattended hosts: VMREPO_KEY_FILE "
                   "opens the repository with it, without a passphrase).")
def key(ctx: Context, action: str, key_id: str | None, label: str,
        from_export: Path | None, key_file: Path | None) -> None:
    """Manage the keys of an encrypted repository: list, add (a new passphrase from
    VMREPO_NEW_PASSWORD_FILE/_COMMAND or the terminal, or with --key-file a key file),
    remove ID, passwd (replace the passphrase used), export (the master key, for a paper or
    offline copy)."""
    if key_id is not None and action != "remove":
        raise click.UsageError(f"`key {action}` takes no ID")
    if action == "remove" and key_id is None:
        raise click.UsageError("`key remove` needs the ID of the key (see `vmrepo key list`)")
    for option, given in (("--from-export", from_export), ("--key-file", key_file)):
        if given is not None and action != "add":
            raise click.UsageError(f"{option} goes with `key add`, not `key {action}`")
    if from_export is not None and key_file is not None:
        raise click.UsageError("--from-export and --key-file: one at a time (add a passphrase "
                               "from the export first)")
    if action == "add" and from_export is not None:
        _add_from_export(ctx, from_export, label)
        return
    backend = ctx.repo_backend()
    if key_file is not None and backend.local and keys.inside(str(key_file),
                                                              backend.location):
        # Before a passphrase is asked for.
        raise KeyRefused(f"{key_file} is inside the repository {backend.location}: every "
                         "copy of the repository would carry the key that opens it (write "
                         "the key file outside)")
    r, used = _unlocked(ctx, backend)
    store, rid = r.store, r.config.repository_id
    assert r.master is not None
    if action == "list":
        infos = keys.list_keys(store)
        ctx.emit({"keys": [{**k.__dict__, "current": k.id == used.id} for k in infos]},
                 lambda: click.echo("\n".join(
                     f"{'*' if k.id == used.id else ' '} {k.id[:8]}  {k.created[:19]}  {k.host}  "
                     f"{_KINDS.get(k.kdf, k.kdf):10}  {k.label or '-'}" for k in infos)))
    elif action == "add" and key_file is not None:
        try:
            new, made = keys.add_key_file(store, rid, r.master, str(key_file.absolute()), label)
        except keys.KeyFileError as exc:
            raise OutputError(f"cannot write the key file {exc}", exc.path) from None
        ctx.emit({"added": new.id, "key_file": made.path},
                 lambda: click.echo(f"added key {new.id[:8]}: the key file {made.path} opens "
                                    "the repository (VMREPO_KEY_FILE); keep it private (only "
                                    "its owner may read it)"))
    elif action == "passwd" and used.kdf == keys.KDF_NONE:
        raise KeyRefused(f"opened with the key file of key {used.id[:8]}, which has no "
                          "passphrase to change: `vmrepo key add --key-file` and `vmrepo key "
                          "remove` replace a key file")
    elif action in ("add", "passwd"):
        new = keys.add_key(store, rid, r.master,
                           _new_passphrase(ctx, r.store, rid, r.backend.location),
                           label or action)
        if action == "passwd":
            keys.remove_key(store, used.id)
        done = "replaced key" if action == "passwd" else "added key"
        ctx.emit({"added": new.id, "removed": used.id if action == "passwd" else None},
                 lambda: click.echo(f"{done} {new.id[:8]}"
                                    + (f" (removed {used.id[:8]})" if action == "passwd"
                                       else "")))
    elif action == "remove":
        assert key_id is not None
        victim = keys.find(store, key_id)
        infos = keys.list_keys(store)
        if len(infos) < 2:
            raise KeyRefused(f"{victim.id[:8]} is the only key: removing it would lock "
                              "everyone out (add another first)")
        if victim.kdf != keys.KDF_NONE and \
                sum(k.kdf != keys.KDF_NONE for k in infos) < 2:
            raise KeyRefused(f"{victim.id[:8]} is the last passphrase: only the hosts that "
                              "hold key files could open the repository (add another "
                              "passphrase first)")
        if victim.id == used.id:
            raise KeyRefused(f"{victim.id[:8]} is the key this command opened the repository "
                              "with: " + ("`vmrepo key passwd` replaces it; " if
                                          used.kdf != keys.KDF_NONE else "") +
                              "to remove it, open the repository with another key")
        keys.remove_key(store, victim.id)
        ctx.emit({"removed": victim.id}, lambda: click.echo(f"removed key {victim.id[:8]}"))
    else:
        text = r.master.export(rid)
        ctx.emit({"export": text}, lambda: click.echo(text))
        click.echo("vmrepo: anyone holding this line can read the repository: keep it "
                   "offline; `vmrepo key add --from-export FILE` restores access with it",
                   err=True)


def _new_passphrase(ctx: Context, store: RepoStore, repository_id: str, location: str) -> str:
    """The new key's passphrase; refused if a key of the repository already has it (a second
    record for one passphrase protects nothing more, and `key remove` of either would not
    take the passphrase away)."""
    passphrase = ctx.new_passphrase(None, location, "VMREPO_NEW")
    same = keys.opened_by(store, repository_id, passphrase)
    if same is not None:
        raise KeyRefused(f"key {same.id[:8]} already has that passphrase: choose another",
                         same.id)
    return passphrase


def _add_from_export(ctx: Context, path: Path, label: str) -> None:
    backend = ctx.backend_for()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise NoPassphrase(f"cannot read the exported key {path}: "
                           f"{exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise WrongPassphrase(f"{path} is not an exported vmrepo key (not text)") from None
    try:
        rid, master = MasterKey.parse_export(text)
    except ValueError as exc:
        raise WrongPassphrase(f"cannot use {path}: {exc}") from None
    r = Repository.open(backend, master=master, report=ctx.report)
    snaps = r.snapshots()
    if snaps == [] and r.store.problems:  # records that do not open: a wrong key
        raise WrongPassphrase(f"{path} does not open the records of {backend.location}")
    this = r.config.repository_id
    if rid != this and not (snaps and not r.store.problems):
        # Another repository's key fits only if it shares the master key (made with
        # `init --copy-params-from`): shown by its records opening with it.
        raise WrongPassphrase(f"{path} is the key of repository {rid}, not of {this}" + (
            ", and no snapshot record of it opens with that key" if snaps else
            ", and it holds no snapshot record to show that the key fits"))
    new = keys.add_key(r.store, this, master,
                       _new_passphrase(ctx, r.store, this, backend.location),
                       label or "from export")
    ctx.emit({"added": new.id}, lambda: click.echo(f"added key {new.id[:8]} from the export"))
