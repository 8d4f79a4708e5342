"""Forgetting snapshots: each VM's policy applied, and the records of what it removes deleted.

Forgetting deletes snapshot records only; the data they alone referenced is
freed by a prune (:mod:`vmrepo.prune`). Whoever deletes a VM's records holds
that VM's exclusive lock, the lock a snapshot of the VM holds: a snapshot
builds on its VM's newest snapshot without looking its chunks up again, so
that base must not be forgotten (and pruned) under it (docs/format.md §13).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any

from .format import snapshot_key
from .retention import Decision, Policy, apply
from .snapshots import Snapshot
from .store import RepoStore

PolicyOf = Callable[[str], Policy | None]


@dataclass
class ForgetPlan:
    """Per VM, what its policy keeps and removes; VMs without a policy are left alone."""

    decisions: list[Decision] = field(default_factory=list)
    policies: dict[str, str] = field(default_factory=dict)
    unmanaged: list[str] = field(default_factory=list)

    @property
    def removed(self) -> list[Snapshot]:
        return [d.snapshot for d in self.decisions if not d.keep]

    @property
    def kept(self) -> list[Snapshot]:
        return [d.snapshot for d in self.decisions if d.keep]

    @property
    def removed_vms(self) -> list[str]:
        """The VMs some of whose snapshots this plan removes, sorted."""
        return sorted({s.vm for s in self.removed})

    def without(self, vms: Collection[str]) -> ForgetPlan:
        """This plan with ``vms`` left out (their lock was held)."""
        return ForgetPlan([d for d in self.decisions if d.snapshot.vm not in vms],
                          {vm: p for vm, p in self.policies.items() if vm not in vms},
                          [vm for vm in self.unmanaged if vm not in vms])

    def as_dict(self) -> dict[str, Any]:
        vms: dict[str, Any] = {}
        for d in self.decisions:
            vm = vms.setdefault(d.snapshot.vm, {"policy": self.policies.get(d.snapshot.vm),
                                                "snapshots": []})
            vm["snapshots"].append({
                "id": d.snapshot.id, "time": d.snapshot.time.isoformat(),
                "tags": d.snapshot.tags, "action": "keep" if d.keep else "remove",
                "reasons": list(d.reasons)})
        return {"vms": vms, "unmanaged": self.unmanaged, "kept": len(self.kept),
                "removed": len(self.removed)}


def plan(snaps: Sequence[Snapshot], policy_of: PolicyOf, now: datetime,
         tz: tzinfo | None = None, allow_empty: bool = False) -> ForgetPlan:
    """Apply each VM's policy (``policy_of(vm)``; None leaves the VM alone)."""
    out = ForgetPlan()
    by_vm: dict[str, list[Snapshot]] = {}
    for s in snaps:
        by_vm.setdefault(s.vm, []).append(s)
    for vm in sorted(by_vm):
        policy = policy_of(vm)
        if policy is None:
            out.unmanaged.append(vm)
            continue
        out.policies[vm] = policy.describe()
        out.decisions += apply(by_vm[vm], policy, now, tz, allow_empty)
    return out


def chosen(snaps: Sequence[Snapshot]) -> ForgetPlan:
    """A plan removing exactly ``snaps`` (``vmrepo forget VM@WHEN ...``)."""
    out = ForgetPlan()
    for s in sorted(snaps, key=lambda s: (s.vm, s.time, s.id)):
        out.policies[s.vm] = "named on the command line"
        out.decisions.append(Decision(s, False))
    return out


def remove(store: RepoStore, snaps: Sequence[Snapshot],
           check: Callable[[], None] | None = None) -> int:
    """Delete the records of ``snaps`` (their VMs' locks held); return how many."""
    n = 0
    for s in snaps:
        if check is not None:
            check()
        store.delete(snapshot_key(s.id))  # idempotent: a record already gone is fine
        n += 1
    return n
