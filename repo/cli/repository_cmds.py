"""Commands about the repository itself: init, upgrade, snapshots, show, locks, unlock."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import click
from click.core import ParameterSource
from vmrepo.storage.objectlock import MODES

from ..config import DEFAULT_PACK_SIZE, DEFAULT_ZSTD_LEVEL, RepoConfig
from ..crypto import ALGORITHMS
from ..locks import list_locks, remove_stale, stale_reason
from ..repository import Repository
from ..snapshots import Snapshot
from ..units import human_bytes, parse_size
from .app import Context, command


@command()
@click.option("--chunk-size", default="256K", show_default=True,
              help="Chunk size, a power of two from 64K to 4M.")
@click.option("--pack-size", default=f"{DEFAULT_PACK_SIZE >> 20}M", show_default=True,
              help="Target size of pack files.")
@click.option("--compression", default=f"zstd:{DEFAULT_ZSTD_LEVEL}", show_default=True,
              help="zstd:LEVEL (1 to 22) or none.")
@click.option("--copy-params-from", metavar="REPO|REMOTE",
              help="Take chunk size, hash key and the other parameters from this repository, "
                   "so that `vmrepo copy` between the two moves blobs as they are stored.")
@click.option("--object-lock-days", type=click.IntRange(1, 36500), metavar="N",
              help="S3 only: keep every object from deletion for N days after it is written "
                   "(S3 Object Lock); copy and prune runs extend what is still kept.")
@click.option("--object-lock-mode", type=click.Choice(MODES), default="governance",
              show_default=True,
              help="governance: users with the bypass permission may lift it; compliance: "
                   "nobody can, not even the account's root.")
@click.option("--encryption", type=click.Choice([*ALGORITHMS, "none"]), default=None,
              help="Encrypt and authenticate everything (default aes-256-gcm; the key is "
                   "sealed by a passphrase from VMREPO_PASSWORD_FILE, VMREPO_PASSWORD_COMMAND "
                   "or the terminal), or none.")
def init(ctx: Context, chunk_size: str, pack_size: str, compression: str,
         copy_params_from: str | None, object_lock_days: int | None,
         object_lock_mode: str, encryption: str | None) -> None:
    """Create a new repository."""
    try:
        algorithm, level = parse_compression(compression)
        cfg = RepoConfig.new(parse_size(chunk_size), parse_size(pack_size),
                             compression_level=level, compression=algorithm,
                             encryption=encryption or ALGORITHMS[0])
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    master = None
    if copy_params_from:
        src = ctx.open_repo(copy_params_from)
        if encryption is not None and encryption != src.config.encryption:
            raise click.UsageError(f"--copy-params-from takes the encryption of the source "
                                   f"({src.config.encryption}) with its key, so that copies "
                                   "move blobs as they are stored")
        given = click.get_current_context().get_parameter_source
        if given("chunk_size") != ParameterSource.DEFAULT and \
                cfg.chunk_size != src.config.chunk_size:
            raise click.UsageError(f"--copy-params-from takes the chunk size of the source "
                                   f"({human_bytes(src.config.chunk_size)}): copies move "
                                   "blobs named by their chunks, so both need the same")
        # Pack size and compression do not change what a blob is: given, they are kept.
        cfg = replace(cfg, chunk_size=src.config.chunk_size, hash_key=src.hasher.key,
                      page_entries=src.config.page_entries, encryption=src.config.encryption)
        if given("pack_size") == ParameterSource.DEFAULT:
            cfg = replace(cfg, pack_size=src.config.pack_size)
        if given("compression") == ParameterSource.DEFAULT:
            cfg = replace(cfg, compression=src.config.compression,
                          compression_level=src.config.compression_level)
        master = src.master
    if object_lock_days is not None:
        cfg = cfg.with_object_lock(object_lock_days, object_lock_mode)
    passphrase = None
    if cfg.encrypted:
        passphrase = ctx.new_passphrase(None, ctx.repo_url())
    r = Repository.init(ctx.backend_for(create=True), cfg, passphrase=passphrase,
                        master=master, report=ctx.report)
    doc = {"repository": r.backend.location, **cfg.summary()}
    ctx.emit(doc, lambda: click.echo(
        f"created repository {cfg.repository_id} at {r.backend.location} "
        f"(chunk size {human_bytes(cfg.chunk_size)}, encryption {cfg.encryption}"
        + (f", objects locked {object_lock_days} days in {object_lock_mode} mode"
           if object_lock_days else "") + ")"))


@command()
def upgrade(ctx: Context) -> None:
    """Upgrade the repository's format in place (every snapshot is kept)."""
    r = ctx.open_repo()
    before = r.config.version
    with ctx.lock(r, "upgrade", exclusive=True):
        changed = r.upgrade()
    doc = {"from": before, "to": r.config.version, "changed": changed}
    ctx.emit(doc, lambda: click.echo(
        f"upgraded repository format {before} to {r.config.version}" if changed
        else f"repository is already format {before}"))


def parse_compression(text: str) -> tuple[str, int]:
    """``zstd:N`` or ``none``."""
    if text == "none":
        return "none", 0
    algorithm, _, level = text.partition(":")
    if algorithm != "zstd" or (level and not level.isdigit()):
        raise ValueError(f"compression must be zstd:LEVEL or none, not {text!r}")
    return "zstd", int(level) if level else DEFAULT_ZSTD_LEVEL


def _added(s: Snapshot) -> int:
    return sum(int(d.stats.get("bytes_stored", 0)) + int(d.stats.get("bytes_manifest", 0))
               for d in s.disks)


@command()
@click.argument("vm", required=False)
@click.option("--tag", "tags", multiple=True, metavar="TAG",
              help="Only snapshots with this tag (repeatable: all of them).")
@click.option("--last", type=click.IntRange(1), default=None, metavar="N",
              help="Only the N newest snapshots of each VM.")
def snapshots(ctx: Context, vm: str | None, tags: tuple[str, ...], last: int | None) -> None:
    """List snapshots, of one VM or all."""
    every = ctx.open_repo().snapshots()
    snaps = [s for s in every if (vm is None or s.vm == vm) and all(t in s.tags for t in tags)]
    if last is not None:
        by_vm: dict[str, list[Snapshot]] = {}
        for s in snaps:
            by_vm.setdefault(s.vm, []).append(s)
        keep = {s.id for group in by_vm.values() for s in group[-last:]}
        snaps = [s for s in snaps if s.id in keep]

    def human() -> None:
        if not snaps:
            known = sorted({s.vm for s in every})
            click.echo("no snapshots" + (f" of VM {vm}" if vm else "") + (
                f" with tag{'s' if len(tags) > 1 else ''} {', '.join(tags)}" if tags else "")
                + (f" (VMs with snapshots: {', '.join(known)})"
                   if vm and vm not in known and known else ""))
            return
        click.echo(f"{'ID':8}  {'VM':12}  {'TIME':19}  {'DISKS':>5}  {'SIZE':>10}  "
                   f"{'ADDED':>10}  {'TAKEN':11}  TAGS")
        for s in snaps:
            taken = ",".join(sorted({d.taken for d in s.disks}))
            click.echo(f"{s.short_id:8}  {s.vm:12}  {s.time.astimezone():%Y-%m-%d %H:%M:%S}  "
                       f"{len(s.disks):>5}  {human_bytes(sum(d.size for d in s.disks)):>10}  "
                       f"{human_bytes(_added(s)):>10}  {taken:11}  {','.join(s.tags) or '-'}")

    ctx.emit({"snapshots": [{**s.to_json(), "added": _added(s)} for s in snaps]}, human)


@command()
@click.argument("spec")
def show(ctx: Context, spec: str) -> None:
    """Show one snapshot in detail (VM@WHEN)."""
    r = ctx.open_repo()
    snap = r.find_snapshot(spec)

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


@command()
@click.option("--all", "all_locks", is_flag=True, help="Remove every lock, not only stale ones.")
def unlock(ctx: Context, all_locks: bool) -> None:
    """Remove stale and corrupt locks."""
    r = ctx.open_repo()
    removed, corrupt = remove_stale(r.store, datetime.now(UTC), all_locks)
    lines = [f"removed {lk.describe()}" for lk in removed] + \
        [f"removed {bad.describe()}" for bad in corrupt]
    ctx.emit({"removed": [lk.describe() for lk in removed],
              "removed_corrupt": [bad.describe() for bad in corrupt]},
             lambda: click.echo("\n".join(lines) or "no stale locks"))


@command()
def locks(ctx: Context) -> None:
    """List the repository's locks and whether each is stale or corrupt."""
    r = ctx.open_repo()
    now = datetime.now(UTC)
    held, corrupt = list_locks(r.store)
    rows = [(lk, stale_reason(lk, now)) for lk in held]
    lines = [f"{lk.describe()}{' [stale: ' + why + ']' if why else ''}" for lk, why in rows]
    lines += [bad.describe() for bad in corrupt]
    ctx.emit({"locks": [{"lock": lk.describe(), "scope": lk.scope, "exclusive": lk.exclusive,
                         "stale": why} for lk, why in rows],
              "corrupt": [{"id": bad.id, "problem": bad.problem} for bad in corrupt]},
             lambda: click.echo("\n".join(lines) or "no locks"))
