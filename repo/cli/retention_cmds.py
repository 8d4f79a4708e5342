"""Retention commands: forget (by policy or by name) and prune."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from .. import forget as forgetting
from ..errors import ConfigError, RepositoryLocked, SnapshotNotFound, SomeFailed, SpecError
from ..forget import ForgetPlan
from ..locks import RepoLock, vm_scope
from ..prune import GRACE, MAX_UNUSED, PruneOptions, PruneReport, prune
from ..repository import Repository
from ..retention import Policy, format_duration
from ..snapshots import Snapshot
from ..spec import VM_NAME_RE
from ..units import counted, human_bytes
from .app import Context, command, parse_wait

PRUNE_SCOPE = "prune"


#: Longer grace periods are surely a mistake.
MAX_GRACE = timedelta(days=3650)


def parse_grace(text: str) -> timedelta:
    """A grace period: ``0`` or a duration such as ``30m``, ``12h``, ``1d``, ``2w``."""
    period = timedelta(seconds=parse_wait(text, "--grace"))
    if period > MAX_GRACE:
        raise click.BadParameter(f"{text!r} is longer than ten years", param_hint="--grace")
    return period


def parse_percent(text: str) -> float:
    """``30``, ``30%`` or ``7.5%`` as a share between 0 and 1."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise click.BadParameter(f"expected a percentage such as 30 or 30%, not {text!r}") \
            from None
    if not 0 <= value <= 100:
        raise click.BadParameter(f"{text!r} is not between 0 and 100")
    return value / 100


def prune_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--max-unused", "max_unused", default=f"{MAX_UNUSED * 100:g}%",
                     metavar="PERCENT", show_default=True,
                     help="Repack packs more than this share of which is unused.")(f)
    f = click.option("--grace", "grace", default=format_duration(GRACE), metavar="DURATION",
                     show_default=True,
                     help="How long marked data waits before a later prune deletes it "
                          "(0: as soon as no session that began before the mark runs).")(f)
    return f


Decide = Callable[[list[Snapshot]], ForgetPlan]


@contextlib.contextmanager
def vm_locks(ctx: Context, repo: Repository, vms: list[str], operation: str
             ) -> Iterator[tuple[list[RepoLock], list[str]]]:
    """The exclusive locks of ``vms`` (those a snapshot of each holds), in name order, and
    the VMs whose lock another operation holds (each said in a warning)."""
    with contextlib.ExitStack() as stack:
        held, busy = [], []
        for vm in sorted(set(vms)):
            try:
                lock = stack.enter_context(ctx.lock(repo, f"{operation} {vm}",
                                                    scope=vm_scope(vm), exclusive=True))
            except RepositoryLocked as exc:
                ctx.warn(f"{vm}: left as it is: {exc} (--retry-lock waits)")
                busy.append(vm)
                continue
            if lock is not None:
                held.append(lock)
        yield held, busy


def remove_planned(ctx: Context, repo: Repository, the_plan: ForgetPlan,
                   decide: Decide) -> tuple[ForgetPlan, list[str]]:
    """Delete what ``decide`` removes, deciding again under the locks of the VMs the first
    plan touches (a snapshot may have been taken or forgotten meanwhile); return the plan
    that was carried out and the VMs left alone because their lock was held."""
    vms = the_plan.removed_vms
    if not vms:
        return the_plan, []
    with vm_locks(ctx, repo, vms, "forget") as (held, busy):
        locked = set(vms) - set(busy)
        # Decided on every snapshot (a named one of a locked VM must still resolve), done
        # only for the VMs locked here.
        final = decide(repo.snapshots()).without(busy)
        forgetting.remove(repo.store, [s for s in final.removed if s.vm in locked],
                          check=lambda: check_all(held))
    return final, busy


def apply_policy(ctx: Context, repo: Repository, policy_of: forgetting.PolicyOf, *,
                 grace: timedelta) -> tuple[ForgetPlan, PruneReport]:
    """Forget by ``policy_of`` and prune (a remote's retention after a copy)."""

    def decide(snaps: list[Snapshot]) -> ForgetPlan:
        return forgetting.plan(snaps, policy_of, datetime.now(UTC))

    the_plan, _ = remove_planned(ctx, repo, decide(repo.snapshots()), decide)
    return the_plan, run_prune(ctx, repo, grace=grace, max_unused=MAX_UNUSED, dry_run=False)


def check_all(locks: list[RepoLock]) -> None:
    """Raise if any of ``locks`` was lost."""
    for lk in locks:
        lk.check()


def run_prune(ctx: Context, repo: Repository, *, grace: timedelta, max_unused: float,
              dry_run: bool, forgotten: frozenset[str] = frozenset()) -> PruneReport:
    """Prune under the prune lock (which other prunes respect, snapshots need not)."""
    with ctx.lock(repo, "prune", scope=PRUNE_SCOPE, exclusive=True) as held:
        return prune(repo, PruneOptions(
            max_unused=max_unused, grace=grace, dry_run=dry_run, forgotten=forgotten,
            lock_id=held.info.id if held is not None else None,
            check=held.check if held is not None else None))


def prune_lines(rep: PruneReport, grace: timedelta) -> list[str]:
    """What a prune did, for people."""
    would = "would " if rep.dry_run else ""
    out = []
    parts = []
    if rep.packs_orphaned:
        parts.append(f"{rep.packs_orphaned} in no index segment "
                     f"({human_bytes(rep.bytes_orphaned)}, left by interrupted operations)")
    if rep.packs_unused:
        parts.append(f"{rep.packs_unused} unused ({human_bytes(rep.bytes_unused)})")
    if rep.packs_repacked:
        parts.append(f"{rep.packs_repacked} mostly unused ({human_bytes(rep.bytes_repacked)}"
                     + (f", {human_bytes(rep.bytes_rewritten)} of it still needed and "
                        "rewritten" if not rep.dry_run else "") + ")")
    if parts:
        out.append(f"{'would mark' if rep.dry_run else 'marked'} packs: {'; '.join(parts)}")
    if rep.marks_swept:
        out.append(f"{would or 'deleted '}{'delete ' if would else ''}"
                   f"{counted(rep.packs_deleted, 'pack')} ({human_bytes(rep.bytes_deleted)}) "
                   "that no snapshot needs"
                   + (f"; {rep.packs_spared} marked packs are needed again and stay"
                      if rep.packs_spared else ""))
        if rep.segments_replaced:
            out.append(f"index: {counted(rep.segments_replaced, 'segment')} replaced by "
                       f"{rep.segments_written}")
    for p in rep.pending:
        when = p.due.astimezone()
        wait = f" once {len(p.waiting_for)} session(s) running since before it end" \
            if p.waiting_for else ""
        out.append(f"marked {human_bytes(p.bytes)} in {counted(p.packs, 'pack')} "
                   f"(mark {p.id[:8]}): "
                   f"deleted by a prune after {when:%Y-%m-%d %H:%M}{wait}")
    if rep.packs_retained and rep.retained_until is not None:
        out.append(f"kept {rep.packs_retained} unneeded packs ({human_bytes(rep.bytes_retained)})"
                   f" under object lock until {rep.retained_until.astimezone():%Y-%m-%d %H:%M}"
                   "; a prune after that deletes them")
    if rep.bytes_purged:
        out.append(f"freed {human_bytes(rep.bytes_purged)} of hidden object versions whose "
                   "lock had passed")
    if rep.bytes_awaiting_release and rep.next_release is not None:
        out.append(f"{human_bytes(rep.bytes_awaiting_release)} of hidden object versions stay "
                   f"locked; the first can go after {rep.next_release.astimezone():%Y-%m-%d %H:%M}")
    if rep.objects_extended and rep.retention_until is not None:
        out.append(f"extended the lock of {counted(rep.objects_extended, 'object')} to "
                   f"{rep.retention_until.astimezone():%Y-%m-%d %H:%M}")
    if rep.bytes_unused_kept:
        out.append(f"left {human_bytes(rep.bytes_unused_kept)} unused in packs below the "
                   "repack threshold")
    if not out:
        out.append("nothing to prune")
    if grace != GRACE and rep.pending and not rep.dry_run:
        out.append(f"(grace period {format_duration(grace) if grace else '0'})")
    return out


@command("prune")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; change nothing.")
@prune_options
def prune_cmd(ctx: Context, dry_run: bool, grace: str, max_unused: str) -> None:
    """Delete data no snapshot needs: mark it now, delete it in a later prune (after the
    grace period, once every session that could use it has ended). Safe while snapshots
    run."""
    period = parse_grace(grace)
    r = ctx.open_repo()
    rep = run_prune(ctx, r, grace=period, max_unused=parse_percent(max_unused),
                    dry_run=dry_run)
    ctx.emit(rep.as_dict(), lambda: click.echo("\n".join(prune_lines(rep, period))))


def _policy_from_options(opts: dict[str, Any]) -> Policy | None:
    given = {k: v for k, v in opts.items() if v not in (None, ())}
    if not given:
        return None
    try:
        policy = Policy.from_mapping(given)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if policy.empty:
        raise click.UsageError("no keep rule given: every --keep-* count is 0 (--keep-none "
                               "with VM names removes all their snapshots)")
    return policy


def forget_lines(p: ForgetPlan, dry_run: bool) -> list[str]:
    out = []
    by_vm: dict[str, list[str]] = {}
    for d in p.decisions:
        s = d.snapshot
        action = "keep  " if d.keep else ("would remove" if dry_run else "remove")
        by_vm.setdefault(s.vm, []).append(
            f"  {action:12} {s.short_id}  {s.time.astimezone():%Y-%m-%d %H:%M:%S}  "
            f"{', '.join(d.reasons)}")
    for vm, lines in by_vm.items():
        out.append(f"{vm}: {p.policies.get(vm, '')}")
        out += lines
    for vm in p.unmanaged:
        out.append(f"{vm}: no keep policy (config or --keep-*): left alone")
    verb = "would remove" if dry_run else "removed"
    out.append(f"{verb} {counted(len(p.removed), 'snapshot')}, kept {len(p.kept)}")
    return out


@command()
@click.argument("targets", nargs=-1, metavar="[VM | VM@WHEN]...")
@click.option("--keep-last", "last", type=click.IntRange(-1), metavar="N",
              help="Keep the N newest snapshots (-1: all).")
@click.option("--keep-hourly", "hourly", type=click.IntRange(-1), metavar="N",
              help="Keep the newest snapshot of each of the N latest hours that have one.")
@click.option("--keep-daily", "daily", type=click.IntRange(-1), metavar="N",
              help="... of the N latest days (local time).")
@click.option("--keep-weekly", "weekly", type=click.IntRange(-1), metavar="N",
              help="... of the N latest ISO weeks.")
@click.option("--keep-monthly", "monthly", type=click.IntRange(-1), metavar="N",
              help="... of the N latest months.")
@click.option("--keep-yearly", "yearly", type=click.IntRange(-1), metavar="N",
              help="... of the N latest years.")
@click.option("--keep-within", "within", metavar="DURATION",
              help="Keep every snapshot newer than this (e.g. 36h, 7d, 2w, 6m, 1y).")
@click.option("--keep-tag", "tags", multiple=True, metavar="TAG",
              help="Keep every snapshot with this tag (repeatable).")
@click.option("--keep-none", "keep_none", is_flag=True,
              help="Let a policy remove every snapshot of a VM (without it, the newest stays); "
                   "with VM names and no --keep-* rule, remove all their snapshots (whatever "
                   "the config keeps).")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; change nothing.")
@click.option("--prune", "then_prune", is_flag=True, help="Prune afterwards.")
@prune_options
def forget(ctx: Context, targets: tuple[str, ...], dry_run: bool, then_prune: bool,
           keep_none: bool, grace: str, max_unused: str, **keep: Any) -> None:
    """Remove snapshots: those a keep policy does not keep (from --keep-* options, else each
    VM's `keep` in the config), or those named as VM@WHEN. Frees space with --prune or a
    later `vmrepo prune`."""
    period = parse_grace(grace)
    share = parse_percent(max_unused)
    cli_policy = _policy_from_options(keep)
    named = [t for t in targets if "@" in t]
    vms = [t for t in targets if "@" not in t]
    for vm in vms:
        if not VM_NAME_RE.fullmatch(vm):
            raise SpecError(vm, "expected a VM name or VM@WHEN")
    if named and (vms or cli_policy is not None or keep_none):
        raise click.UsageError("give either snapshots (VM@WHEN) or VMs and keep rules, not both")
    r = ctx.open_repo()
    settings = ctx.settings
    if named:
        def decide(snaps: list[Snapshot]) -> ForgetPlan:
            return forgetting.chosen(list({s.id: s for s in (
                r.find_snapshot(t, snaps) for t in named)}.values()))
    else:
        known = {s.vm for s in r.snapshots()}
        for vm in vms:
            if vm not in known:
                raise SnapshotNotFound.of_vm(vm)
        in_scope = set(vms) if vms else known
        configured = settings.keep is not None or any(settings.policy(vm) for vm in in_scope)
        if cli_policy is not None:
            policy_of: forgetting.PolicyOf = lambda vm: cli_policy  # noqa: E731
        elif keep_none and vms:  # named VMs, no rule given: whatever the config keeps
            policy_of = lambda vm: Policy()  # noqa: E731 - every snapshot goes
        elif configured:
            policy_of = settings.policy
        elif keep_none:
            raise click.UsageError("--keep-none without keep rules removes every snapshot: "
                                   "name the VMs it applies to")
        else:
            raise ConfigError("no keep rule given: use --keep-last, --keep-daily, ... or "
                              "`keep = { daily = 7, ... }` in the config (top level or "
                              "[vm.NAME]); with no rule, --keep-none and VM names remove "
                              "all their snapshots")

        def decide(snaps: list[Snapshot]) -> ForgetPlan:
            return forgetting.plan([s for s in snaps if s.vm in in_scope], policy_of,
                                   datetime.now(UTC), allow_empty=keep_none)

    the_plan = decide(r.snapshots())
    planned = set(the_plan.removed_vms)
    busy: list[str] = []
    if not dry_run:
        the_plan, busy = remove_planned(ctx, r, the_plan, decide)
    removed = the_plan.removed
    pruned: PruneReport | None = None
    if then_prune:
        pruned = run_prune(ctx, r, grace=period, max_unused=share, dry_run=dry_run,
                           forgotten=frozenset(s.id for s in removed) if dry_run
                           else frozenset())
    doc = {"dry_run": dry_run, **the_plan.as_dict(), "skipped_vms": busy}
    if pruned is not None:
        doc["prune"] = pruned.as_dict()

    def human() -> None:
        lines = forget_lines(the_plan, dry_run)
        if pruned is not None:
            lines += prune_lines(pruned, period)
        click.echo("\n".join(lines))

    ctx.emit(doc, human)
    if busy:
        message = (f"the snapshots of {', '.join(busy)} were left as they are: another "
                   "operation holds their lock (--retry-lock waits for it)")
        if planned <= set(busy):  # nothing of what was asked could be done
            locked = RepositoryLocked(message, busy)
            locked.emitted = ctx.as_json  # type: ignore[attr-defined]
            raise locked
        raise SomeFailed(message)
