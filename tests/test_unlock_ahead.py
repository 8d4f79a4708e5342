"""scrypt derived ahead (vmrepo.passphrase, vmrepo.cli.ahead): the guess the command line
makes before its imports is taken only for the same passphrase and parameters, and a
wrong guess changes nothing a command does or says."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from vmrepo import exitcodes
from vmrepo.cli import ahead
from vmrepo.errors import WrongPassphrase
from vmrepo.format import KEY_PREFIX
from vmrepo.passphrase import derive_ahead, scrypt

from .helpers import run_cli, vmrepo_bin

SALT = bytes(range(16))
SMALL = (SALT, 1024, 8, 1)  # cheap parameters: the tests need not pay 64 MiB each
PASSPHRASE = "correct horse battery staple"


def _openssl(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(passphrase.encode(), salt=salt, n=n, r=r, p=p, dklen=32,
                          maxmem=256 * n * r + (1 << 20))


def _ahead_taken(caplog: pytest.LogCaptureFixture) -> int:
    return sum("derived ahead" in r.getMessage() for r in caplog.records)


def test_a_key_derived_ahead_is_taken_once_for_the_same_inputs(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vmrepo.passphrase")
    assert derive_ahead("taken once", [SMALL])
    assert scrypt("taken once", *SMALL) == _openssl("taken once", *SMALL)
    assert _ahead_taken(caplog) == 1
    # Taken once: the next call derives afresh, to the same key.
    assert scrypt("taken once", *SMALL) == _openssl("taken once", *SMALL)
    assert _ahead_taken(caplog) == 1


def test_other_inputs_than_the_guess_are_derived_afresh(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vmrepo.passphrase")
    assert derive_ahead("guessed", [SMALL])
    other_salt = (bytes(16), *SMALL[1:])
    other_cost = (SALT, 2048, 8, 1)
    for passphrase, params in (("not guessed", SMALL), ("guessed", other_salt),
                               ("guessed", other_cost)):
        assert scrypt(passphrase, *params) == _openssl(passphrase, *params)
    assert _ahead_taken(caplog) == 0
    assert scrypt("guessed", *SMALL) == _openssl("guessed", *SMALL)
    assert _ahead_taken(caplog) == 1


def test_parameters_scrypt_refuses_are_not_derived_ahead() -> None:
    assert not derive_ahead("refused", [(SALT, 3, 8, 1), (SALT, 1 << 30, 8, 1)])
    with pytest.raises(ValueError):
        scrypt("refused", SALT, 3, 8, 1)


@pytest.mark.parametrize(("argv", "expected"), [
    (["-r", "/srv/repo", "snapshots"], "/srv/repo"),
    (["-r/srv/repo", "snapshots"], "/srv/repo"),
    (["--repo", "/srv/repo", "snapshots"], "/srv/repo"),
    (["--repo=/srv/repo", "snapshots"], "/srv/repo"),
    (["snapshot", "vm1", "-r", "/srv/repo"], "/srv/repo"),  # global options come anywhere
    (["--repository", "x", "snapshots"], None),
    (["tag", "--", "-r", "/srv/repo"], None),  # after --, no option
    (["snapshots", "-r"], None),
    (["-r", "/first", "snapshots", "-r", "/last"], "/last"),  # click takes the last
])
def test_the_repository_option_is_read_as_click_reads_it(argv: list[str],
                                                          expected: str | None) -> None:
    assert ahead.option_value(argv, "-r", "--repo") == expected


def test_the_repository_is_the_option_else_the_environment_else_the_config(
        tmp_path: Path) -> None:
    config = tmp_path / "cfg.toml"
    config.write_text('repository = "/from/config"\n')
    env = {"VMREPO_REPOSITORY": "/from/env", "VMREPO_CONFIG": str(config)}
    assert ahead.repository_argument(["-r", "/from/option"], env) == "/from/option"
    assert ahead.repository_argument([], env) == "/from/env"
    assert ahead.repository_argument([], {"VMREPO_CONFIG": str(config)}) == "/from/config"
    other = tmp_path / "other.toml"
    other.write_text('repository = "/other"\n')
    assert ahead.repository_argument(["--config", str(other)],
                                     {"VMREPO_CONFIG": str(config)}) == "/other"
    # A config file that cannot be read or names none: no guess (the command says why).
    config.write_text("repository = [")
    assert ahead.repository_argument([], {"VMREPO_CONFIG": str(config)}) is None
    config.write_text("repository = 3\n")
    assert ahead.repository_argument([], {"VMREPO_CONFIG": str(config)}) is None
    assert ahead.repository_argument([], {"VMREPO_CONFIG": str(tmp_path / "none")}) is None


@pytest.mark.parametrize(("location", "expected"), [
    ("/srv/repo", "/srv/repo"), ("repo", "repo"), ("file:///srv/repo", "/srv/repo"),
    ("s3://bucket/repo", None), ("memory://", None), ("file://", None)])
def test_only_local_repositories_are_read_ahead(location: str, expected: str | None) -> None:
    assert ahead.local_directory(location) == expected


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "pass").write_text(PASSPHRASE + "\n")
    monkeypatch.setenv("VMREPO_PASSWORD_FILE", str(tmp_path / "pass"))
    monkeypatch.delenv("VMREPO_KEY_FILE", raising=False)
    run_cli("-r", str(tmp_path / "repo"), "init", "--encryption", "aes-256-gcm")
    return tmp_path / "repo"


def test_the_passphrase_records_parameters_are_read_and_others_skipped(repo: Path) -> None:
    from vmrepo.keys import SCRYPT_N, SCRYPT_P, SCRYPT_R

    keys_dir = repo / KEY_PREFIX
    (record,) = list(keys_dir.iterdir())
    salt = ahead.scrypt_params(str(repo))[0][0]
    assert ahead.scrypt_params(str(repo)) == [(salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)]
    assert len(salt) == 16 and salt in record.read_bytes()
    # Damaged records, names vmrepo never writes and a key file's record are left out.
    (keys_dir / ("0" * 32)).write_bytes(b"\x00\xc1garbage")
    (keys_dir / ("1" * 32)).write_bytes(b"")
    (keys_dir / ("2" * 32)).write_bytes(b"\x01sealed")
    (keys_dir / (".tmp-" + record.name)).write_bytes(record.read_bytes())
    key_file = repo.parent / "host.key"
    run_cli("-r", str(repo), "key", "add", "--key-file", str(key_file))
    assert ahead.scrypt_params(str(repo)) == [(salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)]


def _guessed(repo: Path, argv: list[str], env: dict[str, str],
             caplog: pytest.LogCaptureFixture) -> bool:
    """Whether :func:`ahead.start` started a derivation; one started is taken at once, and
    must give the key (a derivation already pending is not started again)."""
    started = ahead.start(argv, env)
    if started:
        before = _ahead_taken(caplog)
        params = ahead.scrypt_params(str(repo))[0]
        assert scrypt(PASSPHRASE, *params) == _openssl(PASSPHRASE, *params)
        assert _ahead_taken(caplog) == before + 1
    return started


def test_a_guess_starts_only_for_a_local_repository_and_a_passphrase_file(
        repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vmrepo.passphrase")
    env = {"VMREPO_PASSWORD_FILE": os.environ["VMREPO_PASSWORD_FILE"]}
    assert _guessed(repo, ["-r", str(repo), "snapshots"], env, caplog)
    assert _guessed(repo, ["snapshots"], {**env, "VMREPO_REPOSITORY": f"file://{repo}"},
                    caplog)
    assert not ahead.start(["-r", str(repo)], {**env, "VMREPO_KEY_FILE": "/k"})
    assert not ahead.start(["-r", f"file://{repo.relative_to(repo.parent)}"], env)
    assert not ahead.start(["-r", str(repo)], {"VMREPO_PASSWORD_COMMAND": "echo x"})
    assert not ahead.start(["-r", str(repo.parent / "none")], env)
    assert not ahead.start(["-r", str(repo.parent)], env)  # a directory without keys/
    assert not ahead.start(["-r", "s3://bucket/repo"], env)
    assert not ahead.start(["-r", str(repo)], {"VMREPO_PASSWORD_FILE": "/no/such/file"})
    # Empty passphrase files open nothing; the command says so.
    (repo.parent / "empty").write_text("\n")
    assert not ahead.start(["-r", str(repo)], {"VMREPO_PASSWORD_FILE": str(repo.parent /
                                                                           "empty")})


def test_commands_take_the_key_derived_ahead_and_a_wrong_guess_changes_nothing(
        repo: Path) -> None:
    work = repo.parent
    opened = run_cli("-vv", "-r", str(repo), "snapshots", cwd=work)
    assert "derived ahead" in opened.stderr
    # Named by the config file only.
    (work / "vmrepo.toml").write_text(f'repository = "{repo}"\n')
    assert "derived ahead" in run_cli("-vv", "snapshots", cwd=work).stderr
    # A wrong passphrase is still the wrong passphrase, in the same words and exit code.
    (work / "wrong").write_text("not it\n")
    wrong = run_cli("-r", str(repo), "snapshots", cwd=work, check=False,
                    env={"VMREPO_PASSWORD_FILE": str(work / "wrong")})
    assert wrong.returncode == exitcodes.WRONG_PASSPHRASE
    assert wrong.stderr.startswith("vmrepo: error: wrong passphrase")
    # A guess that hits a repository the command opens by another passphrase (a remote of
    # that name with its own password file, in the directory the guess reads): the result
    # derived ahead from $VMREPO_PASSWORD_FILE is not taken, the remote's passphrase opens.
    (work / "other-pass").write_text("another passphrase\n")
    run_cli("-r", "offsite", "init", "--encryption", "aes-256-gcm", cwd=work,
            env={"VMREPO_PASSWORD_FILE": str(work / "other-pass")})
    (work / "vmrepo.toml").write_text(
        f'repository = "{repo}"\n[remote.offsite]\nrepository = "offsite"\n'
        f'password_file = "{work / "other-pass"}"\n')
    assert ahead.scrypt_params(str(work / "offsite"))  # what the guess reads for -r offsite
    listed = run_cli("-vv", "-r", "offsite", "snapshots", "--json", cwd=work)
    assert json.loads(listed.stdout)["snapshots"] == []
    assert "derived ahead" not in listed.stderr
    copied = run_cli("-vv", "copy", "--to", "offsite", cwd=work)
    assert copied.stderr.count("derived ahead") == 1  # the main repository's


def test_a_passphrase_on_a_pipe_is_read_once_by_the_command(repo: Path) -> None:
    """A password "file" that is a pipe is not read ahead: the command reads it."""
    res = subprocess.run([vmrepo_bin(), "-vv", "-r", str(repo), "snapshots"],
                         input=PASSPHRASE + "\n", capture_output=True, text=True, timeout=60,
                         env={**os.environ, "VMREPO_PASSWORD_FILE": "/dev/stdin"})
    assert res.returncode == 0, res.stderr
    assert "derived ahead" not in res.stderr


def test_damaged_key_records_change_nothing_a_command_does(repo: Path) -> None:
    """Records the guess cannot use (a cost it cannot hold, a pipe) leave each command as
    it was: no traceback, no hang, the same exit."""
    keys_dir = repo / KEY_PREFIX
    # Named to come first: unlocking meets it before the real record.
    (keys_dir / ("0" * 32)).write_bytes(b"\x00" + msgpack.packb(
        {"v": 1, "id": "0" * 32, "created": "2026-01-01T00:00:00+00:00", "host": "h",
         "kdf": {"algorithm": "scrypt", "salt": bytes(16), "n": float("inf"), "r": 8,
                 "p": 1}, "sealed": bytes(48)}))
    # A pipe is not opened by the guess (a command that reads keys/ would wait on it, as
    # it always has; --version reads nothing).
    os.mkfifo(keys_dir / ("e" * 32))
    assert run_cli("-r", str(repo), "--version").returncode == 0
    assert len(ahead.scrypt_params(str(repo))) == 1
    (keys_dir / ("e" * 32)).unlink()
    listed = run_cli("-vv", "-r", str(repo), "snapshots")
    assert "derived ahead" in listed.stderr and "Traceback" not in listed.stderr


def test_keys_of_several_passphrases_are_derived_in_the_order_unlocking_tries_them(
        repo: Path) -> None:
    work = repo.parent
    for name in ("second", "third"):
        (work / name).write_text(f"passphrase {name}\n")
        run_cli("-r", str(repo), "key", "add", cwd=work,
                env={"VMREPO_NEW_PASSWORD_FILE": str(work / name)})
    records = sorted(p.name for p in (repo / KEY_PREFIX).iterdir())
    params = ahead.scrypt_params(str(repo))
    assert len(params) == 3
    for name, (salt, *_) in zip(records, params, strict=True):
        assert salt in (repo / KEY_PREFIX / name).read_bytes()
    # Whichever record a passphrase opens, the records before it are tried first, each
    # with a key derived ahead, and the command opens the repository.
    for name in ("pass", "second", "third"):
        res = run_cli("-vv", "-r", str(repo), "snapshots", cwd=work,
                      env={"VMREPO_PASSWORD_FILE": str(work / name)})
        assert "derived ahead" in res.stderr


def test_keys_derived_ahead_come_in_any_order_asked() -> None:
    first, second = (b"1" * 16, 1024, 8, 1), (b"2" * 16, 1024, 8, 2)
    assert derive_ahead("two records", [first, second, first])
    assert scrypt("two records", *second) == _openssl("two records", *second)
    assert scrypt("two records", *first) == _openssl("two records", *first)


def test_a_derivation_nobody_takes_is_stopped_when_the_command_exits() -> None:
    """The child deriving ahead is killed and waited for at exit: no process outlives the
    command, even one whose guess did not apply."""
    script = ("from vmrepo import passphrase\n"
              "assert passphrase.derive_ahead('unused', [(bytes(16), 1 << 17, 8, 1)])\n"
              "print(passphrase._children[0].pid)\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
    pid = int(res.stdout)
    # scrypt at 128 MiB runs for some 0.3 s: a child left running would still be there.
    assert not Path(f"/proc/{pid}").exists()


def test_deriving_ahead_leaves_the_command_one_malloc_arena() -> None:
    """The derivation runs outside the command's process: no thread of its own that would
    leave glibc a second arena (a server keeps one: docs/benchmarks.md)."""
    script = ("import ctypes\n"
              "from vmrepo import passphrase\n"
              f"params = {SMALL!r}\n"
              "assert passphrase.derive_ahead('arena', [params])\n"
              "passphrase.scrypt('arena', *params)\n"
              "ctypes.CDLL('libc.so.6').malloc_stats()\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
    assert res.stderr.count("Arena ") == 1, res.stderr


def _add_record(repo: Path, key_id: str, **changes: object) -> None:
    """A passphrase key record written by hand (what unlocking reads of one), ``changes``
    applied (None removes a field)."""
    record: dict[str, object] = {
        "v": 1, "id": key_id, "created": "2026-01-01T00:00:00+00:00", "host": "h",
        "label": "", "kdf": {"algorithm": "scrypt", "salt": bytes(16), "n": 1024, "r": 8,
                             "p": 1}, "sealed": bytes(48)}
    record.update(changes)
    record = {k: v for k, v in record.items() if v is not None}
    (repo / KEY_PREFIX / key_id).write_bytes(b"\x00" + msgpack.packb(record))


def test_the_guess_derives_what_unlocking_tries_in_its_order(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The records derived ahead are those unlocking runs scrypt on, in the same order;
    records it passes over are not derived."""
    from vmrepo import keys
    from vmrepo.repository import Repository
    from vmrepo.storage.local import LocalBackend

    _add_record(repo, "0" * 32)  # tried first, opens nothing
    _add_record(repo, "1" * 32, host=None)  # unreadable: passed over
    _add_record(repo, "2" * 32, v=2)  # too new: passed over
    _add_record(repo, "3" * 32, kdf={"algorithm": "none"})  # a key file's
    _add_record(repo, "f" * 32, kdf={"algorithm": "scrypt", "salt": b"z" * 16, "n": 2048,
                                     "r": 8, "p": 1})  # tried last, if at all
    tried: list[tuple[bytes, int, int, int]] = []

    def recording(passphrase: str, *params: object) -> bytes:
        tried.append(params)  # type: ignore[arg-type]
        return scrypt(passphrase, *params)  # type: ignore[arg-type]

    monkeypatch.setattr(keys, "scrypt", recording)
    with pytest.raises(WrongPassphrase):
        Repository.open(LocalBackend(repo), passphrase=lambda _rid: "not it")
    assert tried == ahead.scrypt_params(str(repo))
    assert len(tried) == 3


def test_the_child_is_stopped_as_soon_as_the_key_is_open(repo: Path) -> None:
    """A record after the one that opens, expensive to derive: once the repository is open
    the child deriving ahead is gone, not left running beside the command."""
    _add_record(repo, "f" * 32, kdf={"algorithm": "scrypt", "salt": bytes(16),
                                     "n": 1 << 18, "r": 8, "p": 1})
    script = ("import os, sys\n"
              "from vmrepo import passphrase\n"
              "from vmrepo.cli import ahead\n"
              f"assert ahead.start(['-r', {str(repo)!r}], os.environ)\n"
              "pid = passphrase._children[0].pid\n"
              "from vmrepo.repository import Repository\n"
              "from vmrepo.storage.local import LocalBackend\n"
              f"Repository.open(LocalBackend({str(repo)!r}), passphrase=lambda _: "
              f"{PASSPHRASE!r})\n"
              "print(os.path.exists(f'/proc/{pid}'), flush=True)\n"
              "os._exit(0)\n")  # no exit handlers: the check is of unlocking alone
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
    assert res.stdout.strip() == "False"


def test_a_key_record_missing_a_field_is_called_damaged(repo: Path) -> None:
    """A bit flipped in a field's name leaves the record without it: the warning says the
    record is damaged and which field it lacks, and the error that no record is left."""
    (record,) = (repo / KEY_PREFIX).iterdir()
    fields = msgpack.unpackb(record.read_bytes()[1:])
    del fields["host"]
    record.write_bytes(b"\x00" + msgpack.packb(fields))
    res = run_cli("-r", str(repo), "snapshots", check=False)
    assert res.returncode == exitcodes.INTEGRITY
    assert f"keys/{record.name}: damaged key record, ignored (its field 'host' is missing)" \
        in res.stderr
    assert "holds no readable key record" in res.stderr and "Traceback" not in res.stderr
