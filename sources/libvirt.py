"""The ``libvirt`` source: libvirt domains by name, through libvirt's backup API and checkpoints.

On hosts managed by libvirt, QEMU's monitor belongs to libvirt; this source asks libvirt
instead. A VM table names the domain (``domain``, default: the VM's name) and the
connection (``uri``, default ``qemu:///system``); ``disks`` picks targets (default: every
disk), ``scratch`` the directory of the job's scratch files, ``timeout`` how long to wait
for a backup job to end.

Running domain, one snapshot: a pull-mode backup job (``backupBegin``) exports every disk
over NBD on a unix socket in a private directory, and creates the snapshot's checkpoint
``vmrepo-<repo16>-<snap32>`` at the same instant. Each disk is exported in full (vmrepo
reads what ``base:allocation`` shows allocated) or incrementally from an older checkpoint
(vmrepo reads only the regions of ``qemu:dirty-bitmap:backup-<target>``). The checkpoint
rules live in :mod:`vmrepo.sources.libvirtctl`. ``finish`` ends the job (``abortJob``, the
normal end of a pull backup), then on commit deletes the checkpoints the new one
supersedes, and on failure deletes the new one: the older checkpoint's bitmap has kept
recording, so the next snapshot sees every change. A run killed outside ``finish`` leaves
its job and checkpoint; the next run aborts the job it recognises by its socket directory
and deletes checkpoints named after uncommitted snapshots.

Shut-off domain: each image is exported read-only by a private ``qemu-nbd`` (holding the
image's lock, so the domain cannot start meanwhile); a qcow2 disk is read incrementally
from the persistent bitmap libvirt's checkpoint left in it, otherwise in full, with the
reason recorded. libvirt 9.0 can neither create nor delete checkpoints of an inactive
domain, so such a snapshot leaves the checkpoints as they are. qemu-nbd writes a pid file
in a private directory, so that the next run stops a server a killed run left behind.

In libvirt's system mode QEMU runs as its own user: the private directories are then
given to that user (from the domain's DAC label), or QEMU could not create the socket
and scratch files in them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

from . import libvirtctl as lc
from .base import BackupContext, ChangeTracking, DiskStream, Extent, PriorSnapshot, Source
from .errors import DiskUnreadable, SourceConfigError, SourceError, SourceUnavailable, ignored
from .file import DISK_NAME_RE
from .nbd.client import NbdAddress, NbdClient
from .nbd.qemunbd import QemuNbd
from .nbdread import (
    ALLOCATION,
    ReadCounters,
    bitmap_context,
    dirty_ranges,
    read_disk,
    source_errors,
)
from .qemu.bitmaps import PREFIX, Plan, bitmap_name

log = logging.getLogger(__name__)

BROKEN = "has no usable bitmap on this disk (missing, or inconsistent after QEMU stopped)"


class LibvirtDisk(DiskStream):
    """One disk read from an NBD export: the backup job's, or a private qemu-nbd's."""

    def __init__(self, name: str, size: int, plan: Plan, address: NbdAddress,
                 context: str | None, server: QemuNbd | None = None) -> None:
        self.name, self.size, self.plan = name, size, plan
        self.mode, self.reason, self.base_snapshot = plan.mode, plan.reason, plan.base_snapshot
        self.address, self.context, self.server = address, context, server
        #: Dirty bytes the checkpoint counted after the job began: at least what is exported.
        self.bound: int | None = None
        self.dirty: int | None = None
        self.counters = ReadCounters()

    def extents(self) -> Iterator[Extent]:
        contexts = [ALLOCATION] + ([self.context] if self.context else [])
        with source_errors(self.name), NbdClient(self.address, contexts) as client:
            if client.size != self.size:
                raise DiskUnreadable(f"disk {self.name}: the export has {client.size} bytes, "
                                     f"the disk {self.size}", self.name)
            ranges = [(0, self.size)]
            if self.context is not None:
                ranges = dirty_ranges(client, self.context)
                self.dirty = sum(n for _, n in ranges)
                if self.bound is not None and self.dirty > self.bound:
                    raise SourceError(f"disk {self.name}: the export shows {self.dirty} dirty "
                                      f"bytes, the checkpoint counts {self.bound}", self.name)
            yield from read_disk(client, ranges, self.counters)

    def work_bytes(self) -> int:
        return self.bound if self.mode == "changes" and self.bound is not None else self.size

    def report(self) -> dict[str, Any]:
        return {"export": str(self.address), "checkpoint": self.plan.source_bitmap,
                "fallback": self.plan.fallback, "dirty_bytes": self.dirty,
                "bytes_read": self.counters.bytes_read, "bytes_zero": self.counters.bytes_zero,
                "reads": self.counters.reads}

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


class LibvirtSource(Source, ChangeTracking):
    """Backs up one libvirt domain, running or shut off."""

    plugin = "libvirt"
    settings_keys = frozenset({"domain", "uri", "disks", "scratch", "timeout"})

    def __init__(self, vm: str, domain: str, uri: str = "qemu:///system",
                 disks: list[str] | None = None, scratch: str | None = None,
                 timeout: float = 60.0) -> None:
        self.vm, self.domain, self.uri = vm, domain, uri
        self.disk_names = disks
        self.scratch_base = scratch or tempfile.gettempdir()
        self.timeout = timeout
        self._handle: lc.LibvirtDomain | None = None
        self._context: BackupContext | None = None
        self._disks: list[LibvirtDisk] = []
        self._broken: set[str] = set()
        self._new: str | None = None
        self._running = False
        self._dirs: list[str] = []
        self._info: dict[str, Any] = {}

    @classmethod
    def from_config(cls, vm: str, settings: Mapping[str, Any]) -> LibvirtSource:
        domain = settings.get("domain", vm)
        uri = settings.get("uri", "qemu:///system")
        disks = settings.get("disks")
        scratch = settings.get("scratch")
        timeout = settings.get("timeout", 60)
        for key, value in (("domain", domain), ("uri", uri)):
            if not isinstance(value, str) or not value:
                raise SourceConfigError(f"vm {vm}: {key} must be a non-empty string")
        if disks is not None and (not isinstance(disks, list) or not disks or not all(
                isinstance(d, str) and DISK_NAME_RE.fullmatch(d) for d in disks)):
            raise SourceConfigError(f"vm {vm}: disks must be a list of disk targets (vda, ...)")
        if scratch is not None and (not isinstance(scratch, str) or not os.path.isdir(scratch)):
            raise SourceConfigError(f"vm {vm}: scratch must be an existing directory")
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise SourceConfigError(f"vm {vm}: timeout must be a positive number of seconds")
        return cls(vm, domain, uri, disks, scratch, float(timeout))

    @property
    def _d(self) -> lc.LibvirtDomain:
        if self._handle is None:
            self._handle = lc.LibvirtDomain(self.uri, self.domain)
        return self._handle

    def _mine(self) -> list[lc.Checkpoint]:
        """This repository's checkpoints of the domain."""
        assert self._context is not None
        repo16 = self._context.repository_id[:16]
        return [c for c in (self._d.checkpoint(n) for n in self._d.checkpoint_names()
                            if n.startswith(PREFIX)) if c.repository == repo16]

    def _end_job(self) -> str | None:
        """Abort vmrepo's backup job of this repository and VM, if one runs; wait for its end."""
        xml = self._d.job_xml()
        if xml is None:
            return None
        sock = lc.job_socket(xml) or ""
        if os.path.basename(os.path.dirname(sock)) != self._dir_name("lv"):
            raise SourceUnavailable(f"domain {self.domain} is in a backup job that is not "
                                    f"vmrepo's for this repository (NBD socket {sock or 'none'})"
                                    "; libvirt runs one backup job per domain")
        with ignored(log, "aborting the backup job", lc.LibvirtFailure), \
                lc.calls(self._d.lv, "aborting the backup job"):
            self._d.dom.abortJob()  # the normal end of a pull-mode job
        deadline = time.monotonic() + self.timeout
        while self._d.job_xml() is not None:
            if time.monotonic() > deadline:
                raise SourceError(f"domain {self.domain}: the backup job did not end within "
                                  f"{self.timeout:.0f} s")
            time.sleep(0.01)
        return f"backup job (NBD socket {sock})"

    def _dir_name(self, kind: str) -> str:
        assert self._context is not None
        vm8 = hashlib.sha256(self.vm.encode()).hexdigest()[:8]
        return f"vmrepo-{kind}-{self._context.repository_id[:8]}-{vm8}"

    def _private_dir(self, kind: str, base: str, owner: tuple[int, int] | None) -> str:
        """A fresh 0700 directory (what a killed run left there is removed), given to the
        user QEMU runs as when that is not us (libvirt's system mode)."""
        path = os.path.join(base, self._dir_name(kind))
        lc.stop_leftover_servers(path)
        shutil.rmtree(path, ignore_errors=True)
        os.mkdir(path, 0o700)
        self._dirs.append(path)
        if owner is not None and os.geteuid() == 0 and owner != (0, 0):
            os.chown(path, *owner)
        return path

    # -- a snapshot ------------------------------------------------------------------

    def begin(self, context: BackupContext) -> list[DiskStream]:
        self._context = context
        active, xml = self._d.state()
        every = lc.domain_disks(xml)
        by_target = {d.target: d for d in every}
        missing = [n for n in self.disk_names or [] if n not in by_target]
        if missing:
            raise DiskUnreadable(f"domain {self.domain} has no disk {missing[0]} (has: "
                                 f"{', '.join(sorted(by_target)) or 'none'})", missing[0])
        disks = [by_target[n] for n in self.disk_names] if self.disk_names else every
        if not disks:
            raise DiskUnreadable(f"domain {self.domain} has no disk")
        self._info = {"uri": self.uri, "domain": self.domain,
                      "state": "running" if active else "shut off"}
        committed = {p.snapshot_id[:32] for h in context.history.values() for p in h}
        if active:
            self._begin_running(xml, disks, [d.target for d in every if d not in disks],
                                committed, context)
        else:
            self._begin_offline(disks, committed, context)
        return list(self._disks)

    def _plan(self, disk: lc.DomainDisk, size: int, tracking: dict[str, lc.Tracking],
              ctx: BackupContext) -> Plan:
        plan = lc.plan_disk(size=size, history=ctx.history.get(disk.target, []),
                            wanted=ctx.wanted, tracking=tracking)
        if plan.fallback and disk.fmt != "qcow2":
            return Plan("full", f"full: a {disk.fmt} image keeps no checkpoint bitmaps")
        return plan

    def _begin_running(self, xml: str, disks: list[lc.DomainDisk], skipped: list[str],
                       committed: set[str], ctx: BackupContext) -> None:
        self._running = True
        d = self._d
        cleaned = [c for c in [self._end_job()] if c]
        ours = []
        for cp in self._mine():
            if cp.snapshot in committed:
                ours.append(d.checkpoint(cp.name, sized=True))
            else:  # left by a run that did not commit: its changes are in older checkpoints
                note = d.delete_checkpoint(cp.name)
                cleaned.append(f"checkpoint {cp.name}" + (f" ({note})" if note else ""))
        if cleaned:
            self._info["cleaned_up"] = cleaned
        plans: dict[str, Plan] = {}
        sizes: dict[str, int] = {}
        for disk in disks:
            t = disk.target
            with lc.calls(d.lv, f"reading the size of disk {t}", t):
                sizes[t] = int(d.dom.blockInfo(t)[0])
            tracking = {}
            for cp in ours:
                if t in cp.disks and cp.snapshot is not None:
                    if cp.disks[t] is None:
                        self._broken.add(cp.name)
                    tracking[cp.snapshot] = lc.Tracking(
                        cp.name, BROKEN if cp.disks[t] is None else None)
            plans[t] = self._plan(disk, sizes[t], tracking, ctx)
        owner = lc.dac_owner(xml)
        sock = os.path.join(self._private_dir("lv", tempfile.gettempdir(), owner), "nbd.sock")
        scratch = self._private_dir("lvscratch", self.scratch_base, owner)
        self._new = bitmap_name(ctx.repository_id, ctx.snapshot_id)
        cx = lc.checkpoint_xml(self._new, [x.target for x in disks if x.fmt == "qcow2"],
                               [x.target for x in disks if x.fmt != "qcow2"],
                               f"vmrepo snapshot {ctx.snapshot_id[:32]}")

        def job() -> str:
            return lc.backup_xml(sock, [
                lc.BackupDisk(t, f"{scratch}/{t}.qcow2",
                              p.source_bitmap if p.mode == "changes" else None)
                for t, p in plans.items()], skipped)

        try:
            with lc.calls(d.lv, "starting the backup job"):
                d.dom.backupBegin(job(), cx, 0)
        except lc.LibvirtFailure as exc:
            if exc.code != lc.ERR_CHECKPOINT_INCONSISTENT:
                raise
            kind = "differential" if ctx.wanted == "differential" else "incremental"
            plans = {t: Plan("full", f"full instead of {kind}: {exc}", fallback=True)
                     if p.mode == "changes" else p for t, p in plans.items()}
            with lc.calls(d.lv, "starting the backup job"):
                d.dom.backupBegin(job(), cx, 0)
        self._info["checkpoint"] = self._new
        exports = lc.job_exports(d.job_xml() or "<domainbackup/>")
        for t, plan in plans.items():
            if t not in exports:
                raise SourceError(f"disk {t}: the backup job does not export it", t)
            ex = exports[t]
            ctx_name = bitmap_context(ex.bitmap) if plan.mode == "changes" and ex.bitmap else None
            disk_stream = LibvirtDisk(t, sizes[t], plan, NbdAddress(ex.export, unix=sock),
                                      ctx_name)
            if plan.source_bitmap is not None:
                disk_stream.bound = d.checkpoint(plan.source_bitmap, sized=True).disks.get(t)
            self._disks.append(disk_stream)

    def _begin_offline(self, disks: list[lc.DomainDisk], committed: set[str],
                       ctx: BackupContext) -> None:
        ours = [cp for cp in self._mine() if cp.snapshot in committed]
        pids = self._private_dir("lvnbd", tempfile.gettempdir(), None)
        for disk in disks:
            image = lc.image_info(disk)
            tracking = {cp.snapshot: lc.Tracking(
                cp.name, image.bitmaps.get(cp.name, "has no bitmap in the image"))
                for cp in ours if disk.target in cp.disks and cp.snapshot is not None}
            plan = self._plan(disk, image.size, tracking, ctx)
            # A pid file lets the next run stop a qemu-nbd this run left (if it was killed).
            extra = [f"--pid-file={pids}/{disk.target}.pid"]
            extra += [f"--bitmap={plan.source_bitmap}"] if plan.source_bitmap else []
            assert disk.path is not None  # image_info checked it
            with source_errors(disk.target):
                server = QemuNbd(disk.path, disk.fmt, name=disk.target, extra=extra)
            self._disks.append(LibvirtDisk(
                disk.target, image.size, plan, server.address,
                bitmap_context(plan.source_bitmap) if plan.source_bitmap else None, server))
        self._info["checkpoint"] = None  # libvirt 9.0 makes none for an inactive domain

    def finish(self, committed: bool) -> None:
        problems: list[str] = []
        try:
            for disk in self._disks:
                disk.close()
            if self._running and self._handle is not None:
                self._settle(committed, problems)
        finally:
            for path in self._dirs:
                shutil.rmtree(path, ignore_errors=True)
            self._dirs.clear()
            self.close()
        if problems:
            raise SourceError(("snapshot committed, but " if committed else "rolling back: ")
                              + "libvirt clean-up failed: " + "; ".join(problems))

    def _settle(self, committed: bool, problems: list[str]) -> None:
        """End the job; drop the new checkpoint (failure) or those it supersedes (commit)."""
        assert self._context is not None
        ctx = self._context
        try:
            self._end_job()
            if not committed:
                note = self._d.delete_checkpoint(self._new) if self._new else None
                if note:
                    problems.append(note)
                return
            current = self._mine()
            keep: set[str] = set()
            for disk in self._disks:
                usable = {cp.snapshot for cp in current if cp.snapshot is not None
                          and disk.name in cp.disks and cp.name not in self._broken}
                history = [PriorSnapshot(ctx.snapshot_id, disk.size, disk.mode == "full"),
                           *ctx.history.get(disk.name, [])]
                keep |= lc.checkpoints_to_keep(history, usable)
            for cp in current:
                if cp.snapshot not in keep:
                    note = self._d.delete_checkpoint(cp.name)
                    if note and cp.name in self._broken:
                        log.info("%s", note)  # its bitmaps were known to be missing
                    elif note:
                        problems.append(note)
        except SourceError as exc:
            problems.append(str(exc))

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    # -- `vmrepo bitmaps`: vmrepo's checkpoints -------------------------------------------

    def list_bitmaps(self) -> list[dict[str, Any]]:
        """vmrepo's checkpoints (of every repository), one row per disk they track."""
        active, xml = self._d.state()
        disks = {x.target: x for x in lc.domain_disks(xml)}
        images: dict[str, dict[str, str | None]] = {}
        rows = []
        for name in (n for n in self._d.checkpoint_names() if n.startswith(PREFIX)):
            cp = self._d.checkpoint(name, sized=active)
            for target, size in cp.disks.items():
                if active:
                    problem = None if size is not None else BROKEN
                else:
                    if target not in images and target in disks:
                        images[target] = lc.image_info(disks[target]).bitmaps
                    problem = images.get(target, {}).get(name, "has no bitmap in the image")
                rows.append({"node": target, "name": name, "checkpoint": name,
                             "repository": cp.repository, "snapshot": cp.snapshot,
                             "temporary": False, "dirty_bytes": size or 0,
                             "recording": problem is None, "busy": False, "persistent": True,
                             "inconsistent": problem is not None and "inconsistent" in problem,
                             "problem": problem})
        return rows

    def remove_bitmaps(self, repository_id: str | None) -> list[dict[str, Any]]:
        """Delete vmrepo's checkpoints (of one repository, or all); return their rows."""
        rows = [r for r in self.list_bitmaps()
                if repository_id is None or r["repository"] == repository_id[:16]]
        if rows and not self._d.state()[0]:
            raise SourceError(f"domain {self.domain} is shut off: libvirt deletes checkpoints "
                              "of running domains only")
        for name in dict.fromkeys(r["name"] for r in rows):
            note = self._d.delete_checkpoint(name)
            if note:
                log.warning("%s", note)
        return rows

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()
