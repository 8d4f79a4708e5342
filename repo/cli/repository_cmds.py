"""Commands about the repository itself: init, upgrade, snapshots, show, locks, unlock."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click

from ..config import DEFAULT_PACK_SIZE, RepoConfig
from ..locks import list_locks, remove_stale, stale_reason
from ..plugins import open_backend
from ..repository import Repository
from ..snapshots import Snapshot
from ..spec import parse_spec, resolve
from ..units import human_bytes, parse_size
from .app import Context, command


@command()
@click.option("--chunk-size", default="256K", show_default=True,
              help="Chunk size, a power of two from 64K to 4M.")
@click.option("--pack-size", default=f"{DEFAULT_PACK_SIZE >> 20}M", show_default=True,
              help="Target size of pack files.")
def init(ctx: Context, chunk_size: str, pack_size: str) -> None:
    """Create a new repository."""
    try:
        cfg = RepoConfig.new(parse_size(chunk_size), parse_size(pack_size))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    url = ctx.repo_url()
    r = Repository.init(open_backend(url, create=True, options=ctx.settings.storage), cfg,
                        report=ctx.report)
    doc = {"repository": r.backend.location, **cfg.summary()}
    ctx.emit(doc, lambda: click.echo(
        f"created repository {cfg.repository_id} at {r.backend.location} "
        f"(chunk size {human_bytes(cfg.chunk_size)})"))


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


def snapshot_row(s: Snapshot) -> dict[str, Any]:
    return s.to_json()


@command()
@click.argument("vm", required=False)
def snapshots(ctx: Context, vm: str | None) -> None:
    """List snapshots, of one VM or all."""
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

    ctx.emit({"snapshots": [snapshot_row(s) for s in snaps]}, human)


@command()
@click.argument("spec")
def show(ctx: Context, spec: str) -> None:
    """Show one snapshot in detail (VM@WHEN)."""
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
