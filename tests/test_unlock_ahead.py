"""scrypt derived ahead (vmrepo.passphrase, vmrepo.cli.ahead): the guess the command line
makes before its imports is taken only for the same passphrase and parameters, and a
wrong guess changes nothing a command does or says."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest
from vmrepo import exitcodes
from vmrepo.cli import ahead
from vmrepo.format import KEY_PREFIX
from vmrepo.passphrase import derive_ahead, scrypt

from .helpers import run_cli, run_json

SALT = bytes(range(16))
SMALL = (SALT, 1024, 8, 1)  # cheap parameters: the tests need not pay 64 MiB each
PASSPHRASE = "correct horse battery staple"


def _openssl(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(passphrase.encode(), salt=salt, n=n, r=r, p=p, dklen=32)


def _ahead_taken(caplog: pytest.LogCaptureFixture) -> int:
    return sum("derived ahead" in r.getMessage() for r in caplog.records)


def test_a_key_derived_ahead_is_taken_once_for_the_same_inputs(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vmrepo.passphrase")
    thread = derive_ahead("taken once", [SMALL])
    assert thread is not None
    assert scrypt("taken once", *SMALL) == _openssl("taken once", *SMALL)
    assert _ahead_taken(caplog) == 1
    # Taken once: the next call derives afresh, to the same key.
    assert scrypt("taken once", *SMALL) == _openssl("taken once", *SMALL)
    assert _ahead_taken(caplog) == 1
    thread.join()


def test_other_inputs_than_the_guess_are_derived_afresh(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vmrepo.passphrase")
    thread = derive_ahead("guessed", [SMALL])
    assert thread is not None
    other_salt = (bytes(16), *SMALL[1:])
    other_cost = (SALT, 2048, 8, 1)
    for passphrase, params in (("not guessed", SMALL), ("guessed", other_salt),
                               ("guessed", other_cost)):
        assert scrypt(passphrase, *params) == _openssl(passphrase, *params)
    assert _ahead_taken(caplog) == 0
    assert scrypt("guessed", *SMALL) == _openssl("guessed", *SMALL)
    assert _ahead_taken(caplog) == 1
    thread.join()


def test_parameters_scrypt_refuses_are_not_derived_ahead() -> None:
    assert derive_ahead("refused", [(SALT, 3, 8, 1), (SALT, 1 << 30, 8, 1)]) is None
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


def _guessed(repo: Path, argv: list[str], env: dict[str, str]) -> bool:
    """Whether :func:`ahead.start` started a derivation; one started is taken at once (a
    derivation already pending is not started again)."""
    started = ahead.start(argv, env)
    if started:
        scrypt(PASSPHRASE, *ahead.scrypt_params(str(repo))[0])
    return started


def test_a_guess_starts_only_for_a_local_repository_and_a_passphrase_file(repo: Path) -> None:
    env = {"VMREPO_PASSWORD_FILE": os.environ["VMREPO_PASSWORD_FILE"]}
    assert _guessed(repo, ["-r", str(repo), "snapshots"], env)
    assert _guessed(repo, ["snapshots"], {**env, "VMREPO_REPOSITORY": f"file://{repo}"})
    assert not ahead.start(["-r", str(repo)], {**env, "VMREPO_KEY_FILE": "/k"})
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
    # A guess for another repository than the one the command opens: the command opens its
    # own, by its own passphrase.
    other = work / "other"
    (work / "other-pass").write_text("another passphrase\n")
    run_cli("-r", str(other), "init", "--encryption", "aes-256-gcm",
            env={"VMREPO_PASSWORD_FILE": str(work / "other-pass")})
    (work / "vmrepo.toml").write_text(
        f'repository = "{repo}"\n[remote.offsite]\nrepository = "{other}"\n'
        f'password_file = "{work / "other-pass"}"\n')
    listed = run_json("-r", "offsite", "snapshots", cwd=work)
    assert listed["snapshots"] == []
    copied = run_cli("-vv", "copy", "--to", "offsite", cwd=work)
    assert copied.stderr.count("derived ahead") == 1  # the main repository's
