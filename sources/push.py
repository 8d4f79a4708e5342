"""The ``qmp`` source: QEMU's backup job pushes the disks into vmrepo over NBD.

For each snapshot: vmrepo serves one :class:`PushExport` per disk on a
private unix socket, adds it to QEMU as an ``nbd`` block node, and starts
one ``blockdev-backup`` job per disk in a single QMP ``transaction``
together with the new persistent dirty bitmaps, so every disk's point in
time and the start of its next bitmap are the same instant.

* full: ``sync: full``;
* incremental / differential: the older bitmap is merged into a disabled
  temporary bitmap inside the transaction and the job runs ``sync: bitmap``
  from it with ``bitmap-mode: never``, so no bitmap loses bits whatever
  happens. The bytes QEMU sends must equal the temporary bitmap's count.

Jobs run with ``auto-finalize: false``: a job that reached ``pending`` has
sent everything; it is finalized only after the snapshot record is durable
(``finish(True)``) and cancelled otherwise. Bitmap rules are in
:mod:`vmrepo.sources.bitmaps`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .base import BackupContext, DiskStream, Extent
from .errors import SourceError, SourceUnavailable, ignored
from .nbd.errors import NbdError
from .nbd.server import NbdServer
from .qemu.control import QEMU_KEYS, QemuSource, VmDisk, bitmap_count, end_job
from .qemu.pushexport import PushExport
from .qemu.qmp import QmpConnection, QmpDisconnected

log = logging.getLogger(__name__)

JOB_END_STATES = ("waiting", "pending")


@dataclass
class PushDisk(VmDisk):
    """One disk being pushed by a QEMU backup job."""

    export: PushExport | None = None
    job: str = ""
    target: str = ""
    job_error: str | None = None

    @property
    def push(self) -> PushExport:
        assert self.export is not None
        return self.export

    def extents(self) -> Iterator[Extent]:
        yield from self.push.extents()
        # The job has sent everything: it must be exactly what the bitmap promised.
        if self.push.bytes_received != self.expected:
            raise SourceError(f"disk {self.name}: QEMU sent {self.push.bytes_received} bytes, "
                              f"the bitmap promised {self.expected}", self.name)

    def report(self) -> dict[str, Any]:
        return {**super().report(), "job": self.job, "bytes_received": self.push.bytes_received,
                "requests": self.push.requests}


class QmpSource(QemuSource):
    """Backs up a running QEMU VM through its QMP socket; QEMU pushes the data."""

    plugin = "qmp"
    settings_keys = QEMU_KEYS

    def __init__(self, vm: str, socket: str, disks: list[str] | None = None,
                 timeout: float = 60.0) -> None:
        super().__init__(vm, socket, disks, timeout)
        self._server: NbdServer | None = None
        self._scratch: str | None = None
        self._disks: list[PushDisk] = []
        self._jobs: dict[str, PushDisk] = {}

    @classmethod
    def from_config(cls, vm: str, settings: Mapping[str, Any]) -> QmpSource:
        return cls(vm, *cls.common_settings(vm, settings, "qmp"))

    def begin(self, context: BackupContext) -> list[DiskStream]:
        plans = self.prepare(context)
        conn = self.connect()
        conn.subscribe(self._on_event)
        self._scratch = self.private_dir("push")
        exports = {}
        for i, (node, plan) in enumerate(plans):
            new, temp = self.make_bitmap_names(plan)
            export = PushExport(f"d{i}", node.size)
            exports[export.name] = export
            disk = PushDisk(source=node, plan=plan, index=i, new_bitmap=new, temp_bitmap=temp,
                            export=export, job=f"{self.names(i)}j", target=f"{self.names(i)}t")
            self._disks.append(disk)
            self._jobs[disk.job] = disk
        self._server = NbdServer(f"{self._scratch}/push.sock", exports)
        try:
            self._server.start()
        except NbdError as exc:
            raise SourceUnavailable(str(exc)) from None
        for disk in self._disks:
            conn.execute("blockdev-add", {
                "driver": "nbd", "node-name": disk.target, "export": disk.push.name,
                "server": {"type": "unix", "path": self._server.path}})
        actions: list[dict[str, Any]] = []
        for d in self._disks:
            actions += d.bitmap_actions(context.chunk_size)
            job: dict[str, Any] = {"job-id": d.job, "device": d.source.node, "target": d.target,
                                   "auto-finalize": False, "auto-dismiss": False}
            if d.temp_bitmap is None:
                job["sync"] = "full"
            else:
                job.update({"sync": "bitmap", "bitmap": d.temp_bitmap, "bitmap-mode": "never"})
            actions.append({"type": "blockdev-backup", "data": job})
        conn.execute("transaction", {"actions": actions})
        for disk in self._disks:
            disk.expected = disk.size
            if disk.temp_bitmap is not None:
                disk.expected = bitmap_count(conn, disk.source.node, disk.temp_bitmap)
        return list(self._disks)

    # -- events (QMP thread) -------------------------------------------------

    def _on_event(self, event: dict[str, Any] | None) -> None:
        if event is None:
            for d in self._disks:
                d.push.end(QmpDisconnected(
                    f"disk {d.name}: QEMU closed the QMP connection during the backup "
                    "(did it exit?)"))
            return
        data = event.get("data", {})
        name = event.get("event")
        disk = self._jobs.get(data.get("id") or data.get("device") or "")
        if disk is None:
            return
        if name == "BLOCK_JOB_ERROR":
            disk.job_error = f"{data.get('operation', 'I/O')} error ({data.get('action')})"
        elif name == "JOB_STATUS_CHANGE" and data.get("status") in JOB_END_STATES:
            disk.push.end()
        elif name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") or (
                name == "JOB_STATUS_CHANGE" and data.get("status") in ("aborting", "concluded")):
            why = data.get("error") or disk.job_error or "the job was cancelled"
            disk.push.end(SourceError(f"disk {disk.name}: backup job failed: {why}", disk.name))

    # -- finish ---------------------------------------------------------------

    def vm_disks(self) -> list[PushDisk]:
        return self._disks

    def stop_io(self, committed: bool) -> None:
        if not committed:
            for d in self._disks:
                d.push.abort()

    def teardown(self, conn: QmpConnection, committed: bool, problems: list[str]) -> None:
        for d in self._disks:
            try:
                end_job(conn, d.job, finalize=committed)
            except SourceError as exc:
                problems.append(str(exc))
        for d in self._disks:
            with ignored(log, f"removing node {d.target}", SourceError):
                conn.execute("blockdev-del", {"node-name": d.target})

    def release(self) -> None:
        if self._server is not None:
            self._server.stop()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
