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

import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import bitmaps as bm
from .base import BackupContext, ChangeTracking, DiskStream, Extent, Source
from .errors import DiskUnreadable, SourceConfigError, SourceError
from .nbdserver import NbdServer
from .pushexport import PushExport
from .qmpconn import QmpConnection, QmpDisconnected

JOB_END_STATES = ("waiting", "pending")


@dataclass
class Node:
    """A qcow2 format node of the VM."""

    name: str
    node: str
    size: int
    bitmaps: list[bm.BitmapInfo]


@dataclass
class PushDisk(DiskStream):
    """One disk being pushed by a QEMU backup job."""

    source: Node
    plan: bm.Plan
    index: int
    export: PushExport
    job: str
    target: str
    new_bitmap: str
    temp_bitmap: str | None = None
    expected: int = 0
    job_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = self.source.name
        self.size = self.source.size
        self.mode = self.plan.mode
        self.reason = self.plan.reason
        self.base_snapshot = self.plan.base_snapshot

    def extents(self) -> Iterator[Extent]:
        yield from self.export.extents()
        # The job has sent everything: it must be exactly what the bitmap promised.
        if self.export.bytes_received != self.expected:
            raise SourceError(f"disk {self.name}: QEMU sent {self.export.bytes_received} bytes, "
                              f"the bitmap promised {self.expected}", self.name)

    def report(self) -> dict[str, Any]:
        return {"node": self.source.node, "job": self.job, "bitmap": self.plan.source_bitmap,
                "new_bitmap": self.new_bitmap, "expected_bytes": self.expected,
                "bytes_received": self.export.bytes_received, "requests": self.export.requests,
                "fallback": self.plan.fallback}


def list_nodes(conn: QmpConnection) -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = conn.execute("query-named-block-nodes", {"flat": True})
    return nodes


def _bitmap_infos(node: Mapping[str, Any]) -> list[bm.BitmapInfo]:
    return [bm.BitmapInfo.from_qmp(b) for b in node.get("dirty-bitmaps", []) if b.get("name")]


def select_disks(conn: QmpConnection, wanted: Sequence[str] | None) -> list[Node]:
    """Resolve configured disk names (node names or device ids) to qcow2 format nodes."""
    nodes = {n["node-name"]: n for n in list_nodes(conn) if n.get("node-name")}
    out = []
    if not wanted:
        for n in nodes.values():
            name = n["node-name"]
            if (n.get("drv") == "qcow2" and not n.get("ro") and not name.startswith("#")
                    and not name.startswith(bm.PREFIX)):
                out.append(Node(name, name, int(n["image"]["virtual-size"]), _bitmap_infos(n)))
        if not out:
            raise SourceConfigError("the VM has no writable qcow2 disk")
        return sorted(out, key=lambda d: d.name)
    devices = {}
    for blk in conn.execute("query-block"):
        node = (blk.get("inserted") or {}).get("node-name")
        for key in (blk.get("device"), blk.get("qdev")):
            if key and node:
                devices[key] = node
                parts = key.strip("/").split("/")
                if len(parts) >= 3 and parts[:2] == ["machine", "peripheral"]:
                    devices[parts[2]] = node
    for name in wanted:
        node_name = name if name in nodes else devices.get(name)
        if node_name is None or node_name not in nodes:
            raise DiskUnreadable(f"disk {name}: no block node or device of that name in the VM",
                                 name)
        n = nodes[node_name]
        if n.get("drv") != "qcow2":
            raise DiskUnreadable(f"disk {name}: node {node_name} is {n.get('drv')}, vmrepo needs "
                                 "a qcow2 node (persistent bitmaps live in qcow2)", name)
        out.append(Node(name, node_name, int(n["image"]["virtual-size"]), _bitmap_infos(n)))
    return out


class QmpSource(Source, ChangeTracking):
    """Backs up a running QEMU VM through its QMP socket."""

    plugin = "qmp"

    def __init__(self, vm: str, socket: str, disks: Sequence[str] | None = None,
                 timeout: float = 60.0) -> None:
        self.vm = vm
        self.socket = socket
        self.disk_names = list(disks) if disks else None
        self.timeout = timeout
        self._conn: QmpConnection | None = None
        self._server: NbdServer | None = None
        self._scratch: str | None = None
        self._disks: list[PushDisk] = []
        self._jobs: dict[str, PushDisk] = {}
        self._context: BackupContext | None = None
        self._info: dict[str, Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, vm: str, settings: Mapping[str, Any]) -> QmpSource:
        sock = settings.get("socket")
        if not isinstance(sock, str) or not sock:
            raise SourceConfigError(f"vm {vm}: source 'qmp' needs socket = \"/path/to/qmp.sock\"")
        disks = settings.get("disks")
        if disks is not None and (not isinstance(disks, list)
                                  or not all(isinstance(d, str) and d for d in disks)):
            raise SourceConfigError(f"vm {vm}: disks must be a list of node names or device ids")
        timeout = settings.get("timeout", 60)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise SourceConfigError(f"vm {vm}: timeout must be a positive number of seconds")
        return cls(vm, sock, disks, float(timeout))

    # -- begin --------------------------------------------------------------

    def connect(self) -> QmpConnection:
        if self._conn is None:
            self._conn = QmpConnection(self.socket, self.timeout)
        return self._conn

    def begin(self, context: BackupContext) -> list[DiskStream]:
        self._context = context
        conn = self.connect()
        conn.subscribe(self._on_event)
        version = conn.execute("query-version")["qemu"]
        self._info = {"qmp": self.socket,
                      "qemu": f"{version['major']}.{version['minor']}.{version['micro']}"}
        committed = {p.snapshot_id for h in context.history.values() for p in h}
        cleanup_leftovers(conn, context.repository_id)
        nodes = select_disks(conn, self.disk_names)
        self._scratch = tempfile.mkdtemp(prefix="vmrepo-push-")
        repo8, snap8 = context.repository_id[:8], context.snapshot_id[:8]
        exports = {}
        for i, node in enumerate(nodes):
            plan = bm.plan_disk(size=node.size, bitmaps=node.bitmaps,
                                repository_id=context.repository_id,
                                chunk_size=context.chunk_size,
                                history=context.history.get(node.name, []),
                                wanted=context.wanted)
            export = PushExport(f"d{i}", node.size)
            exports[export.name] = export
            disk = PushDisk(
                source=node, plan=plan, index=i, export=export,
                job=f"vmrepo-{repo8}-{snap8}-j{i}", target=f"vmrepo-{repo8}-{snap8}-t{i}",
                new_bitmap=bm.bitmap_name(context.repository_id, context.snapshot_id))
            if plan.mode == "changes":
                disk.temp_bitmap = bm.temp_bitmap_name(context.repository_id,
                                                       context.snapshot_id)
            self._disks.append(disk)
            self._jobs[disk.job] = disk
        for node in nodes:
            for name in bm.stale_bitmaps(node.bitmaps, context.repository_id, committed):
                _remove_bitmap(conn, node.node, name)
        self._server = NbdServer(f"{self._scratch}/push.sock", exports)
        self._server.start()
        for disk in self._disks:
            conn.execute("blockdev-add", {
                "driver": "nbd", "node-name": disk.target, "export": disk.export.name,
                "server": {"type": "unix", "path": self._server.path}})
        conn.execute("transaction", {"actions": self._actions(context.chunk_size)})
        for disk in self._disks:
            disk.expected = disk.size
            if disk.temp_bitmap is not None:
                disk.expected = _bitmap_count(conn, disk.source.node, disk.temp_bitmap)
        return list(self._disks)

    def _actions(self, chunk_size: int) -> list[dict[str, Any]]:
        actions: list[dict[str, Any]] = []
        for d in self._disks:
            node = d.source.node
            actions.append({"type": "block-dirty-bitmap-add", "data": {
                "node": node, "name": d.new_bitmap, "persistent": True,
                "granularity": chunk_size}})
            job: dict[str, Any] = {"job-id": d.job, "device": node, "target": d.target,
                                   "auto-finalize": False, "auto-dismiss": False}
            if d.temp_bitmap is None:
                job["sync"] = "full"
            else:
                assert d.plan.source_bitmap is not None
                actions.append({"type": "block-dirty-bitmap-add", "data": {
                    "node": node, "name": d.temp_bitmap, "disabled": True,
                    "granularity": chunk_size}})
                actions.append({"type": "block-dirty-bitmap-merge", "data": {
                    "node": node, "target": d.temp_bitmap, "bitmaps": [d.plan.source_bitmap]}})
                job.update({"sync": "bitmap", "bitmap": d.temp_bitmap, "bitmap-mode": "never"})
            actions.append({"type": "blockdev-backup", "data": job})
        return actions

    # -- events (QMP thread) -------------------------------------------------

    def _on_event(self, event: dict[str, Any] | None) -> None:
        if event is None:
            for d in self._disks:
                d.export.end(QmpDisconnected(
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
            disk.export.end()
        elif name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") or (
                name == "JOB_STATUS_CHANGE" and data.get("status") in ("aborting", "concluded")):
            why = data.get("error") or disk.job_error or "the job was cancelled"
            disk.export.end(SourceError(f"disk {disk.name}: backup job failed: {why}",
                                        disk.name))

    # -- finish ---------------------------------------------------------------

    def finish(self, committed: bool) -> None:
        problems: list[str] = []
        conn = self._conn
        try:
            if not committed:
                for d in self._disks:
                    d.export.abort()
            if conn is not None and conn.connected:
                for d in self._disks:
                    try:
                        _end_job(conn, d.job, finalize=committed)
                    except SourceError as exc:
                        problems.append(str(exc))
                for d in self._disks:
                    with contextlib.suppress(SourceError):
                        conn.execute("blockdev-del", {"node-name": d.target})
                self._settle_bitmaps(conn, committed, problems)
            elif self._disks:
                problems.append("QEMU is gone; its bitmaps are checked on the next snapshot")
        finally:
            if self._server is not None:
                self._server.stop()
            if self._scratch is not None:
                shutil.rmtree(self._scratch, ignore_errors=True)
            if conn is not None:
                conn.close()
            self._conn = None
        if committed and problems:
            raise SourceError("snapshot committed, but QEMU clean-up failed: "
                              + "; ".join(problems))

    def _settle_bitmaps(self, conn: QmpConnection, committed: bool,
                        problems: list[str]) -> None:
        assert self._context is not None
        ctx = self._context
        for d in self._disks:
            node = d.source.node
            try:
                if d.temp_bitmap is not None:
                    _remove_bitmap(conn, node, d.temp_bitmap)
                if not committed:
                    _remove_bitmap(conn, node, d.new_bitmap)
                    continue
                keep = {d.new_bitmap}
                if d.plan.mode == "changes":
                    full = next((h for h in ctx.history.get(d.name, []) if h.full), None)
                    if full is not None:
                        keep.add(bm.bitmap_name(ctx.repository_id, full.snapshot_id))
                current = _bitmaps_of(conn, node)
                for name in bm.superseded_bitmaps(current, ctx.repository_id, keep):
                    _remove_bitmap(conn, node, name)
            except SourceError as exc:
                problems.append(f"disk {d.name}: {exc}")

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    # -- bitmap management for `vmrepo bitmaps` ------------------------------

    def list_bitmaps(self) -> list[dict[str, Any]]:
        """Every vmrepo bitmap on the VM's qcow2 nodes."""
        conn = self.connect()
        out = []
        for n in list_nodes(conn):
            for b in _bitmap_infos(n):
                if b.name.startswith(bm.PREFIX):
                    parsed = bm.parse_name(b.name)
                    out.append({"node": n["node-name"], "name": b.name,
                                "repository": parsed.repository if parsed else None,
                                "snapshot": parsed.snapshot if parsed else None,
                                "temporary": bool(parsed and parsed.temporary),
                                "dirty_bytes": b.count, "granularity": b.granularity,
                                "recording": b.recording, "busy": b.busy,
                                "persistent": b.persistent, "inconsistent": b.inconsistent})
        return out

    def remove_bitmaps(self, repository_id: str | None) -> list[dict[str, Any]]:
        """Remove vmrepo bitmaps (of one repository, or all); return those removed."""
        removed = []
        conn = self.connect()
        for b in self.list_bitmaps():
            if repository_id is None or b["repository"] == repository_id[:16]:
                _remove_bitmap(conn, b["node"], b["name"])
                removed.append(b)
        return removed

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _bitmaps_of(conn: QmpConnection, node: str) -> list[bm.BitmapInfo]:
    for n in list_nodes(conn):
        if n.get("node-name") == node:
            return _bitmap_infos(n)
    return []


def _bitmap_count(conn: QmpConnection, node: str, name: str) -> int:
    for b in _bitmaps_of(conn, node):
        if b.name == name:
            return b.count
    raise SourceError(f"bitmap {name} vanished from node {node}")


def _remove_bitmap(conn: QmpConnection, node: str, name: str) -> None:
    try:
        conn.execute("block-dirty-bitmap-remove", {"node": node, "name": name})
    except SourceError as exc:
        if getattr(exc, "error_class", "") == "GenericError" and not any(
                b.name == name for b in _bitmaps_of(conn, node)):
            return  # already gone
        raise


def _job_status(conn: QmpConnection, job: str) -> str | None:
    for j in conn.execute("query-jobs"):
        if j.get("id") == job:
            return str(j.get("status"))
    return None


def _end_job(conn: QmpConnection, job: str, finalize: bool, timeout: float = 60) -> None:
    """Finalize (or cancel) a job, wait until it concludes, and dismiss it."""
    status = _job_status(conn, job)
    if status is None:
        return
    if finalize and status == "pending":
        conn.execute("job-finalize", {"id": job})
    elif status not in ("concluded", "null", "aborting"):
        with contextlib.suppress(SourceError):
            conn.execute("job-cancel", {"id": job})
    deadline = time.monotonic() + timeout
    while (status := _job_status(conn, job)) not in (None, "concluded", "null"):
        if time.monotonic() > deadline:
            raise SourceError(f"job {job} did not conclude within {timeout:.0f} s "
                              f"(status {status})")
        time.sleep(0.02)
    if status == "concluded":
        conn.execute("job-dismiss", {"id": job})


def cleanup_leftovers(conn: QmpConnection, repository_id: str) -> list[str]:
    """Remove jobs and nodes of this repository left by an interrupted run."""
    prefix = f"{bm.PREFIX}{repository_id[:8]}-"
    removed = []
    for j in conn.execute("query-jobs"):
        if str(j.get("id", "")).startswith(prefix):
            _end_job(conn, j["id"], finalize=False)
            removed.append(f"job {j['id']}")
    for n in list_nodes(conn):
        name = n.get("node-name", "")
        if name.startswith(prefix):
            with contextlib.suppress(SourceError):
                conn.execute("blockdev-del", {"node-name": name})
                removed.append(f"node {name}")
    return removed
