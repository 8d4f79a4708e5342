"""The restore command: raw (file or block device), qcow2 and differential qcow2 images."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import RestoreError, RestoreIncomplete
from ..format import ZERO_ID
from ..output import check_new_file, output_error
from ..progress import progress_bar
from ..restore import (
    RestoreStats,
    changed_chunks,
    data_bytes,
    restore_differential,
    restore_qcow2,
    restore_raw,
)
from ..snapshots import DiskRecord
from ..spec import label
from ..units import human_bytes
from .app import Context, command


@command()
@click.argument("spec")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Directory (one DISK.FORMAT per disk; made if missing) or, with --disk, "
                   "the image file or block device.")
@click.option("--disk", help="Restore only this disk.")
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]), default="raw",
              show_default=True)
@click.option("--since", help="With --format qcow2: write only what changed since VM@WHEN.")
@click.option("--backing", help="Backing image of the differential qcow2; {disk} is replaced "
                                "by the disk name.")
@click.option("--no-check-backing", is_flag=True,
              help="Do not check that the backing image holds the --since snapshot (unsafe).")
@click.option("--force", is_flag=True,
              help="Replace existing output files; write over a block device.")
@click.option("--discard", is_flag=True,
              help="On a block device, discard zero chunks instead of writing zeros.")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Parallel reads (default: from the CPU count and the store).")
@click.option("--no-sync", is_flag=True,
              help="Do not wait until a raw image file is on disk before naming it (faster; "
                   "a host crash right after the restore may leave it incomplete).")
@click.option("--allow-damaged", is_flag=True,
              help="Write zeros where data is damaged or missing, finish the rest, list the "
                   "ranges (exit code 7).")
def restore(ctx: Context, spec: str, output: Path, disk: str | None, fmt: str,
            since: str | None, backing: str | None, no_check_backing: bool, force: bool,
            discard: bool, workers: int | None, no_sync: bool, allow_damaged: bool) -> None:
    """Rebuild the disk images of a snapshot (VM@WHEN)."""
    if allow_damaged and since:
        raise click.UsageError("--allow-damaged restores whole images, not differential ones")
    if since and (fmt != "qcow2" or not backing):
        raise click.UsageError("--since needs --format qcow2 and --backing IMAGE")
    if backing and not since:
        raise click.UsageError("--backing goes with --since")
    r = ctx.open_repo()
    all_snaps = r.snapshots()
    snap = r.find_snapshot(spec, all_snaps)
    old = r.find_snapshot(since, all_snaps) if since else None
    if old is not None and old.id == snap.id:
        raise RestoreError(f"--since names the snapshot being restored ({label(snap)}): a "
                           "differential image needs an older snapshot")
    disks = snap.disks
    if disk is not None:
        chosen = snap.disk(disk)
        if chosen is None:
            raise RestoreError(f"snapshot {snap.short_id} has no disk {disk!r} (has: "
                               f"{', '.join(d.name for d in snap.disks)})")
        disks = [chosen]
    single = disk is not None
    if not single:
        if output.exists() and not output.is_dir():
            raise RestoreError(f"{output} is not a directory (give --disk NAME to restore one "
                               "disk into a file or onto a block device)", str(output))
        try:
            output.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(exc, output, "create directory") from None
        for d in disks:  # every image refused before any is written
            check_new_file(output / f"{d.name}.{fmt}", force)
    if old is not None and len(disks) > 1 and backing and "{disk}" not in backing:
        raise click.UsageError("several disks: give --disk NAME or a --backing with {disk}")
    started = time.monotonic()
    results = []
    with ctx.lock(r, f"restore {snap.vm}", read_only=True) as lock:
        check = lock.check if lock is not None else None
        plans: list[tuple[DiskRecord, DiskRecord | None, int]] = []
        for d in disks:
            if old is not None:
                since_disk = old.disk(d.name)
                if since_disk is None:
                    raise RestoreError(f"{since} has no disk {d.name}")
                manifest, base = r.manifest(d.root), r.manifest(since_disk.root)
                todo = sum(manifest.chunk_length(i) for i, cid in
                           changed_chunks(r, manifest, base) if cid != ZERO_ID)
                plans.append((d, since_disk, todo))
            else:
                plans.append((d, None, data_bytes(r, d, allow_damaged)
                              if ctx.show_progress() else 0))
        total = sum(t for _, _, t in plans)
        with progress_bar(total, f"restore {snap.vm}", ctx.show_progress()) as advance:
            for d, since_disk, _ in plans:
                target = output if single else output / f"{d.name}.{fmt}"
                stats: RestoreStats
                if since_disk is not None:
                    assert backing is not None and old is not None
                    stats = restore_differential(
                        r, d, since_disk, target, Path(backing.replace("{disk}", d.name)),
                        force=force, progress=advance, workers=workers, check=check,
                        check_backing=not no_check_backing, since_label=label(old))
                elif fmt == "qcow2":
                    stats = restore_qcow2(r, d, target, force=force, progress=advance,
                                          workers=workers, check=check,
                                          allow_damaged=allow_damaged)
                else:
                    stats = restore_raw(r, d, target, force=force, progress=advance,
                                        workers=workers, check=check, sync=not no_sync,
                                        discard=discard, allow_damaged=allow_damaged)
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
            for start, end in res["damaged"]:
                click.echo(f"  damaged, written as zeros: bytes {start}-{end}")
        click.echo(f"done in {elapsed:.1f} s")

    ctx.emit(doc, human)
    damaged = [(res["disk"], r_) for res in results for r_ in res["damaged"]]
    if damaged:
        raise RestoreIncomplete(f"restore incomplete: {len(damaged)} damaged ranges of "
                                f"{len({d for d, _ in damaged})} disks written as zeros",
                                ranges=damaged)
