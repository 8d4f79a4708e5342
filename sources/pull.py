"""The ``nbd`` source: vmrepo pulls disk data over NBD with its own client.

Two ways to configure a VM:

* ``socket = "/run/qemu/vm.qmp"``: image fleecing of a running QEMU VM. In
  one QMP transaction per snapshot, each disk gets its new persistent
  bitmap, a frozen copy of the bitmap to read, and a ``sync: none`` backup
  job into a temporary qcow2 overlay (the *fleece*, in a scratch directory)
  that keeps the point-in-time view while the guest goes on writing. QEMU
  exports the fleece with the frozen bitmap over NBD; vmrepo reads only the
  dirty extents (the whole disk for a full), skipping what reads as zeros.
  The bitmap rules and clean-up are shared with the push source.
* ``url = "nbd+unix:///EXPORT?socket=PATH"`` (or ``nbd://host:port/EXPORT``),
  optionally with ``bitmap = "NAME"``: an export someone else set up (e.g. a
  libvirt pull-mode backup); with a bitmap, only its dirty extents are read
  and the rest comes from the disk's previous snapshot.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .base import BackupContext, DiskStream, Extent, Source
from .errors import SourceConfigError, SourceError, ignored
from .file import DISK_NAME_RE
from .nbd.client import NbdAddress, NbdClient
from .nbdread import (
    ALLOCATION,
    ReadCounters,
    bitmap_context,
    dirty_ranges,
    read_disk,
    source_errors,
)
from .qemu.bitmaps import Plan
from .qemu.control import QEMU_KEYS, QemuSource, VmDisk, bitmap_count, end_job
from .qemu.qmp import QmpConnection
from .units import parse_size

log = logging.getLogger(__name__)

DEFAULT_RESERVE = 1 << 30
WATCH_EVERY = 0.2


@dataclass
class PullDisk(VmDisk):
    """One disk read from an NBD export."""

    address: NbdAddress | None = None
    bitmap_context: str | None = None
    counters: ReadCounters = field(default_factory=ReadCounters)
    #: Raises when the snapshot must stop (the fleece's space is running out).
    check: Callable[[], None] | None = None

    def extents(self) -> Iterator[Extent]:
        assert self.address is not None
        contexts = [ALLOCATION] + ([self.bitmap_context] if self.bitmap_context else [])
        with source_errors(self.name), NbdClient(self.address, contexts) as client:
            if client.size != self.size:
                raise SourceError(f"disk {self.name}: the export has {client.size} bytes, "
                                  f"the disk {self.size}", self.name)
            if self.bitmap_context is None:
                ranges = [(0, self.size)]
            else:
                ranges = dirty_ranges(client, self.bitmap_context)
                dirty = sum(n for _, n in ranges)
                if dirty != self.expected:
                    raise SourceError(f"disk {self.name}: the export shows {dirty} dirty "
                                      f"bytes, the bitmap counts {self.expected}", self.name)
            yield from read_disk(client, ranges, self.counters, self.check)
        if self.check is not None:
            self.check()  # the fleece's space ran out while this disk was read

    def report(self) -> dict[str, Any]:
        return {**super().report(), "bytes_read": self.counters.bytes_read,
                "bytes_zero": self.counters.bytes_zero, "reads": self.counters.reads,
                "export": str(self.address)}


class FleeceWatch:
    """Fails the snapshot before the fleece's file system runs out of space."""

    def __init__(self, path: str, reserve: int) -> None:
        self.path = path
        self.floor = reserve // 4
        self.error: SourceError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vmrepo-fleece", daemon=True)

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(WATCH_EVERY):
            free = self.free()
            if free < self.floor:
                self.error = SourceError(
                    f"fleecing scratch space {self.path} is nearly full ({free} bytes free); "
                    "the snapshot stops before the guest's writes could fail")
                return

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


class FleecingSource(QemuSource):
    """Pulls a running QEMU VM's disks through image fleecing."""

    plugin = "nbd"
    settings_keys = QEMU_KEYS | {"scratch", "fleece_reserve"}

    def __init__(self, vm: str, socket: str, disks: list[str] | None = None,
                 timeout: float = 60.0, scratch: str | None = None,
                 reserve: int = DEFAULT_RESERVE) -> None:
        super().__init__(vm, socket, disks, timeout)
        self.scratch_base = scratch or tempfile.gettempdir()
        self.reserve = reserve
        self._scratch: str | None = None
        self._sockdir: str | None = None
        self._disks: list[PullDisk] = []
        self._watch: FleeceWatch | None = None
        self._server_started = False

    @classmethod
    def from_config(cls, vm: str, settings: Mapping[str, Any]) -> FleecingSource:
        sock, disks, timeout = cls.common_settings(vm, settings, "nbd")
        scratch = settings.get("scratch")
        if scratch is not None and not isinstance(scratch, str):
            raise SourceConfigError(f"vm {vm}: scratch must be a directory path")
        try:
            reserve = parse_size(settings.get("fleece_reserve", DEFAULT_RESERVE))
        except ValueError:
            raise SourceConfigError(f"vm {vm}: fleece_reserve: not a size: "
                                    f"{settings.get('fleece_reserve')!r}") from None
        return cls(vm, sock, disks, timeout, scratch, reserve)

    def begin(self, context: BackupContext) -> list[DiskStream]:
        plans = self.prepare(context)
        conn = self.connect()
        if not os.path.isdir(self.scratch_base):
            raise SourceConfigError(f"scratch directory {self.scratch_base} does not exist")
        self._scratch = self.private_dir("fleece", self.scratch_base)
        self._sockdir = self.private_dir("pull")
        self._watch = FleeceWatch(self._scratch, self.reserve)
        free = self._watch.free()
        if free < self.reserve:
            raise SourceError(f"scratch directory {self.scratch_base} has {free} bytes free, "
                              f"fleecing wants at least {self.reserve} (fleece_reserve)")
        sock = f"{self._sockdir}/nbd.sock"
        for i, (node, plan) in enumerate(plans):
            new, temp = self.make_bitmap_names(plan)
            disk = PullDisk(source=node, plan=plan, index=i, new_bitmap=new, temp_bitmap=temp,
                            address=NbdAddress(f"d{i}", unix=sock),
                            bitmap_context=bitmap_context(temp) if temp else None,
                            check=self._watch.check)
            self._disks.append(disk)
            fleece = f"{self._scratch}/fleece-{i}.qcow2"
            _run(["qemu-img", "create", "-q", "-f", "qcow2", fleece, str(node.size)])
            conn.execute("blockdev-add", {
                "driver": "qcow2", "node-name": f"{self.names(i)}f", "backing": node.node,
                "file": {"driver": "file", "filename": fleece}})
        actions: list[dict[str, Any]] = []
        for d in self._disks:
            actions += d.bitmap_actions(context.chunk_size)
            actions.append({"type": "blockdev-backup", "data": {
                "job-id": f"{self.names(d.index)}j", "device": d.source.node,
                "target": f"{self.names(d.index)}f", "sync": "none",
                "filter-node-name": f"{self.names(d.index)}c", "auto-dismiss": False}})
        conn.execute("transaction", {"actions": actions})
        self._watch.start()
        try:
            conn.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        except SourceError as exc:
            raise SourceError(f"cannot start QEMU's NBD server (QEMU runs one per process; is "
                              f"another in use?): {exc}") from None
        self._server_started = True
        for d in self._disks:
            export: dict[str, Any] = {"type": "nbd", "id": f"{self.names(d.index)}e",
                                      "node-name": f"{self.names(d.index)}f",
                                      "name": f"d{d.index}", "writable": False}
            if d.temp_bitmap is not None:
                export["bitmaps"] = [d.temp_bitmap]
            conn.execute("block-export-add", export)
            d.expected = d.size if d.temp_bitmap is None else \
                bitmap_count(conn, d.source.node, d.temp_bitmap)
        return list(self._disks)

    def vm_disks(self) -> list[PullDisk]:
        return self._disks

    def stop_io(self, committed: bool) -> None:
        if self._watch is not None:
            self._watch.stop()

    def teardown(self, conn: QmpConnection, committed: bool, problems: list[str]) -> None:
        for d in self._disks:
            with ignored(log, f"removing export of disk {d.name}", SourceError):
                conn.execute("block-export-del", {"id": f"{self.names(d.index)}e",
                                                  "mode": "hard"})
        if self._server_started:
            with ignored(log, "stopping QEMU's NBD server", SourceError):
                conn.execute("nbd-server-stop")
        for d in self._disks:
            try:
                # A sync=none job only ends by cancellation, success or not.
                end_job(conn, f"{self.names(d.index)}j", finalize=False)
            except SourceError as exc:
                problems.append(str(exc))
            with ignored(log, f"removing the fleece of disk {d.name}", SourceError):
                conn.execute("blockdev-del", {"node-name": f"{self.names(d.index)}f"})

    def release(self) -> None:
        for path in (self._scratch, self._sockdir):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)


class ExportDisk(DiskStream):
    """An NBD export set up by someone else, read in full or by a bitmap."""

    def __init__(self, name: str, client: NbdClient, plan: Plan, bitmap: str | None) -> None:
        self.name = name
        self.size = client.size
        self.mode = plan.mode
        self.reason = plan.reason
        self.base_snapshot = plan.base_snapshot
        self.client = client
        self.bitmap = bitmap
        self.counters = ReadCounters()

    def extents(self) -> Iterator[Extent]:
        with source_errors(self.name):
            ranges = [(0, self.size)] if self.mode == "full" or self.bitmap is None else \
                dirty_ranges(self.client, self.bitmap)
            yield from read_disk(self.client, ranges, self.counters)

    def report(self) -> dict[str, Any]:
        return {"export": str(self.client.address), "bitmap": self.bitmap,
                "bytes_read": self.counters.bytes_read, "bytes_zero": self.counters.bytes_zero,
                "reads": self.counters.reads}


class ExportSource(Source):
    """Reads one NBD export (``url``), with an optional dirty bitmap (``bitmap``)."""

    plugin = "nbd"
    settings_keys = frozenset({"url", "disk", "bitmap"})

    def __init__(self, vm: str, url: str, disk: str, bitmap: str | None) -> None:
        self.vm = vm
        self.address = NbdAddress.parse(url)
        self.disk = disk
        self.bitmap = bitmap_context(bitmap) if bitmap else None
        self._client: NbdClient | None = None

    @classmethod
    def from_config(cls, vm: str, settings: Mapping[str, Any]) -> ExportSource:
        url = settings.get("url")
        disk = settings.get("disk", "disk0")
        bitmap = settings.get("bitmap")
        if not isinstance(disk, str) or not DISK_NAME_RE.fullmatch(disk):
            raise SourceConfigError(f"vm {vm}: invalid disk name {disk!r}")
        if bitmap is not None and (not isinstance(bitmap, str) or not bitmap):
            raise SourceConfigError(f"vm {vm}: bitmap must be a bitmap name")
        try:
            return cls(vm, str(url), disk, bitmap)
        except ValueError as exc:
            raise SourceConfigError(f"vm {vm}: {exc}") from None

    def begin(self, context: BackupContext) -> list[DiskStream]:
        history = context.history.get(self.disk, [])
        want_changes = self.bitmap is not None and context.wanted == "auto" and history
        contexts = [ALLOCATION] + ([self.bitmap] if want_changes and self.bitmap else [])
        with source_errors(self.disk):
            self._client = NbdClient(self.address, contexts)
        size = self._client.size
        if context.wanted == "full":
            plan = Plan("full", "full snapshot requested")
        elif not history:
            plan = Plan("full", "first snapshot of this disk")
        elif self.bitmap is None:
            plan = Plan("full", "no bitmap configured for this export")
        elif context.wanted == "differential":
            plan = Plan("full", "full instead of differential: a plain NBD export has one "
                                "bitmap, read as changes since the last snapshot", fallback=True)
        elif history[0].size != size:
            plan = Plan("full", f"full instead of incremental: disk resized from "
                                f"{history[0].size} to {size} bytes", fallback=True)
        else:
            plan = Plan("changes", f"changes in {self.bitmap} since snapshot "
                                   f"{history[0].snapshot_id[:8]}", self.bitmap,
                        history[0].snapshot_id)
        return [ExportDisk(self.disk, self._client, plan, self.bitmap)]

    def finish(self, committed: bool) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def info(self) -> dict[str, Any]:
        return {"url": str(self.address), "bitmap": self.bitmap}


class NbdSource:
    """The ``nbd`` plugin: fleecing of a VM (``socket``) or a given export (``url``)."""

    plugin = "nbd"
    settings_keys = FleecingSource.settings_keys | ExportSource.settings_keys

    @classmethod
    def from_config(cls, vm: str, settings: Mapping[str, Any]) -> Source:
        if "url" in settings and "socket" in settings:
            raise SourceConfigError(f"vm {vm}: source 'nbd' takes socket (fleecing a VM) or "
                                    "url (an export), not both")
        if "url" in settings:
            return ExportSource.from_config(vm, settings)
        return FleecingSource.from_config(vm, settings)


def _run(cmd: list[str]) -> None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise SourceError(f"{cmd[0]} not found: install qemu-utils") from None
    if res.returncode != 0:
        raise SourceError(f"{' '.join(cmd[:2])} failed: {res.stderr.strip()}")
