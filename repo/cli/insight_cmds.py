"""Commands that tell what the repository holds: stats, diff, tag."""

from __future__ import annotations

import click

from ..diff import diff as diff_snapshots
from ..errors import SpecError
from ..locks import vm_scope
from ..snapshots import save_snapshot
from ..spec import label, parse_spec
from ..stats import gather
from ..units import counted, human_bytes, ratio
from .app import Context, command


@command()
@click.argument("spec", required=False)
def stats(ctx: Context, spec: str | None) -> None:
    """Repository size, stored and logical bytes, dedup and compression ratios; what each
    snapshot (or VM@WHEN) added and what it alone holds."""
    r = ctx.open_repo()
    snaps = r.snapshots()
    focus = r.find_snapshot(spec, snaps) if spec else None
    with ctx.lock(r, "stats", read_only=True):
        figs = gather(r, snaps)
    if figs.missing:
        ctx.warn(f"{figs.missing} referenced blobs are not in the index (see `vmrepo verify`)")
    rows = [f for f in figs.per_snapshot if focus is None or f.id == focus.id]
    doc = figs.as_dict()
    doc["per_snapshot"] = [f.as_dict() for f in rows]

    def human() -> None:
        if focus is None:
            click.echo(f"snapshots        {figs.snapshots}")
            click.echo(f"stored           {human_bytes(figs.pack_bytes)} in {figs.packs} packs, "
                       f"index {human_bytes(figs.index_bytes)} in {figs.index_segments} "
                       "segments")
            click.echo(f"logical          {human_bytes(figs.logical)} (the snapshots' data)")
            click.echo(f"unique           {human_bytes(figs.unique_raw)} in "
                       f"{figs.blobs_referenced} blobs, {human_bytes(figs.unique_stored)} "
                       "stored")
            click.echo(f"dedup ratio      {ratio(figs.logical, figs.unique_raw)}")
            click.echo(f"compression      {ratio(figs.unique_raw, figs.unique_stored)}")
            click.echo(f"unreferenced     {human_bytes(figs.unreferenced_bytes)} "
                       "(freed by prune)")
        click.echo(f"{'SNAPSHOT':21} {'LOGICAL':>11} {'ADDED':>11} {'ONLY HERE':>11}")
        by_id = {s.id: s for s in snaps}
        for f in rows:
            click.echo(f"{by_id[f.id].vm + '@' + f.id[:8]:21} {human_bytes(f.logical):>11} "
                       f"{human_bytes(f.added):>11} {human_bytes(f.exclusive_stored):>11}")

    ctx.emit(doc, human)


@command()
@click.argument("spec_a")
@click.argument("spec_b")
def diff(ctx: Context, spec_a: str, spec_b: str) -> None:
    """Changed byte ranges per disk between two snapshots (A older, B newer)."""
    r = ctx.open_repo()
    snaps = r.snapshots()
    a, b = r.find_snapshot(spec_a, snaps), r.find_snapshot(spec_b, snaps)
    with ctx.lock(r, "diff", read_only=True):
        disks = diff_snapshots(r, a, b)
    doc = {"a": a.id, "b": b.id, "disks": [d.as_dict() for d in disks]}

    def human() -> None:
        click.echo(f"{label(a)} -> {label(b)}")
        for d in disks:
            if d.state in ("added", "removed"):
                click.echo(f"  {d.name}: {d.state}")
                continue
            if d.state == "resized":
                click.echo(f"  {d.name}: resized from {human_bytes(d.size_a or 0)} to "
                           f"{human_bytes(d.size_b or 0)}")
                continue
            click.echo(f"  {d.name}: {human_bytes(d.changed_bytes)} changed in "
                       f"{counted(len(d.ranges), 'range')}")
            for start, end in d.ranges[:20]:
                click.echo(f"    bytes {start}-{end} ({human_bytes(end - start)})")
            if len(d.ranges) > 20:
                click.echo(f"    ... {len(d.ranges) - 20} more (see --json)")

    ctx.emit(doc, human)


@command()
@click.argument("spec")
@click.option("--add", "add", multiple=True, metavar="TAG", help="Add a tag (repeatable).")
@click.option("--remove", "remove", multiple=True, metavar="TAG",
              help="Remove a tag (repeatable).")
def tag(ctx: Context, spec: str, add: tuple[str, ...], remove: tuple[str, ...]) -> None:
    """Change the tags of a snapshot (VM@WHEN)."""
    if not add and not remove:
        raise click.UsageError("give --add TAG or --remove TAG")
    for t in add:
        if not t or any(c.isspace() or c == "," for c in t):
            raise SpecError(t, "a tag is a non-empty word without spaces or commas")
    r = ctx.open_repo()
    wanted = parse_spec(spec)
    # The VM's lock, as forget takes it, before the spec is resolved: a record rewritten
    # after a forget deleted it would bring back a snapshot a prune may already have taken.
    with ctx.lock(r, f"tag {wanted.vm}", scope=vm_scope(wanted.vm), exclusive=True):
        snap = r.find_snapshot(spec)
        before = list(snap.tags)
        snap.tags = [t for t in before if t not in remove] + \
            [t for t in dict.fromkeys(add) if t not in before]
        if snap.tags != before:
            save_snapshot(r.store, snap)
    ctx.emit({"id": snap.id, "tags": snap.tags, "changed": snap.tags != before},
             lambda: click.echo(f"{label(snap)}: tags {', '.join(snap.tags) or '-'}"))
