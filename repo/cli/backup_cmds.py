"""Commands that talk to VMs: snapshot and bitmaps."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, cast

import click
from vmrepo.sources.base import ChangeTracking, DiskStream, Source, Wanted

from .. import exitcodes, interrupts
from ..backup import SnapshotOptions, take_snapshot
from ..errors import ConfigError, SomeFailed
from ..locks import vm_scope
from ..plugins import make_source
from ..progress import progress_bar
from ..repository import Repository
from ..snapshots import Snapshot
from ..units import counted, human_bytes, ratio
from .app import Context, command


@command()
@click.argument("vm", required=False)
@click.option("--all", "every", is_flag=True, help="Snapshot every VM of the config.")
@click.option("--tag", "tags", multiple=True, help="Tag the snapshot (repeatable).")
@click.option("--full", is_flag=True, help="Read every disk in full.")
@click.option("--differential", is_flag=True,
              help="Read everything changed since the last full snapshot.")
def snapshot(ctx: Context, vm: str | None, every: bool, tags: tuple[str, ...],
             full: bool, differential: bool) -> None:
    """Take a snapshot of the disks of VM (or, with --all, of every VM in the config)."""
    if every == (vm is not None):
        raise click.UsageError("give a VM name or --all")
    if full and differential:
        raise click.UsageError("--full and --differential exclude each other")
    mode = "full" if full else "differential" if differential else None
    if every:
        _snapshot_all(ctx, tags, mode or "auto")
        return
    assert vm is not None
    source = make_source(ctx.settings, vm)
    r = ctx.open_repo()
    started = time.monotonic()
    try:  # once committed (signals held from then), the lock's release and report too
        snap = _take(ctx, r, source, vm, tags, mode or "auto")
        elapsed = time.monotonic() - started
        doc = snapshot_doc(snap, elapsed)
        ctx.emit(doc, lambda: print_snapshot_summary(snap, elapsed))
    finally:
        came = interrupts.release()
    if came:
        ctx.warn(interrupts.came_while_committing(came[0]))


def _take(ctx: Context, r: Repository, source: Source, vm: str, tags: tuple[str, ...],
          mode: str, prefix: str = "") -> Snapshot:
    with ctx.lock(r, f"snapshot {vm}", scope=vm_scope(vm), exclusive=True) as lock:
        assert lock is not None
        snap = _snapshot_with_progress(ctx, r, source, vm, tags, mode, lock.check)
    for d in snap.disks:
        if d.source.get("fallback"):
            ctx.warn(f"{prefix}disk {d.name}: {d.reason}")
    for w in snap.warnings:
        ctx.warn(f"{prefix}{w}")
    return snap


def _snapshot_all(ctx: Context, tags: tuple[str, ...], mode: str) -> None:
    """One snapshot per VM of the config, each on its own; a summary; exit code 8 if any
    failed."""
    vms = sorted(ctx.settings.vms)
    if not vms:
        raise ConfigError("--all: the config defines no VM")
    r = ctx.open_repo()
    done: list[tuple[Snapshot, float]] = []
    failed: list[dict[str, Any]] = []
    for vm in vms:
        started = time.monotonic()
        try:
            try:
                snap = _take(ctx, r, make_source(ctx.settings, vm), vm, tags, mode, f"{vm}: ")
            finally:
                came = interrupts.release()
        except Exception as exc:  # noqa: BLE001 - one VM's failure must not stop the others
            code = exitcodes.exit_code(exc)
            message = str(exc) if code is not None else f"internal error (a bug): {exc!r}"
            ctx.warn(f"{vm}: {message}")
            failed.append({"vm": vm, "error": message,
                           "exit_code": code if code is not None else exitcodes.INTERNAL})
            continue
        done.append((snap, time.monotonic() - started))
        if came:
            ctx.warn(f"{vm}: {interrupts.came_while_committing(came[0])}")
        if came or snap.interrupted:  # held while that VM's snapshot was committed: stop
            raise KeyboardInterrupt(came[0] if came else snap.interrupted)
    doc = {"snapshots": [snapshot_doc(s, t) for s, t in done], "failed": failed}

    def human() -> None:
        for s, t in done:
            added = sum(d.stats["bytes_stored"] + d.stats["bytes_manifest"] for d in s.disks)
            click.echo(f"{s.vm:16} ok      {s.short_id}  "
                       f"{','.join(sorted({d.taken for d in s.disks})):12} added "
                       f"{human_bytes(added)} in {t:.1f} s")
        for f in failed:
            click.echo(f"{f['vm']:16} FAILED  (exit {f['exit_code']}) {f['error']}")
        click.echo(f"{len(done)} of {len(vms)} VMs snapshotted")

    ctx.emit(doc, human)
    if failed:
        raise SomeFailed(f"{len(failed)} of {len(vms)} VMs failed: "
                         + ", ".join(f["vm"] for f in failed))


def _snapshot_with_progress(ctx: Context, r: Repository, source: Source, vm: str,
                            tags: tuple[str, ...], mode: str,
                            check: Callable[[], None]) -> Snapshot:
    """Take the snapshot with a progress bar sized once the source knows its disks."""
    with contextlib.ExitStack() as stack:
        bar: list[Callable[[int], None] | None] = [None]

        def on_begin(disks: list[DiskStream]) -> None:
            total = sum(d.work_bytes() for d in disks)
            bar[0] = stack.enter_context(progress_bar(total, f"snapshot {vm}",
                                                      ctx.show_progress()))

        def progress(n: int) -> None:
            if bar[0] is not None:
                bar[0](n)

        opts = SnapshotOptions(vm=vm, tags=tags, wanted=cast(Wanted, mode),
                               progress=progress, on_begin=on_begin, check=check,
                               on_commit=interrupts.hold)
        return take_snapshot(r, source, opts)


def snapshot_doc(snap: Snapshot, elapsed: float) -> dict[str, Any]:
    doc = snap.to_json()
    totals: dict[str, float] = {k: sum(int(d.stats.get(k, 0)) for d in snap.disks)
              for k in ("bytes_data", "bytes_zero", "bytes_new", "bytes_stored", "chunks",
                        "chunks_new", "chunks_zero", "pages_new", "bytes_manifest")}
    totals["seconds"] = round(elapsed, 3)
    doc["totals"] = totals
    doc["warnings"] = list(snap.warnings)  # also on stderr
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
                   f"{counted(s['pages_new'], 'manifest page')} "
                   f"({human_bytes(s['bytes_manifest'])})")
    click.echo(f"  total: read {human_bytes(read)}, added {human_bytes(added)} "
               f"(ratio {ratio(read, added)}) in {elapsed:.1f} s")


@command()
@click.argument("vm")
@click.option("--remove", is_flag=True, help="Remove this repository's bitmaps from the VM.")
@click.option("--all-repositories", is_flag=True,
              help="With --remove: remove the bitmaps of every repository.")
def bitmaps(ctx: Context, vm: str, remove: bool, all_repositories: bool) -> None:
    """List (or remove) vmrepo's dirty bitmaps on the disks of VM."""
    source = make_source(ctx.settings, vm)
    if not isinstance(source, ChangeTracking):
        raise ConfigError(f"vm {vm}: source {source.plugin!r} keeps no dirty bitmaps")
    r = ctx.open_repo()
    mine = r.config.repository_id[:16]
    try:
        if remove:
            with ctx.lock(r, f"bitmaps {vm}", scope=vm_scope(vm), exclusive=True):
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
            # A source that can tell why a bitmap is unusable (missing from a shut-off
            # domain's image, inconsistent) says so; else its flags, none: disabled.
            state = b.get("problem") or ",".join(
                k for k in ("recording", "busy", "inconsistent", "temporary") if b.get(k)
            ) or "disabled"
            owner = "this repository" if b["this_repository"] else "other repository"
            click.echo(f"{verb}{b['node']:10} {b['name']}  {owner}  {state}  "
                       f"{human_bytes(b['dirty_bytes'])} dirty")

    ctx.emit({"bitmaps": rows, "removed": remove}, human)
