"""The ``vmrepo`` command line: wiring of settings, plugins, repository and output.

Every command takes ``--json`` and then prints exactly one JSON document on
stdout. Errors print one line on stderr and exit with the code from
:mod:`vmrepo.exitcodes`; only a bug prints a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import click
from vmrepo.sources.base import ChangeTracking, DiskStream, Wanted

from . import __version__, exitcodes
from .backup import SnapshotOptions, take_snapshot
from .config import DEFAULT_CHUNK, DEFAULT_PACK_SIZE, RepoConfig
from .errors import ConfigError, Interrupted, RestoreError
from .locks import list_locks, locked, remove_stale, stale_reason
from .memtune import tune_malloc
from .plugins import open_backend, source_class
from .progress import progress_bar
from .repository import Repository
from .restore import RestoreStats, restore_differential, restore_qcow2, restore_raw
from .settings import Settings, load_settings
from .snapshots import Snapshot
from .spec import parse_spec, resolve
from .units import human_bytes, parse_size, ratio

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """Options shared by all commands."""

    def __init__(self, repo: str | None, config: str | None, as_json: bool) -> None:
        self.repo_opt = repo
        self.config_opt = config
        self.as_json = as_json
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_opt)
        return self._settings

    def repo_url(self) -> str:
        url = self.repo_opt or os.environ.get("VMREPO_REPOSITORY") or self.settings.repository
        if not url:
            raise ConfigError("no repository given: use -r/--repo, $VMREPO_REPOSITORY or "
                              "`repository = ...` in the config file")
        return url

    def open_repo(self) -> Repository:
        return Repository.open(open_backend(self.repo_url()))

    def emit(self, doc: dict[str, Any], human: Callable[[], None]) -> None:
        if self.as_json:
            click.echo(json.dumps(doc, indent=2, sort_keys=True))
        else:
            human()


def common(f: F) -> F:
    """Add -r/--repo, --config and --json to a command."""
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")(f)
    f = click.option("--config", "config", metavar="FILE", help="Config file (TOML).")(f)
    f = click.option("-r", "--repo", "repo", metavar="URL", help="Repository location.")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vmrepo")
def cli() -> None:
    """Back up QEMU/KVM virtual machine disks into a deduplicating repository."""


@cli.command()
@common
@click.option("--chunk-size", default="256K", show_default=True,
              help="Chunk size, a power of two from 64K to 4M.")
@click.option("--pack-size", default=f"{DEFAULT_PACK_SIZE >> 20}M", show_default=True,
              help="Target size of pack files.")
def init(repo: str | None, config: str | None, as_json: bool, chunk_size: str,
         pack_size: str) -> None:
    """Create a new repository."""
    ctx = Context(repo, config, as_json)
    try:
        cfg = RepoConfig.new(parse_size(chunk_size) if chunk_size else DEFAULT_CHUNK,
                             parse_size(pack_size))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    url = ctx.repo_url()
    r = Repository.init(open_backend(url, create=True), cfg)
    doc = {"repository": r.backend.location, **cfg.summary()}
    ctx.emit(doc, lambda: click.echo(
        f"created repository {cfg.repository_id} at {r.backend.location} "
        f"(chunk size {human_bytes(cfg.chunk_size)})"))


@cli.command()
@common
@click.argument("vm")
@click.option("--tag", "tags", multiple=True, help="Tag the snapshot (repeatable).")
@click.option("--full", "mode", flag_value="full", help="Read every disk in full.")
@click.option("--differential", "mode", flag_value="differential",
              help="Read everything changed since the last full snapshot.")
def snapshot(repo: str | None, config: str | None, as_json: bool, vm: str,
             tags: tuple[str, ...], mode: str | None) -> None:
    """Take a snapshot of the disks of VM."""
    ctx = Context(repo, config, as_json)
    table = ctx.settings.vm(vm)
    source = source_class(table["source"]).from_config(vm, table)
    r = ctx.open_repo()
    started = time.monotonic()
    with locked(r.backend, f"snapshot {vm}", unique=True) as lock:
        warn_stale(lock.stale)
        snap = _snapshot_with_progress(r, source, vm, tags, mode or "auto", as_json)
    elapsed = time.monotonic() - started
    for d in snap.disks:
        if d.source.get("fallback"):
            click.echo(f"vmrepo: warning: disk {d.name}: {d.reason}", err=True)
    for w in snap.warnings:
        click.echo(f"vmrepo: warning: {w}", err=True)
    doc = snapshot_doc(snap, elapsed)
    ctx.emit(doc, lambda: print_snapshot_summary(snap, elapsed))


def _snapshot_with_progress(r: Repository, source: Any, vm: str, tags: tuple[str, ...],
                            mode: str, as_json: bool) -> Snapshot:
    """Take the snapshot with a progress bar sized once the source knows its disks."""
    with contextlib.ExitStack() as stack:
        bar: list[Callable[[int], None] | None] = [None]

        def on_begin(disks: list[DiskStream]) -> None:
            total = sum(d.work_bytes() for d in disks)
            bar[0] = stack.enter_context(progress_bar(total, f"snapshot {vm}", not as_json))

        def progress(n: int) -> None:
            if bar[0] is not None:
                bar[0](n)

        opts = SnapshotOptions(vm=vm, tags=tags, wanted=cast(Wanted, mode),
                               progress=progress, on_begin=on_begin)
        return take_snapshot(r, source, opts)


def warn_stale(stale: list[Any]) -> None:
    for lock, why in stale:
        click.echo(f"vmrepo: warning: stale {lock.describe()}: {why}; "
                   "`vmrepo unlock` removes it", err=True)


def snapshot_doc(snap: Snapshot, elapsed: float) -> dict[str, Any]:
    doc = snap.to_json()
    totals: dict[str, float] = {k: sum(int(d.stats.get(k, 0)) for d in snap.disks)
              for k in ("bytes_data", "bytes_zero", "bytes_new", "bytes_stored", "chunks",
                        "chunks_new", "chunks_zero", "pages_new", "bytes_manifest")}
    totals["seconds"] = round(elapsed, 3)
    doc["totals"] = totals
    return doc


def print_snapshot_summary(snap: Snapshot, elapsed: float) -> None:
    click.echo(f"snapshot {snap.short_id} of {snap.vm} taken "
               f"{snap.time.astimezone():%Y-%m-%d %H:%M:%S}")
    added = 0
    read = 0
    for d in snap.disks:
        s = d.stats
        added += s["bytes_stored"] + s["bytes_manifest"]
        read += s["bytes_data"]
        click.echo(f"  {d.name}: {d.taken} ({d.reason})")
        click.echo(f"    read {human_bytes(s['bytes_data'])} of data, "
                   f"{human_bytes(s['bytes_zero'])} known zero; "
                   f"{s['chunks']} chunks, {s['chunks_zero']} zero, {s['chunks_new']} new")
        click.echo(f"    added {human_bytes(s['bytes_stored'])} of chunks "
                   f"({human_bytes(s['bytes_new'])} before compression), "
                   f"{s['pages_new']} manifest pages ({human_bytes(s['bytes_manifest'])})")
    click.echo(f"  total: read {human_bytes(read)}, added {human_bytes(added)} "
               f"(ratio {ratio(read, added)}) in {elapsed:.1f} s")


@cli.command()
@common
@click.argument("vm", required=False)
def snapshots(repo: str | None, config: str | None, as_json: bool, vm: str | None) -> None:
    """List snapshots, of one VM or all."""
    ctx = Context(repo, config, as_json)
    snaps = ctx.open_repo().snapshots(vm)

    def human() -> None:
        if not snaps:
            click.echo("no snapshots")
            return
        click.echo(f"{'ID':8}  {'VM':12}  {'TIME':19}  {'DISKS':>5}  {'SIZE':>11}  TAKEN / TAGS")
        for s in snaps:
            taken = ",".join(sorted({d.taken for d in s.disks}))
            click.echo(f"{s.short_id:8}  {s.vm:12}  {s.time.astimezone():%Y-%m-%d %H:%M:%S}  "
                       f"{len(s.disks):>5}  {human_bytes(sum(d.size for d in s.disks)):>11}  "
                       f"{taken}{' ' + ','.join(s.tags) if s.tags else ''}")

    ctx.emit({"snapshots": [s.to_json() for s in snaps]}, human)


@cli.command()
@common
@click.argument("spec")
def show(repo: str | None, config: str | None, as_json: bool, spec: str) -> None:
    """Show one snapshot in detail (VM@WHEN)."""
    ctx = Context(repo, config, as_json)
    r = ctx.open_repo()
    snap = resolve(parse_spec(spec), r.snapshots())

    def human() -> None:
        click.echo(f"snapshot  {snap.id}")
        click.echo(f"vm        {snap.vm}")
        click.echo(f"time      {snap.time.astimezone():%Y-%m-%d %H:%M:%S %Z} "
                   f"({snap.time.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ})")
        click.echo(f"host      {snap.host}")
        click.echo(f"source    {snap.source}")
        click.echo(f"tags      {', '.join(snap.tags) or '-'}")
        for d in snap.disks:
            click.echo(f"disk {d.name}: {human_bytes(d.size)} ({d.size} bytes), {d.taken}"
                       f"{' on ' + d.base[:8] if d.base else ''}: {d.reason}")
            click.echo(f"  manifest root {d.root.hex()}")
            click.echo("  " + ", ".join(f"{k}={v}" for k, v in sorted(d.stats.items())))

    ctx.emit(snap.to_json(), human)


@cli.command()
@common
@click.argument("spec")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Directory (one DISK.raw per disk) or, with --disk, the image file.")
@click.option("--disk", help="Restore only this disk.")
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]), default="raw",
              show_default=True)
@click.option("--since", help="With --format qcow2: write only what changed since VM@WHEN.")
@click.option("--backing", help="Backing image of the differential qcow2; {disk} is replaced "
                                "by the disk name.")
@click.option("--force", is_flag=True, help="Replace existing output files.")
def restore(repo: str | None, config: str | None, as_json: bool, spec: str, output: Path,
            disk: str | None, fmt: str, since: str | None, backing: str | None,
            force: bool) -> None:
    """Rebuild the disk images of a snapshot (VM@WHEN)."""
    ctx = Context(repo, config, as_json)
    if since and (fmt != "qcow2" or not backing):
        raise click.UsageError("--since needs --format qcow2 and --backing IMAGE")
    if backing and not since:
        raise click.UsageError("--backing goes with --since")
    r = ctx.open_repo()
    all_snaps = r.snapshots()
    snap = resolve(parse_spec(spec), all_snaps)
    old = resolve(parse_spec(since), all_snaps) if since else None
    disks = snap.disks
    if disk is not None:
        chosen = snap.disk(disk)
        if chosen is None:
            raise RestoreError(f"snapshot {snap.short_id} has no disk {disk!r} (has: "
                               f"{', '.join(d.name for d in snap.disks)})")
        disks = [chosen]
    single = disk is not None
    if not single and not output.is_dir():
        raise RestoreError(f"{output} is not a directory (give --disk NAME to restore one "
                           "disk into a file)", str(output))
    if old is not None and len(disks) > 1 and backing and "{disk}" not in backing:
        raise click.UsageError("several disks: give --disk NAME or a --backing with {disk}")
    started = time.monotonic()
    results = []
    total = sum(d.size for d in disks)
    with locked(r.backend, f"restore {snap.vm}") as lock, \
            progress_bar(total, f"restore {snap.vm}", not as_json) as advance:
        warn_stale(lock.stale)
        for d in disks:
            target = output if single else output / f"{d.name}.{fmt}"
            stats: RestoreStats
            if old is not None:
                since_disk = old.disk(d.name)
                if since_disk is None:
                    raise RestoreError(f"{since} has no disk {d.name}")
                assert backing is not None
                stats = restore_differential(r, d, since_disk, target,
                                             Path(backing.replace("{disk}", d.name)),
                                             force=force, progress=advance)
            elif fmt == "qcow2":
                stats = restore_qcow2(r, d, target, force=force, progress=advance)
            else:
                stats = restore_raw(r, d, target, force=force, progress=advance)
            results.append({"disk": d.name, "path": str(target), "size": d.size,
                            "format": fmt, "differential": old is not None,
                            **stats.__dict__})
    elapsed = time.monotonic() - started
    doc = {"snapshot": snap.id, "vm": snap.vm, "since": old.id if old else None,
           "disks": results, "seconds": round(elapsed, 3)}

    def human() -> None:
        for res in results:
            kind = "differential " if res["differential"] else ""
            click.echo(f"restored {res['disk']} -> {res['path']} ({kind}{res['format']}, "
                       f"{human_bytes(res['bytes_written'])} written)")
        click.echo(f"done in {elapsed:.1f} s")

    ctx.emit(doc, human)


@cli.command()
@common
@click.argument("vm")
@click.option("--remove", is_flag=True, help="Remove this repository's bitmaps from the VM.")
@click.option("--all-repositories", is_flag=True,
              help="With --remove: remove the bitmaps of every repository.")
def bitmaps(repo: str | None, config: str | None, as_json: bool, vm: str, remove: bool,
            all_repositories: bool) -> None:
    """List (or remove) vmrepo's dirty bitmaps on the disks of VM."""
    ctx = Context(repo, config, as_json)
    table = ctx.settings.vm(vm)
    source = source_class(table["source"]).from_config(vm, table)
    if not isinstance(source, ChangeTracking):
        raise ConfigError(f"vm {vm}: source {table['source']!r} keeps no dirty bitmaps")
    r = ctx.open_repo()
    mine = r.config.repository_id[:16]
    try:
        if remove:
            with locked(r.backend, f"snapshot {vm}", unique=True):
                rows = source.remove_bitmaps(None if all_repositories
                                             else r.config.repository_id)
        else:
            rows = source.list_bitmaps()
    finally:
        source.close()
    for row in rows:
        row["this_repository"] = row.get("repository") == mine

    def human() -> None:
        if not rows:
            click.echo("no vmrepo bitmaps" if not remove else "nothing removed")
            return
        verb = "removed " if remove else ""
        for b in rows:
            state = ",".join(k for k in ("recording", "busy", "inconsistent", "temporary")
                             if b.get(k)) or "disabled"
            owner = "this repository" if b["this_repository"] else "other repository"
            click.echo(f"{verb}{b['node']:10} {b['name']}  {owner}  {state}  "
                       f"{human_bytes(b['dirty_bytes'])} dirty")

    ctx.emit({"bitmaps": rows, "removed": remove}, human)


@cli.command()
@common
@click.option("--all", "all_locks", is_flag=True, help="Remove every lock, not only stale ones.")
def unlock(repo: str | None, config: str | None, as_json: bool, all_locks: bool) -> None:
    """Remove stale locks."""
    ctx = Context(repo, config, as_json)
    r = ctx.open_repo()
    removed = remove_stale(r.backend, datetime.now(UTC), all_locks)
    ctx.emit({"removed": [lk.describe() for lk in removed]},
             lambda: click.echo("\n".join(f"removed {lk.describe()}" for lk in removed)
                                or "no stale locks"))


@cli.command()
@common
def locks(repo: str | None, config: str | None, as_json: bool) -> None:
    """List the repository's locks and whether each is stale."""
    ctx = Context(repo, config, as_json)
    r = ctx.open_repo()
    now = datetime.now(UTC)
    rows = [(lk, stale_reason(lk, now)) for lk in list_locks(r.backend)]
    ctx.emit({"locks": [{"lock": lk.describe(), "stale": why} for lk, why in rows]},
             lambda: click.echo("\n".join(f"{lk.describe()}{' [stale: ' + why + ']' if why else ''}"
                                          for lk, why in rows) or "no locks"))


def _raise_interrupt(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: run the CLI and turn errors into one line and an exit code."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    tune_malloc()
    try:
        cli.main(args=argv, prog_name="vmrepo", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see `{exc.ctx.command_path} --help`)"
        click.echo(f"vmrepo: error: {one_line_text(exc.format_message())}{hint}", err=True)
        sys.exit(exitcodes.USAGE if exc.exit_code == 2 else exc.exit_code)
    except click.Abort:
        click.echo("vmrepo: error: interrupted by SIGINT", err=True)
        sys.exit(exitcodes.INTERRUPTED)
    except KeyboardInterrupt as exc:
        err = Interrupted(str(exc) or "SIGINT")
        click.echo(f"vmrepo: error: {err}", err=True)
        sys.exit(exitcodes.INTERRUPTED)
    except BrokenPipeError:
        sys.exit(exitcodes.FAILURE)
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        code = exitcodes.exit_code(exc)
        if code is None:
            traceback.print_exc()
            click.echo(f"vmrepo: internal error (a bug): {exc!r}", err=True)
            sys.exit(exitcodes.INTERNAL)
        click.echo(f"vmrepo: error: {one_line(exc)}", err=True)
        sys.exit(code)
    sys.exit(exitcodes.OK)


def one_line_text(text: str) -> str:
    return " ".join(text.split())


def one_line(exc: BaseException) -> str:
    return one_line_text(str(exc)) or type(exc).__name__

