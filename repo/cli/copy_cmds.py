"""The copy command: snapshots to another repository (an offsite copy), only what it lacks."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import click

from .. import forget as forgetting
from .. import marks
from ..copy import copy_snapshots
from ..errors import SnapshotNotFound
from ..format import pack_key
from ..immutability import extend_retention
from ..prune import GRACE
from ..repository import Repository
from ..retention import format_duration
from ..snapshots import Snapshot
from ..spec import VM_NAME_RE
from ..units import counted, human_bytes
from .app import Context, command
from .retention_cmds import apply_policy, parse_grace, prune_lines


def select(repo: Repository, snaps: list[Snapshot], specs: tuple[str, ...]
           ) -> tuple[list[Snapshot], set[str]]:
    """Every snapshot of ``repo`` (``snaps``), or those of the VMs and VM@WHEN specs named;
    and the ids of those named one by one (VM@WHEN)."""
    if not specs:
        return snaps, set()
    chosen: dict[str, Snapshot] = {}
    one_by_one: set[str] = set()
    for spec in specs:
        if "@" not in spec and VM_NAME_RE.fullmatch(spec):
            of_vm = [s for s in snaps if s.vm == spec]
            if not of_vm:
                raise SnapshotNotFound.of_vm(spec)
            chosen.update((s.id, s) for s in of_vm)
        else:
            s = repo.find_snapshot(spec, snaps)
            chosen[s.id] = s
            one_by_one.add(s.id)
    return sorted(chosen.values(), key=lambda s: (s.time, s.id)), one_by_one


@command()
@click.argument("specs", nargs=-1, metavar="[VM | VM@WHEN]...")
@click.option("--to", "to", required=True, metavar="REPO|REMOTE",
              help="The destination: a [remote.NAME] of the config, or a URL or path.")
@click.option("--grace", "grace", default=format_duration(GRACE), metavar="DURATION",
              show_default=True,
              help="Grace period of the prune that applies the remote's keep policy.")
def copy(ctx: Context, specs: tuple[str, ...], to: str, grace: str) -> None:
    """Copy snapshots the destination lacks (all, or those named), sending only the blobs it
    lacks; then, if the remote has a `keep` policy, forget and prune there by it."""
    period = parse_grace(grace)
    policy = ctx.settings.remote_policy(to)
    src = ctx.open_repo()
    dst = ctx.open_repo(to)
    started = time.monotonic()
    snaps, named = select(src, src.snapshots(), specs)
    left_out = 0
    if policy is not None:
        # Only what the remote's policy keeps, counting what it holds already: a snapshot it
        # would forget right away is not sent (and sent again next time).
        have = dst.snapshots()
        ids = {h.id for h in have}
        wanted = forgetting.plan(have + [s for s in snaps if s.id not in ids],
                                 lambda vm: policy, datetime.now(UTC))
        keep = {s.id for s in wanted.kept}
        dropped = [s for s in snaps if s.id not in keep and s.id not in ids]
        left_out = len(dropped)
        snaps = [s for s in snaps if s.id in keep or s.id in ids]
        asked = [f"{s.vm}@{s.short_id}" for s in dropped if s.id in named]
        if asked:
            them = "it" if len(asked) == 1 else "them"
            ctx.warn(f"not copied: {', '.join(asked)}: {to}'s {policy.describe()} would forget "
                     f"{them} at once (to copy {them}, tag {them} with a tag that policy keeps: "
                     "`tags = [...]` in its keep)")
    with ctx.lock(src, f"copy to {to}", read_only=True) as held_src, \
            ctx.lock(dst, f"copy from {src.config.repository_id[:8]}") as held_dst:
        stats = copy_snapshots(src, dst, snaps,
                               check_src=held_src.check if held_src else None,
                               check_dst=held_dst.check if held_dst else None)
    elapsed = time.monotonic() - started
    offsite = None
    extended = 0
    if policy is not None:  # its prune extends the object lock too
        offsite = apply_policy(ctx, dst, lambda vm: policy, grace=period)
    elif dst.object_lock is not None:
        condemned = marks.condemned(marks.load_marks(dst.store))
        extended = extend_retention(dst.backend, dst.config, dst.cache.root,
                                    datetime.now(UTC),
                                    frozenset(pack_key(p) for p in condemned)).extended
    if stats.transcoded:
        ctx.warn(f"{to} has other parameters (chunk size, hash key): the snapshots were "
                 "rebuilt there, which is slower; `init --copy-params-from` avoids it")
    doc = {"to": dst.backend.location, **stats.as_dict(), "seconds": round(elapsed, 3),
           "left_out_by_policy": left_out}
    if extended:
        doc["objects_extended"] = extended
    if offsite is not None:
        doc["retention"] = {**offsite[0].as_dict(), "prune": offsite[1].as_dict()}

    def human() -> None:
        if not stats.snapshots:
            click.echo(f"nothing to copy: {dst.backend.location} has all "
                       f"{counted(len(snaps), 'snapshot')} already (0 bytes sent)" if snaps
                       else f"nothing to copy to {dst.backend.location} (0 bytes sent)")
        else:
            click.echo(f"copied {counted(stats.snapshots, 'snapshot')} to "
                       f"{dst.backend.location} ({stats.already_there} already there): sent "
                       f"{human_bytes(stats.bytes_sent)} in {counted(stats.blobs_sent, 'blob')} "
                       f"({counted(stats.packs_whole, 'whole pack')}) in {elapsed:.1f} s")
        if left_out:
            click.echo(f"{to}: left out {counted(left_out, 'snapshot')} its keep policy "
                       "would forget at once")
        if extended:
            click.echo(f"{to}: extended the object lock of {counted(extended, 'object')}")
        if offsite is not None:
            the_plan, pruned = offsite
            click.echo(f"{to}: {policy.describe() if policy else ''}: removed "
                       f"{counted(len(the_plan.removed), 'snapshot')}, kept "
                       f"{len(the_plan.kept)}")
            for line in prune_lines(pruned, period):
                click.echo(f"{to}: {line}")

    ctx.emit(doc, human)
