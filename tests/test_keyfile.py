"""Key files for unattended hosts: a key record of its own opened by 32 random bytes without
scrypt, used through ``VMREPO_KEY_FILE`` (or a remote's ``key_file``), revoked by removing
its record, and refused with one line and exit code 16 or 17 when it does not fit."""

from __future__ import annotations

import filecmp
import os
import random
import stat
from pathlib import Path

import pytest
from vmrepo import exitcodes, keys
from vmrepo.config import RepoConfig
from vmrepo.repository import Repository
from vmrepo.storage.errors import StoragePermission
from vmrepo.storage.local import LocalBackend

from .helpers import run_cli, run_json

MiB = 1 << 20
NO_PASSPHRASE = {"VMREPO_PASSWORD_FILE": "", "VMREPO_PASSWORD_COMMAND": ""}


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "pass").write_text("correct horse battery staple\n")
    monkeypatch.setenv("VMREPO_PASSWORD_FILE", str(tmp_path / "pass"))
    monkeypatch.delenv("VMREPO_KEY_FILE", raising=False)
    (tmp_path / "a.raw").write_bytes(random.Random(1).randbytes(2 * MiB))
    (tmp_path / "vmrepo.toml").write_text(
        f'repository = "repo"\n[remote.offsite]\nrepository = "offsite"\n'
        f'key_file = "{tmp_path / "offsite.key"}"\n'
        '[vm.vm1]\nsource = "file"\ndisks = { disk0 = "a.raw" }\n')
    run_cli("init", "--encryption", "aes-256-gcm", cwd=tmp_path)
    return tmp_path


def _as_host(work: Path, name: str = "host.key") -> dict[str, str]:
    return {**NO_PASSPHRASE, "VMREPO_KEY_FILE": str(work / name)}


def test_a_key_file_opens_the_repository_without_a_passphrase(
        work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    added = run_json("key", "add", "--key-file", "host.key", "--label", "host1", cwd=work)
    key_file = work / "host.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    rid = RepoConfig.decode((work / "repo" / "config").read_bytes()).repository_id
    words = key_file.read_text().split()
    assert words[:3] == ["vmrepo-key-file", rid, added["added"]] and len(words[3]) == 64
    # The host snapshots, lists and restores with the key file alone, without a warning.
    assert run_cli("snapshot", "vm1", cwd=work, env=_as_host(work)).stderr == ""
    run_cli("restore", "vm1@latest", "--disk", "disk0", "-o", "out.raw", cwd=work,
            env=_as_host(work))
    assert filecmp.cmp(work / "out.raw", work / "a.raw", shallow=False)
    listed = run_json("key", "list", cwd=work, env=_as_host(work))["keys"]
    assert [(k["label"], k["kdf"], k["current"]) for k in listed] == \
        [("init", "scrypt", False), ("host1", "none", True)]
    human = run_cli("key", "list", cwd=work, env=_as_host(work)).stdout
    assert "key file    host1" in human and "passphrase  init" in human
    # Opening with it reads the one record it names (no listing of keys/) and runs no
    # scrypt.
    monkeypatch.setattr(keys, "scrypt", _no_scrypt)
    monkeypatch.setattr(keys, "_records", _no_scrypt)
    repo = Repository.open(LocalBackend(work / "repo"),
                           passphrase=lambda _rid: keys.KeyFile.read(str(key_file)))
    assert repo.key_used is not None and repo.key_used.id == added["added"]
    assert len(repo.snapshots()) == 1
    # The passphrase still opens it.
    assert len(run_json("snapshots", cwd=work)["snapshots"]) == 1
    # A repository without encryption has no keys: a key file set for another is ignored.
    run_cli("-r", "clear", "init", "--encryption", "none", cwd=work)
    assert run_json("-r", "clear", "snapshots", cwd=work, env=_as_host(work))["snapshots"] == []
    # No passphrase to change under a key file.
    res = run_cli("key", "passwd", cwd=work, env=_as_host(work), check=False)
    assert res.returncode == exitcodes.USAGE and "no passphrase to change" in res.stderr
    # Revoked: removing its record (with the passphrase) shuts the host out.
    run_cli("key", "remove", added["added"][:8], cwd=work)
    res = run_cli("snapshots", cwd=work, env=_as_host(work), check=False)
    assert res.returncode == exitcodes.WRONG_PASSPHRASE
    assert res.stderr.strip() == (f"vmrepo: error: the key file {key_file}: its key "
                                  f"{added['added'][:8]} is not in {work / 'repo'} (removed "
                                  "with `vmrepo key remove`, or never stored: `key add` "
                                  "interrupted)")


def _no_scrypt(*args: object, **kw: object) -> bytes:
    raise AssertionError("scrypt ran, or the key records were listed")


def test_a_key_file_that_does_not_fit_is_refused_in_one_line(work: Path) -> None:
    run_cli("key", "add", "--key-file", "host.key", cwd=work)
    before = run_json("key", "list", cwd=work)["keys"]
    # The file exists: refused, and no record is left behind.
    res = run_cli("key", "add", "--key-file", "host.key", cwd=work, check=False)
    assert res.returncode == exitcodes.OUTPUT and "File exists" in res.stderr
    assert run_json("key", "list", cwd=work)["keys"] == before
    res = run_cli("key", "add", "--key-file", "nodir/host.key", cwd=work, check=False)
    assert res.returncode == exitcodes.OUTPUT and "nodir/host.key" in res.stderr
    assert run_json("key", "list", cwd=work)["keys"] == before
    res = run_cli("key", "list", "--key-file", "x.key", cwd=work, check=False)
    assert res.returncode == exitcodes.USAGE and "--key-file goes with `key add`" in res.stderr
    text = (work / "host.key").read_text()
    cases = {
        "garbage": ("not a key\n", exitcodes.WRONG_PASSPHRASE, "not a vmrepo key file"),
        "short": (text.rsplit(" ", 1)[0] + " abcd\n", exitcodes.WRONG_PASSPHRASE,
                  "not 64 hex digits"),
        "flipped": (text[:-3] + ("0" if text[-3] != "0" else "1") + text[-2:],
                    exitcodes.WRONG_PASSPHRASE, "does not open its key"),
        # Another repository's: this one is left to its passphrase, and there is none.
        "other-repo": (text.replace(text.split()[1], "0" * 32), exitcodes.NO_PASSPHRASE,
                       f"other-repo.key is the key file of repository {'0' * 32})"),
        "binary": (None, exitcodes.WRONG_PASSPHRASE, "not text"),
        "bad-repo-id": (text.replace(text.split()[1], "x" * 32), exitcodes.WRONG_PASSPHRASE,
                        "its repository id is not 32 hex digits"),
    }
    for name, (content, code, says) in cases.items():
        path = work / f"{name}.key"
        if content is None:
            path.write_bytes(b"\xff\xfe" * 40)
        else:
            path.write_text(content)
        path.chmod(0o600)
        res = run_cli("snapshot", "vm1", cwd=work, env=_as_host(work, path.name), check=False)
        assert (res.returncode, len(res.stderr.strip().splitlines())) == (code, 1), name
        assert says in res.stderr, (name, res.stderr)
    res = run_cli("snapshots", cwd=work, env=_as_host(work, "missing.key"), check=False)
    assert res.returncode == exitcodes.NO_PASSPHRASE and "missing.key: cannot read" in res.stderr
    os.mkfifo(work / "fifo.key")  # refused, not waited on
    res = run_cli("snapshots", cwd=work, env=_as_host(work, "fifo.key"), check=False)
    assert res.returncode == exitcodes.NO_PASSPHRASE and "not a regular file" in res.stderr
    # Readable by others: used, with a warning.
    (work / "host.key").chmod(0o644)
    res = run_cli("snapshots", cwd=work, env=_as_host(work))
    assert "is open to other users (mode 0644): `chmod 600" in res.stderr
    # One naming a passphrase's record.
    first = run_json("key", "list", cwd=work)["keys"][0]["id"]
    (work / "swapped.key").write_text(text.replace(text.split()[2], first))
    (work / "swapped.key").chmod(0o600)
    res = run_cli("snapshots", cwd=work, env=_as_host(work, "swapped.key"), check=False)
    assert res.returncode == exitcodes.WRONG_PASSPHRASE
    assert "which is not a key file's (kdf scrypt)" in res.stderr
    # Its record damaged in the store: damage (14), not a wrong key file.
    record = next((work / "repo" / "keys").glob(text.split()[2]))
    record.write_bytes(record.read_bytes()[:-5])
    res = run_cli("snapshots", cwd=work, env=_as_host(work), check=False)
    assert res.returncode == exitcodes.INTEGRITY and "is damaged" in res.stderr
    # Nothing was written by the refused snapshots.
    assert run_json("snapshots", cwd=work)["snapshots"] == []


def test_each_repository_of_a_copy_opens_with_its_own_key_file(work: Path) -> None:
    """The main repository through VMREPO_KEY_FILE, the remote through its ``key_file``."""
    run_cli("key", "add", "--key-file", "host.key", cwd=work)
    run_cli("-r", "offsite", "init", "--encryption", "aes-256-gcm", cwd=work)
    # Made before the remote's key_file exists: through its path, with the passphrase.
    run_cli("-r", str(work / "offsite"), "key", "add", "--key-file", "offsite.key", cwd=work)
    host = _as_host(work)
    run_cli("snapshot", "vm1", cwd=work, env=host)
    copied = run_json("copy", "--to", "offsite", cwd=work, env=host)
    assert copied["snapshots"] == 1
    assert len(run_json("-r", "offsite", "snapshots", cwd=work, env=host)["snapshots"]) == 1
    # Named by VMREPO_REPOSITORY, the remote still takes its own key file.
    assert len(run_json("snapshots", cwd=work, env={**host, "VMREPO_REPOSITORY": "offsite"}
                        )["snapshots"]) == 1
    # A remote named by its path, without a secret in the config: the main repository's
    # key file is not its key, so the passphrase opens it (a copy made by the host).
    run_cli("-r", "plainpath", "init", "--encryption", "aes-256-gcm", cwd=work)
    with_both = {**host, "VMREPO_PASSWORD_FILE": str(work / "pass")}
    assert run_json("copy", "--to", str(work / "plainpath"), cwd=work,
                    env=with_both)["snapshots"] == 1
    res = run_cli("-r", "plainpath", "snapshots", cwd=work, env=host, check=False)
    assert res.returncode == exitcodes.NO_PASSPHRASE and "is the key file of" in res.stderr
    # A remote's own key_file of another repository is a mistake, said as such.
    (work / "offsite.key").write_text((work / "host.key").read_text())
    res = run_cli("-r", "offsite", "snapshots", cwd=work, env=host, check=False)
    assert res.returncode == exitcodes.WRONG_PASSPHRASE and "is of repository" in res.stderr


def test_secrets_follow_the_repository_however_it_is_named(work: Path) -> None:
    """A remote's key_file (relative to the config file) and password_file, whether the remote
    is named by -r or $VMREPO_REPOSITORY; $VMREPO_KEY_FILE that cannot be read only warns for
    a repository other than the main one."""
    (work / "off-pass").write_text("offsite passphrase\n")
    off_pass = {"VMREPO_PASSWORD_FILE": str(work / "off-pass")}
    run_cli("-r", "off", "init", "--encryption", "aes-256-gcm", cwd=work, env=off_pass)
    (work / "keys-dir").mkdir()
    run_cli("-r", str(work / "off"), "key", "add", "--key-file", "keys-dir/off.key",
            cwd=work, env=off_pass)
    (work / "conf").mkdir()
    (work / "conf" / "vmrepo.toml").write_text(
        '[remote.bykey]\nrepository = "../off"\nkey_file = "../keys-dir/off.key"\n'
        f'[remote.bypass]\nrepository = "../off"\npassword_file = "{work / "off-pass"}"\n')
    config = ["--config", str(work / "conf" / "vmrepo.toml")]
    for name in ("bykey", "bypass"):
        for how in (["-r", name], []):
            env = {**NO_PASSPHRASE, "VMREPO_REPOSITORY": "" if how else name}
            # From the config's directory: the relative paths are its, not the cwd's.
            got = run_json(*config, *how, "snapshots", cwd=work / "conf", env=env)
            assert got["snapshots"] == [], (name, how)
    # $VMREPO_KEY_FILE that is not a key file: refused for the main repository ...
    (work / "broken.key").write_text("nonsense\n")
    broken = {**off_pass, "VMREPO_KEY_FILE": str(work / "broken.key")}
    res = run_cli("snapshots", cwd=work, env=broken, check=False)
    assert res.returncode == exitcodes.WRONG_PASSPHRASE and "not a vmrepo key file" in res.stderr
    # ... a warning for a copy's destination, which its passphrase opens.
    run_cli("-r", "clear", "init", "--encryption", "none", cwd=work)
    run_cli("-r", "clear", "snapshot", "vm1", cwd=work)
    res = run_cli("-r", "clear", "copy", "--to", str(work / "off"), cwd=work, env=broken)
    assert "opens by passphrase" in res.stderr and "not a vmrepo key file" in res.stderr
    assert len(run_json("-r", "off", "snapshots", cwd=work, env=off_pass)["snapshots"]) == 1


def test_the_last_passphrase_is_kept(work: Path) -> None:
    added = run_json("key", "add", "--key-file", "host.key", cwd=work)["added"]
    first = run_json("key", "list", cwd=work)["keys"][0]["id"]
    res = run_cli("key", "remove", first[:8], cwd=work, env=_as_host(work), check=False)
    assert res.returncode == exitcodes.USAGE and "is the last passphrase" in res.stderr
    res = run_cli("key", "remove", added[:8], cwd=work, env=_as_host(work), check=False)
    assert res.returncode == exitcodes.USAGE and "opened the repository with" in res.stderr
    assert "passwd" not in res.stderr  # which has nothing to change under a key file


def test_a_key_file_whose_record_failed_is_removed(work: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Repository.open(LocalBackend(work / "repo"),
                           passphrase=lambda _rid: "correct horse battery staple")
    assert repo.master is not None
    before = keys.list_keys(repo.store)

    def refused(*args: object, **kw: object) -> bytes:
        raise StoragePermission("keys/ is read-only", key="keys/x")

    monkeypatch.setattr(repo.store, "put_record", refused)
    with pytest.raises(StoragePermission):
        keys.add_key_file(repo.store, repo.config.repository_id, repo.master,
                          str(work / "k"))
    assert not (work / "k").exists()
    monkeypatch.undo()
    assert keys.list_keys(repo.store) == before


def test_an_interrupted_key_file_is_not_left(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    made = keys.KeyFile.new("0" * 32, str(tmp_path / "k"))

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(keys.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        made.create()
    assert not (tmp_path / "k").exists()


def test_a_remote_key_file_that_is_not_a_path_is_a_config_error(work: Path) -> None:
    (work / "bad.toml").write_text('[remote.offsite]\nrepository = "offsite"\nkey_file = 3\n')
    res = run_cli("--config", "bad.toml", "-r", "offsite", "snapshots", cwd=work, check=False)
    assert res.returncode == exitcodes.CONFIG
    assert "remote offsite: key_file must be a non-empty string" in res.stderr


def test_a_key_file_is_not_written_inside_the_repository_and_one_found_there_is_warned_of(
        work: Path) -> None:
    """A copy of the repository (rsync, a tape, a snapshot of its file system) would carry
    a key file kept inside it, and open with it."""
    before = run_json("key", "list", cwd=work)["keys"]
    for inside in ("repo/host.key", "repo/keys/host.key", "./repo/../repo/host.key",
                   str(work / "repo" / "host.key")):
        # Refused before a passphrase is asked for (here there is none to read).
        res = run_cli("key", "add", "--key-file", inside, cwd=work, env=NO_PASSPHRASE,
                      check=False)
        assert (res.returncode, len(res.stderr.strip().splitlines())) == (exitcodes.USAGE, 1)
        assert "inside the repository" in res.stderr and "outside" in res.stderr, res.stderr
        assert not (work / inside).exists()
    (work / "link").symlink_to(work / "repo")  # the same directory by another name
    res = run_cli("key", "add", "--key-file", "link/host.key", cwd=work, check=False)
    assert res.returncode == exitcodes.USAGE and "inside the repository" in res.stderr
    assert run_json("key", "list", cwd=work)["keys"] == before
    # A mistyped remote is still said to be one, with --key-file too.
    res = run_cli("-r", "ofsite", "key", "add", "--key-file", "x.key", cwd=work, check=False)
    assert res.returncode == exitcodes.NO_REPOSITORY, res.stderr
    assert "nor a [remote.ofsite] in the config; its remotes: offsite" in res.stderr
    # Beside the repository (a name that merely starts like it) is fine.
    run_cli("key", "add", "--key-file", "repo.key", cwd=work)
    assert run_cli("snapshots", cwd=work, env=_as_host(work, "repo.key")).stderr == ""
    # One that was put there by hand still opens it, with a warning.
    os.rename(work / "repo.key", work / "repo" / "host.key")
    res = run_cli("snapshots", cwd=work, env={**NO_PASSPHRASE,
                                              "VMREPO_KEY_FILE": str(work / "repo" / "host.key")})
    assert "lies inside the repository" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
