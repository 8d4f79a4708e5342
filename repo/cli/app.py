"""The command-line frame: global options, the per-command context, and errors to exit codes.

Global options (``-r/--repo``, ``--config``, ``--json``, ``-v``, ``--no-lock``,
``--retry-lock``, ``--progress/--no-progress``) are accepted before and after the command:
``vmrepo -r /srv/repo init`` and ``vmrepo init -r /srv/repo`` mean the same.
Every command prints exactly one JSON document on stdout with ``--json``.
Errors print one line on stderr (and, with ``--json``, a JSON document on
stdout) and exit with the code from :mod:`vmrepo.exitcodes`; only a bug
prints a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn, TypeVar

import click
from vmrepo.storage.base import Backend
from vmrepo.storage.errors import StoragePermission

from .. import __version__, exitcodes, logs
from ..errors import (
    ConfigError,
    Interrupted,
    NoPassphrase,
    RepositoryLocked,
    RepositoryNotFound,
    WrongPassphrase,
)
from ..interrupts import raise_interrupt
from ..keys import KeyFile, KeyFileError, inside
from ..locks import REPOSITORY, RepoLock, acquire
from ..memtune import limit_malloc_arenas, tune_malloc
from ..passphrase import passphrase_from_env
from ..plugins import open_backend
from ..repository import Repository
from ..settings import Settings, load_settings
from ..store import Problem

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("vmrepo.cli")


@dataclass
class Options:
    """The global options, from before and after the command."""

    repo: str | None = None
    config: str | None = None
    as_json: bool = False
    verbose: int = 0
    no_lock: bool = False
    progress: bool | None = None
    retry_lock: str | None = None

    def merged(self, later: Options) -> Options:
        """These options overridden by those given after the command."""
        out = Options(**{f.name: getattr(self, f.name) for f in fields(self)})
        for f in fields(self):
            value = getattr(later, f.name)
            if value != f.default:  # given after the command
                setattr(out, f.name, value)
        return out


#: The options of the command being run (for errors reported after it failed).
_current = Options()


def _global_options(f: F) -> F:
    f = click.option("--retry-lock", "retry_lock", metavar="DURATION", default=None,
                     help="Wait up to this long (e.g. 30s, 10m, 1h) for a conflicting lock "
                          "to go, instead of failing at once.")(f)
    f = click.option("--progress/--no-progress", "progress", default=None,
                     help="Show progress on a terminal (default) or never.")(f)
    f = click.option("--no-lock", "no_lock", is_flag=True, default=False,
                     help="Read without taking a lock (read-only commands).")(f)
    f = click.option("-v", "--verbose", "verbose", count=True,
                     help="Say what vmrepo does (-vv: debug).")(f)
    f = click.option("--json", "as_json", is_flag=True, default=False,
                     help="Print one JSON document.")(f)
    f = click.option("--config", "config", metavar="FILE", default=None,
                     help="Config file (TOML).")(f)
    f = click.option("-r", "--repo", "repo", metavar="URL", default=None,
                     envvar=None, help="Repository location (or $VMREPO_REPOSITORY).")(f)
    return f


_GLOBAL_KEYS = ("repo", "config", "as_json", "verbose", "no_lock", "progress", "retry_lock")
_WAIT_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_wait(text: str, option: str = "--retry-lock") -> float:
    """Seconds of a duration such as ``30s``, ``10m`` (minutes), ``2h``, ``1d``, ``2w``;
    a bare number is seconds."""
    value, unit = text.strip()[:-1], text.strip()[-1:]
    if unit not in _WAIT_UNITS:
        value, unit = text.strip(), "s"
    try:
        seconds = float(value) * _WAIT_UNITS[unit]
    except ValueError:
        raise click.BadParameter(f"expected a duration such as 30s, 10m, 2h or 1d, not "
                                 f"{text!r}", param_hint=option) from None
    if not seconds >= 0 or seconds == float("inf"):
        raise click.BadParameter(f"{text!r} is not a usable duration", param_hint=option)
    return seconds


#: Each command and the module that defines it, imported only when the command runs (or
#: when ``--help`` lists them all): a command pays for its own imports, not every other's.
COMMANDS = {
    "init": "repository_cmds", "upgrade": "repository_cmds", "snapshots": "repository_cmds",
    "show": "repository_cmds", "locks": "repository_cmds", "unlock": "repository_cmds",
    "snapshot": "backup_cmds", "bitmaps": "backup_cmds", "restore": "restore_cmds",
    "serve": "serve_cmds", "stats": "insight_cmds", "diff": "insight_cmds",
    "tag": "insight_cmds", "copy": "copy_cmds", "forget": "retention_cmds",
    "prune": "retention_cmds", "verify": "verify_cmds", "repair": "verify_cmds",
    "key": "key_cmds",
}


class LazyGroup(click.Group):
    """The ``vmrepo`` group: loads a command's module when the command is looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            importlib.import_module(f".{COMMANDS[cmd_name]}", __package__)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vmrepo")
@_global_options
@click.pass_context
def cli(click_ctx: click.Context, /, **options: Any) -> None:
    """Back up QEMU/KVM virtual machine disks into a deduplicating repository.

    Global options may come before or after the command.
    """
    click_ctx.obj = Options(**options)


@dataclass
class Context:
    """What a command works with: options, settings, repository access, output."""

    opts: Options
    _settings: Settings | None = None
    problems: list[Problem] = field(default_factory=list)
    _warned: set[str] = field(default_factory=set)
    _opened: list[Repository] = field(default_factory=list)

    @property
    def as_json(self) -> bool:
        return self.opts.as_json

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.opts.config)
        return self._settings

    def repo_url(self) -> str:
        url = (self.opts.repo or os.environ.get("VMREPO_REPOSITORY")
               or self.settings.repository)
        if not url:
            raise ConfigError("no repository given: use -r/--repo, $VMREPO_REPOSITORY or "
                              "`repository = ...` in the config file")
        return url

    def report(self, problem: Problem) -> None:
        self.problems.append(problem)
        self.warn(str(problem))

    def warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            click.echo(f"vmrepo: warning: {message}", err=True)

    def backend_for(self, name_or_url: str | None = None, create: bool = False) -> Backend:
        """The backend of the main repository (``-r``, else the config) or of another one:
        a ``[remote.NAME]`` by name (with its storage settings), or a URL or path. The main
        repository, when it is not a remote, takes the ``[storage]`` settings."""
        target = name_or_url if name_or_url is not None else self.repo_url()
        url, options = self.settings.location(target)
        if name_or_url is None and target not in self.settings.remotes:
            options = self.settings.storage
        table = f"[remote.{target}]" if target in self.settings.remotes else "[storage]"
        return open_backend(url, create=create, options=options, table=table)

    def repo_backend(self, name_or_url: str | None = None) -> Backend:
        """:meth:`backend_for` of an existing repository; a missing one named by a bare word
        is said to be no remote either (most likely a remote's name mistyped)."""
        try:
            return self.backend_for(name_or_url)
        except RepositoryNotFound as exc:
            word = name_or_url if name_or_url is not None else self.repo_url()
            if word in self.settings.remotes or "/" in word or not self.settings.remotes:
                raise
            remotes = ", ".join(sorted(self.settings.remotes))
            raise RepositoryNotFound(exc.location, f"nor a [remote.{word}] in the "
                                     f"config; its remotes: {remotes}") from None

    def open_repo(self, name_or_url: str | None = None,
                  backend: Backend | None = None) -> Repository:
        """The repository, opened (and unlocked); ``backend`` if the caller already has
        :meth:`repo_backend`'s."""
        if backend is None:
            backend = self.repo_backend(name_or_url)
        repo = Repository.open(backend, report=self.report,
                               passphrase=lambda rid: self.passphrase(name_or_url, backend,
                                                                      rid))
        self._opened.append(repo)
        return repo

    def _remote(self, name_or_url: str | None) -> dict[str, Any]:
        """The ``[remote.NAME]`` table of a repository (``-r``, else the config's), if any."""
        target = name_or_url if name_or_url is not None else self.repo_url()
        return self.settings.remotes.get(target, {})

    def _password_env(self, name_or_url: str | None, prefix: str = "VMREPO") -> dict[str, str]:
        """Where a repository's passphrase comes from: its remote's ``password_file`` or
        ``password_command``, else ``$<prefix>_PASSWORD_FILE`` / ``_COMMAND``."""
        remote = self._remote(name_or_url)
        if prefix == "VMREPO" and ("password_file" in remote or "password_command" in remote):
            return {"VMREPO_PASSWORD_FILE": str(remote.get("password_file", "")),
                    "VMREPO_PASSWORD_COMMAND": str(remote.get("password_command", ""))}
        return {k.replace(prefix, "VMREPO", 1): v for k, v in os.environ.items()
                if k.startswith(prefix + "_PASSWORD_")}

    def _key_file(self, name_or_url: str | None) -> tuple[str, bool] | None:
        """The key file for a repository and whether its remote names it (``key_file``),
        else ``$VMREPO_KEY_FILE`` for the main repository and remotes without a secret of
        their own."""
        remote = self._remote(name_or_url)
        if "key_file" in remote:
            return str(remote["key_file"]), True
        if "password_file" in remote or "password_command" in remote:
            return None
        path = os.environ.get("VMREPO_KEY_FILE")
        return (os.path.expanduser(path), False) if path else None

    def passphrase(self, name_or_url: str | None, backend: Backend,
                   repository_id: str) -> str | KeyFile:
        """What opens a repository: its key file (:meth:`_key_file`), else its passphrase
        (:meth:`_password_env`), else one asked on the terminal. Never taken from the
        command line. ``$VMREPO_KEY_FILE`` of another repository (the source of a copy,
        say) leaves this one to its passphrase."""
        location = backend.location
        chosen = self._key_file(name_or_url)
        other: KeyFile | None = None
        if chosen is not None:
            path, named = chosen
            try:
                key_file: KeyFile | None = KeyFile.read(path)
            except KeyFileError as exc:
                if named or name_or_url is None:
                    raise (NoPassphrase if not exc.readable else WrongPassphrase)(
                        f"the key file {exc}") from None
                # $VMREPO_KEY_FILE is the main repository's: it says nothing of this one.
                self.warn(f"the key file {exc}; {location} opens by passphrase")
                key_file = None
            if key_file is not None and (key_file.repository_id == repository_id or named):
                mode = key_file.exposed()
                if mode is not None:
                    self.warn(f"the key file {key_file.path} is open to other users (mode "
                              f"{mode:04o}): `chmod 600 {key_file.path}`")
                if backend.local and inside(key_file.path, location):
                    self.warn(f"the key file {key_file.path} lies inside the repository: "
                              "every copy of the repository carries the key that opens it "
                              "(move the key file outside)")
                return key_file
            if key_file is not None:
                other = key_file
                log.info("%s is the key file of repository %s: %s opens by passphrase",
                         key_file.path, key_file.repository_id, location)
        found = passphrase_from_env(self._password_env(name_or_url))
        if found == "":
            raise NoPassphrase(f"the passphrase for {location} is empty (the first line of "
                               "the password file, or of what the password command printed)")
        if found is not None:
            return found
        if sys.stdin.isatty():
            return str(click.prompt(f"passphrase for {location}", hide_input=True, err=True,
                                    show_default=False))
        raise NoPassphrase(f"{location} is encrypted and no passphrase can be read: set "
                           "VMREPO_PASSWORD_FILE (or VMREPO_PASSWORD_COMMAND, or "
                           "VMREPO_KEY_FILE), or run on a terminal" + (
                               f" (VMREPO_KEY_FILE {other.path} is the key file of repository "
                               f"{other.repository_id})" if other else ""))

    def new_passphrase(self, name_or_url: str | None, location: str,
                       prefix: str = "VMREPO") -> str:
        """A passphrase for a new key (``prefix`` ``VMREPO_NEW`` for a key added to an
        existing repository), or asked twice on the terminal."""
        found = passphrase_from_env(self._password_env(name_or_url, prefix))
        if found is not None:
            if not found:
                raise NoPassphrase(f"the new passphrase for {location} is empty")
            return found
        if sys.stdin.isatty():
            return str(click.prompt(f"new passphrase for {location}", hide_input=True,
                                    confirmation_prompt=True, err=True))
        raise NoPassphrase(f"no passphrase for the key of {location}: set "
                           f"{prefix}_PASSWORD_FILE (or {prefix}_PASSWORD_COMMAND), run on a "
                           "terminal" + (", or choose --encryption none"
                                         if prefix == "VMREPO" else ""))

    def storage_requests(self) -> dict[str, dict[str, int]]:
        """Requests each opened repository's store received, by operation."""
        out: dict[str, dict[str, int]] = {}
        for repo in self._opened:
            counts = getattr(repo.backend, "requests", None)
            if counts:
                out[repo.backend.location] = dict(sorted(counts.items()))
        return out

    def show_progress(self) -> bool:
        return not self.as_json and self.opts.progress is not False

    @contextlib.contextmanager
    def lock(self, repo: Repository, operation: str, *, scope: str = REPOSITORY,
             exclusive: bool = False, read_only: bool = False) -> Iterator[RepoLock | None]:
        """Hold a lock for the block; a read-only command reads without one where the
        repository cannot be written (or with ``--no-lock``), saying so once."""
        if read_only and self.opts.no_lock:
            yield None
            return
        try:
            held = self._acquire(repo, operation, scope, exclusive)
        except StoragePermission as exc:
            if not read_only:
                raise
            self.warn(f"cannot lock the repository ({exc}); reading it without a lock")
            yield None
            return
        try:
            for lk, why in held.stale:
                self.warn(f"stale {lk.describe()}: {why}; `vmrepo unlock` removes it")
            for bad in held.corrupt:
                self.warn(f"{bad.describe()}; `vmrepo unlock` removes it")
            yield held
        finally:
            held.release()

    def _acquire(self, repo: Repository, operation: str, scope: str,
                 exclusive: bool) -> RepoLock:
        """A lock, waiting for conflicting ones to go for up to ``--retry-lock``."""
        wait = parse_wait(self.opts.retry_lock) if self.opts.retry_lock else 0.0
        deadline = time.monotonic() + wait
        pause = 1.0
        while True:
            try:
                return acquire(repo.store, operation, scope=scope, exclusive=exclusive,
                               version=min(repo.config.version, 2))
            except RepositoryLocked:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                log.info("repository locked; trying again for %.0f s more", left)
                time.sleep(min(pause, left))
                pause = min(pause * 2, 15.0)

    def emit(self, doc: dict[str, Any], human: Callable[[], None]) -> None:
        requests = self.storage_requests()
        for location, counts in requests.items():
            log.info("%s: %d storage requests (%s)", location, sum(counts.values()),
                     ", ".join(f"{op} {n}" for op, n in counts.items()))
        if self.as_json:
            if requests:
                doc = {**doc, "storage_requests": requests}
            if self.problems:
                doc = {**doc, "problems": [{"key": p.key, "kind": p.kind, "message": str(p)}
                                           for p in self.problems]}
            click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))
        else:
            human()


def command(name: str | None = None, **attrs: Any) -> Callable[[F], F]:
    """A vmrepo command: takes the global options too, and gets a :class:`Context` first."""

    def deco(f: F) -> F:
        @functools.wraps(f)
        def wrapper(**kwargs: Any) -> Any:
            global _current
            later = Options(**{k: kwargs.pop(k) for k in _GLOBAL_KEYS})
            click_ctx = click.get_current_context()
            parent = click_ctx.find_object(Options) or Options()
            opts = parent.merged(later)
            _current = opts
            logs.setup(opts.verbose)
            return f(Context(opts), **kwargs)

        return cli.command(name, **attrs)(_global_options(wrapper))  # type: ignore[return-value]

    return deco


def _fail(code: int, message: str, exc: BaseException | None = None) -> NoReturn:
    click.echo(f"vmrepo: error: {message}", err=True)
    if (_current.as_json or "--json" in sys.argv[1:]) and not getattr(exc, "emitted", False):
        doc: dict[str, Any] = {"error": {"message": message, "exit_code": code,
                                         "type": type(exc).__name__ if exc else None}}
        for attr in ("key", "path", "spec", "disk", "location", "holders", "candidates"):
            value = getattr(exc, attr, None)
            if value:
                doc["error"][attr] = value
        click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))
    sys.exit(code)


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: run the CLI and turn errors into one line and an exit code. The
    process's last work: it ends by freezing every object left (``gc.freeze``), which a
    caller that went on would keep for good."""
    try:
        _main(argv)
    finally:
        # The command is done and its files are closed: the interpreter's teardown need
        # not search what is left for reference cycles (finalizers at exit are not
        # promised anyway): 15 ms of a 0.4 s incremental snapshot went there.
        gc.freeze()


def _main(argv: list[str] | None) -> NoReturn:
    signal.signal(signal.SIGTERM, raise_interrupt)
    tune_malloc()
    limit_malloc_arenas(2)  # one arena per thread would each keep freed chunk buffers
    logs.setup(0)
    try:
        # Not cli.main(): it writes a blank line before an interrupt's error even where no
        # terminal echoed ^C.
        with cli.make_context("vmrepo", sys.argv[1:] if argv is None else list(argv)) as ctx:
            cli.invoke(ctx)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.NoArgsIsHelpError as exc:  # `vmrepo` alone: the help, as laid out
        click.echo(exc.format_message(), err=True)
        sys.exit(exitcodes.USAGE)
    except click.ClickException as exc:
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see `{exc.ctx.command_path} --help`)"
        _fail(exitcodes.USAGE if exc.exit_code == 2 else exc.exit_code,
              one_line_text(exc.format_message()) + hint, exc)
    except click.Abort as exc:
        cause = exc.__cause__
        name = str(cause) if isinstance(cause, KeyboardInterrupt) and str(cause) else "SIGINT"
        _fail(exitcodes.INTERRUPTED, str(Interrupted(name)))
    except KeyboardInterrupt as exc:
        if sys.stderr.isatty():
            click.echo(err=True)  # past the terminal's ^C
        _fail(exitcodes.INTERRUPTED, str(Interrupted(str(exc) or "SIGINT")))
    except BrokenPipeError:
        sys.exit(exitcodes.FAILURE)
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        code = exitcodes.exit_code(exc)
        if code is None:
            traceback.print_exc()
            _fail(exitcodes.INTERNAL, f"internal error (a bug): {exc!r}", exc)
        _fail(code, one_line(exc), exc)
    sys.exit(exitcodes.OK)


def one_line_text(text: str) -> str:
    return " ".join(text.split())


def one_line(exc: BaseException) -> str:
    return one_line_text(str(exc)) or type(exc).__name__
