"""Integrity commands: verify (structure, and with --read-data every byte) and repair."""

from __future__ import annotations

import click

from ..errors import IntegrityError
from ..repair import RepairReport, repair_data, repair_index, repair_snapshots
from ..units import counted, human_bytes
from ..verify import VerifyOptions, VerifyReport, verify
from .app import Context, command, parse_wait


class DamageFound(IntegrityError):
    """verify found damage (its report, JSON included, was already printed)."""

    emitted = True


def parse_subset(text: str) -> tuple[int, int]:
    """``K/M`` (K parts of M per run, in turn) or ``P%`` (one part of 100/P)."""
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 < share <= 100:
                raise ValueError
            return 1, max(1, round(100 / share))
        k, m = (int(x) for x in text.split("/"))
        if not 1 <= k <= m:
            raise ValueError
        return k, m
    except ValueError:
        raise click.BadParameter(f"expected K/M (such as 1/7) or a percentage (such as 10%), "
                                 f"not {text!r}", param_hint="--read-data-subset") from None


def verify_lines(rep: VerifyReport) -> list[str]:
    out = [f"checked {counted(rep.snapshots, 'snapshot')}, {counted(rep.packs, 'pack')} "
           f"({human_bytes(rep.pack_bytes)}), {counted(rep.blobs, 'blob')}"]
    if rep.read is not None:
        r = rep.read
        part = f" (part {r.part} of {r.parts})" if r.parts > 1 else ""
        state = "" if r.complete else "; stopped at the time limit, the next run resumes"
        out.append(f"read {r.packs} of {r.packs_in_part} packs{part}, {human_bytes(r.bytes)} in "
                   f"{r.seconds:.1f} s{state}")
    for f in rep.findings:
        out.append(f"damage: {f.key}: {f.problem}")
    for a in rep.affected:
        shown = ", ".join(f"{s}-{e}" for s, e in a.ranges[:4])
        more = f" and {len(a.ranges) - 4} more" if len(a.ranges) > 4 else ""
        out.append(f"affected: {a.snapshot.vm}@{a.snapshot.short_id} disk {a.disk}: "
                   f"{human_bytes(a.bytes)} in {counted(len(a.ranges), 'range')} "
                   f"(bytes {shown}{more})")
    if rep.findings:
        out.append(f"intact: {counted(len(rep.intact), 'snapshot')}"
                   + (": " + ", ".join(f"{s.vm}@{s.short_id}" for s in rep.intact[:8])
                      if rep.intact else ""))
    if rep.reclaimable_bytes:
        # With damage, what looks unreferenced may be what a lost index entry points to:
        # prune refuses then, so repair comes first.
        then = "after `vmrepo repair`, " if rep.findings else ""
        out.append(f"reclaimable: {human_bytes(rep.reclaimable_bytes)} no snapshot references "
                   f"({then}`vmrepo prune` frees it)")
    if rep.unindexed and not rep.unindexed_needed:
        out.append(f"not indexed: {counted(len(rep.unindexed), 'pack')} of an interrupted "
                   "or running snapshot, which no snapshot needs (`vmrepo prune` removes "
                   "them once no session can be using them)")
    if rep.condemned:
        out.append(f"waiting for deletion: {counted(len(rep.condemned), 'pack')} an "
                   "unfinished prune condemned (the next `vmrepo prune` deletes them)")
    out.append("damage found: `vmrepo repair` heals what it can (`--from REPO` fetches lost "
               "blobs from a replica)" if rep.findings else "no damage found")
    return out


@command("verify")
@click.option("--read-data", is_flag=True,
              help="Read, decompress and re-hash every stored blob (else: structure only).")
@click.option("--read-data-subset", "subset", metavar="K/M|P%",
              help="Read K parts of M (or P%) of the packs, the next ones each run.")
@click.option("--max-duration", metavar="DURATION",
              help="Stop reading data after this long (e.g. 2h); the next run resumes.")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Packs read in parallel (default: from the CPUs and the store).")
def verify_cmd(ctx: Context, read_data: bool, subset: str | None, max_duration: str | None,
               workers: int | None) -> None:
    """Check the repository: every snapshot's data is indexed and where the index says;
    with --read-data every byte is read and checked. Names what damage affects."""
    parts = parse_subset(subset) if subset else None
    seconds = parse_wait(max_duration, "--max-duration") if max_duration else None
    r = ctx.open_repo()
    reports: list[VerifyReport] = []
    with ctx.lock(r, "verify", read_only=True) as held:
        opts = VerifyOptions(read_data=read_data or parts is not None or seconds is not None,
                             parts=parts[1] if parts else None, max_seconds=seconds,
                             workers=workers, check=held.check if held else None,
                             record=held is not None)
        for _ in range(parts[0] if parts else 1):
            reports.append(verify(r, opts))
            if reports[-1].read is not None and not reports[-1].read.complete:
                break
    rep = _combined(reports)
    ctx.emit(rep.as_dict(), lambda: click.echo("\n".join(verify_lines(rep))))
    if not rep.clean:
        snaps = len({a.snapshot.id for a in rep.affected})
        raise DamageFound(f"damage found: {counted(len(rep.findings), 'problem')}, "
                          f"{counted(len(rep.affected), 'disk')} of "
                          f"{counted(snaps, 'snapshot')} affected")


def _combined(reports: list[VerifyReport]) -> VerifyReport:
    """Several parts read in one run, as one report (the last one's findings cover them)."""
    last = reports[-1]
    if len(reports) > 1 and last.read is not None:
        for r in reports[:-1]:
            if r.read is not None:
                last.read.packs += r.read.packs
                last.read.bytes += r.read.bytes
                last.read.packs_in_part += r.read.packs_in_part
                last.read.seconds += r.read.seconds
        seen = {(f.key, f.problem) for f in last.findings}
        last.findings += [f for r in reports[:-1] for f in r.findings
                          if (f.key, f.problem) not in seen]
    return last


@command()
@click.argument("what", required=False, type=click.Choice(["data", "index", "snapshots"]),
                default="data")
@click.option("--from", "replica", metavar="REPO|REMOTE",
              help="Fetch blobs no usable copy holds from this replica (same parameters, "
                   "e.g. the offsite copy made with `init --copy-params-from`).")
@click.option("--read-data/--no-read-data", default=True, show_default=True,
              help="Read every blob first to find damaged copies (data repair).")
def repair(ctx: Context, what: str, replica: str | None, read_data: bool) -> None:
    """Heal the repository: `repair` (data: damaged packs rewritten, lost blobs from
    --from), `repair index` (rebuilt from the packs), `repair snapshots` (undecodable
    records set aside)."""
    r = ctx.open_repo()
    src = ctx.open_repo(replica) if replica else None
    with ctx.lock(r, f"repair {what}", exclusive=True) as held:
        check = held.check if held else None
        if what == "index":
            rep = repair_index(r, check)
        elif what == "snapshots":
            rep = repair_snapshots(r)
        else:
            found = verify(r, VerifyOptions(read_data=read_data, check=check))
            rep = repair_data(r, found, src, check)
    ctx.emit(rep.as_dict(), lambda: click.echo("\n".join(repair_lines(what, rep))))
    if rep.still_lost:
        raise DamageFound(f"repair left {counted(rep.still_lost, 'blob')} lost: no usable copy"
                          + ("" if replica else " (`--from REPLICA` fetches them from a copy)"))


def repair_lines(what: str, rep: RepairReport) -> list[str]:
    out = []
    if rep.packs_indexed:
        out.append(f"indexed {counted(rep.packs_indexed, 'pack')} in "
                   f"{counted(rep.segments_written, 'segment')}")
    if what == "index" and rep.segments_deleted:
        out.append(f"deleted the {rep.segments_deleted} old index segments")
    out += [f"cannot read, left unindexed: {p}" for p in rep.packs_unreadable]
    if rep.packs_rewritten or rep.blobs_from_replica:
        out.append(f"rewrote {counted(rep.blobs_rewritten, 'blob')} of "
                   f"{counted(rep.packs_rewritten, 'damaged pack')}, fetched "
                   f"{rep.blobs_from_replica} from the replica, dropped "
                   f"{counted(rep.packs_dropped, 'pack')}")
    elif rep.packs_dropped:
        out.append(f"dropped {counted(rep.packs_dropped, 'pack')} from the index (missing or "
                   "damaged)")
    if rep.still_lost:
        out.append(f"{counted(rep.still_lost, 'blob')} {'is' if rep.still_lost == 1 else 'are'}"
                   " lost (no usable copy"
                   f"{'' if rep.blobs_from_replica else '; try --from REPLICA'})")
    out += [f"moved {k} to quarantine/ (it cannot be decoded)" for k in rep.quarantined]
    if not out:
        out.append("nothing to repair")
    return out
