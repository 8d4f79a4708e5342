"""Controlling a running QEMU for vmrepo's sources: disks, bitmaps, jobs, clean-up.

Shared by the push (``qmp``) and pull (``nbd``) sources: both find the VM's
qcow2 disks, decide per disk with :mod:`vmrepo.sources.bitmaps` how to read
it, create the new bitmap in the same transaction that fixes the point in
time, and settle the bitmaps afterwards (keep the newest and the latest
full's on commit; drop the new and temporary ones on failure).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..base import BackupContext, ChangeTracking, DiskStream, Source
from ..errors import DiskUnreadable, SourceConfigError, SourceError, ignored
from . import bitmaps as bm
from .qmp import QmpCommandError, QmpConnection

log = logging.getLogger(__name__)


@dataclass
class Node:
    """A qcow2 format node of the VM."""

    name: str
    node: str
    size: int
    bitmaps: list[bm.BitmapInfo]


@dataclass
class VmDisk(DiskStream):
    """A disk of a running VM in a snapshot: its node, plan and bitmaps."""

    source: Node
    plan: bm.Plan
    index: int
    new_bitmap: str
    temp_bitmap: str | None = None
    expected: int = 0

    def __post_init__(self) -> None:
        self.name = self.source.name
        self.size = self.source.size
        self.mode = self.plan.mode
        self.reason = self.plan.reason
        self.base_snapshot = self.plan.base_snapshot

    def work_bytes(self) -> int:
        return self.expected

    def report(self) -> dict[str, Any]:
        return {"node": self.source.node, "bitmap": self.plan.source_bitmap,
                "new_bitmap": self.new_bitmap, "expected_bytes": self.expected,
                "fallback": self.plan.fallback}

    def bitmap_actions(self, chunk_size: int) -> list[dict[str, Any]]:
        """Transaction actions: the new bitmap, and a frozen copy of the one to read."""
        node = self.source.node
        actions: list[dict[str, Any]] = [{"type": "block-dirty-bitmap-add", "data": {
            "node": node, "name": self.new_bitmap, "persistent": True,
            "granularity": chunk_size}}]
        if self.temp_bitmap is not None:
            assert self.plan.source_bitmap is not None
            actions.append({"type": "block-dirty-bitmap-add", "data": {
                "node": node, "name": self.temp_bitmap, "disabled": True,
                "granularity": chunk_size}})
            actions.append({"type": "block-dirty-bitmap-merge", "data": {
                "node": node, "target": self.temp_bitmap, "bitmaps": [self.plan.source_bitmap]}})
        return actions


def list_nodes(conn: QmpConnection) -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = conn.execute("query-named-block-nodes", {"flat": True})
    return nodes


def bitmap_infos(node: Mapping[str, Any]) -> list[bm.BitmapInfo]:
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
                out.append(Node(name, name, int(n["image"]["virtual-size"]), bitmap_infos(n)))
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
        out.append(Node(name, node_name, int(n["image"]["virtual-size"]), bitmap_infos(n)))
    return out


def bitmaps_of(conn: QmpConnection, node: str) -> list[bm.BitmapInfo]:
    for n in list_nodes(conn):
        if n.get("node-name") == node:
            return bitmap_infos(n)
    return []


def bitmap_count(conn: QmpConnection, node: str, name: str) -> int:
    for b in bitmaps_of(conn, node):
        if b.name == name:
            return b.count
    raise SourceError(f"bitmap {name} vanished from node {node}")


def remove_bitmap(conn: QmpConnection, node: str, name: str) -> None:
    try:
        conn.execute("block-dirty-bitmap-remove", {"node": node, "name": name})
    except QmpCommandError as exc:
        if exc.error_class == "GenericError" and not any(
                b.name == name for b in bitmaps_of(conn, node)):
            return  # already gone
        raise


def job_status(conn: QmpConnection, job: str) -> str | None:
    for j in conn.execute("query-jobs"):
        if j.get("id") == job:
            return str(j.get("status"))
    return None


def end_job(conn: QmpConnection, job: str, finalize: bool, timeout: float = 60) -> None:
    """Finalize (or cancel) a job, wait until it concludes, and dismiss it."""
    status = job_status(conn, job)
    if status is None:
        return
    if finalize and status == "pending":
        conn.execute("job-finalize", {"id": job})
    elif status not in ("concluded", "null", "aborting"):
        with ignored(log, f"cancelling job {job}", SourceError):
            conn.execute("job-cancel", {"id": job})
    deadline = time.monotonic() + timeout
    while (status := job_status(conn, job)) not in (None, "concluded", "null"):
        if time.monotonic() > deadline:
            raise SourceError(f"job {job} did not conclude within {timeout:.0f} s "
                              f"(status {status})")
        time.sleep(0.02)
    if status == "concluded":
        conn.execute("job-dismiss", {"id": job})


def cleanup_leftovers(conn: QmpConnection, repository_id: str) -> list[str]:
    """Remove exports, jobs and nodes of this repository left by an interrupted run."""
    prefix = f"{bm.PREFIX}{repository_id[:8]}-"
    removed = []
    exports = conn.execute("query-block-exports")
    ours = [e["id"] for e in exports if str(e.get("id", "")).startswith(prefix)]
    for export_id in ours:
        with ignored(log, f"removing leftover export {export_id}", SourceError):
            conn.execute("block-export-del", {"id": export_id, "mode": "hard"})
            removed.append(f"export {export_id}")
    if ours and len(ours) == len(exports):
        # The NBD server served only our exports: it was ours too.
        with ignored(log, "stopping a leftover NBD server", SourceError):
            conn.execute("nbd-server-stop")
    for j in conn.execute("query-jobs"):
        if str(j.get("id", "")).startswith(prefix):
            end_job(conn, j["id"], finalize=False)
            removed.append(f"job {j['id']}")
    for n in list_nodes(conn):
        name = n.get("node-name", "")
        if name.startswith(prefix):
            with ignored(log, f"removing leftover node {name}", SourceError):
                conn.execute("blockdev-del", {"node-name": name})
                removed.append(f"node {name}")
    return removed


#: Settings every QEMU source takes.
QEMU_KEYS = frozenset({"socket", "disks", "timeout"})


class QemuSource(Source, ChangeTracking):
    """The part of a QEMU source common to push and pull: settings, plans, bitmaps."""

    def __init__(self, vm: str, socket: str, disks: Sequence[str] | None = None,
                 timeout: float = 60.0) -> None:
        self.vm = vm
        self.socket = socket
        self.disk_names = list(disks) if disks else None
        self.timeout = timeout
        self._conn: QmpConnection | None = None
        self._context: BackupContext | None = None
        self._info: dict[str, Any] = {}

    @staticmethod
    def common_settings(vm: str, settings: Mapping[str, Any], plugin: str
                        ) -> tuple[str, list[str] | None, float]:
        """Validate ``socket``, ``disks`` and ``timeout`` of a VM's table."""
        sock = settings.get("socket")
        if not isinstance(sock, str) or not sock:
            raise SourceConfigError(
                f"vm {vm}: source '{plugin}' needs socket = \"/path/to/qmp.sock\"")
        disks = settings.get("disks")
        if disks is not None and (not isinstance(disks, list)
                                  or not all(isinstance(d, str) and d for d in disks)):
            raise SourceConfigError(f"vm {vm}: disks must be a list of node names or device ids")
        timeout = settings.get("timeout", 60)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise SourceConfigError(f"vm {vm}: timeout must be a positive number of seconds")
        return sock, disks, float(timeout)

    def connect(self) -> QmpConnection:
        if self._conn is None:
            self._conn = QmpConnection(self.socket, self.timeout)
        return self._conn

    def prepare(self, context: BackupContext) -> list[tuple[Node, bm.Plan]]:
        """Connect, clean up leftovers, find the disks and plan each one."""
        self._context = context
        conn = self.connect()
        version = conn.execute("query-version")["qemu"]
        self._info = {"qmp": self.socket,
                      "qemu": f"{version['major']}.{version['minor']}.{version['micro']}"}
        cleaned = cleanup_leftovers(conn, context.repository_id)
        if cleaned:
            self._info["cleaned_up"] = cleaned  # what an interrupted run had left in QEMU
        nodes = select_disks(conn, self.disk_names)
        plans = [(node, bm.plan_disk(size=node.size, bitmaps=node.bitmaps,
                                     repository_id=context.repository_id,
                                     chunk_size=context.chunk_size,
                                     history=context.history.get(node.name, []),
                                     wanted=context.wanted)) for node in nodes]
        committed = {p.snapshot_id for h in context.history.values() for p in h}
        for node in nodes:
            for name in bm.stale_bitmaps(node.bitmaps, context.repository_id, committed):
                remove_bitmap(conn, node.node, name)
        return plans

    def names(self, index: int) -> str:
        """A node/job name prefix unique to this snapshot and disk."""
        assert self._context is not None
        return (f"{bm.PREFIX}{self._context.repository_id[:8]}-"
                f"{self._context.snapshot_id[:8]}-{index}")

    def private_dir(self, kind: str, base: str | None = None) -> str:
        """A fresh 0700 directory for this repository and VM, under ``base`` (default: the
        temporary directory), short enough for unix socket paths.

        Snapshots of one VM in one repository never overlap (their lock says so), so
        what a killed run left in it is removed here.
        """
        assert self._context is not None
        vm8 = hashlib.sha256(self.vm.encode()).hexdigest()[:8]
        path = os.path.join(base or tempfile.gettempdir(),
                            f"vmrepo-{kind}-{self._context.repository_id[:8]}-{vm8}")
        shutil.rmtree(path, ignore_errors=True)
        os.mkdir(path, 0o700)
        return path

    def make_bitmap_names(self, plan: bm.Plan) -> tuple[str, str | None]:
        assert self._context is not None
        ctx = self._context
        temp = bm.temp_bitmap_name(ctx.repository_id, ctx.snapshot_id) \
            if plan.mode == "changes" else None
        return bm.bitmap_name(ctx.repository_id, ctx.snapshot_id), temp

    def settle_bitmaps(self, conn: QmpConnection, disks: Sequence[VmDisk], committed: bool,
                       problems: list[str]) -> None:
        assert self._context is not None
        ctx = self._context
        for d in disks:
            node = d.source.node
            try:
                if d.temp_bitmap is not None:
                    remove_bitmap(conn, node, d.temp_bitmap)
                if not committed:
                    remove_bitmap(conn, node, d.new_bitmap)
                    continue
                keep = {d.new_bitmap}
                if d.plan.mode == "changes":
                    full = next((h for h in ctx.history.get(d.name, []) if h.full), None)
                    if full is not None:
                        keep.add(bm.bitmap_name(ctx.repository_id, full.snapshot_id))
                current = bitmaps_of(conn, node)
                for name in bm.superseded_bitmaps(current, ctx.repository_id, keep):
                    remove_bitmap(conn, node, name)
            except SourceError as exc:
                problems.append(f"disk {d.name}: {exc}")

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    # -- finish: shared order, data-path specifics in the hooks below ----------

    def vm_disks(self) -> Sequence[VmDisk]:
        """The disks of the snapshot in progress."""
        return []

    def stop_io(self, committed: bool) -> None:
        """Stop the data path before QEMU is tidied up."""

    def teardown(self, conn: QmpConnection, committed: bool, problems: list[str]) -> None:
        """End jobs, exports and nodes of the snapshot (QEMU is reachable)."""

    def release(self) -> None:
        """Free local resources (servers, scratch files), whatever happened."""

    def finish(self, committed: bool) -> None:
        problems: list[str] = []
        conn = self._conn
        try:
            self.stop_io(committed)
            if conn is not None and conn.connected:
                self.teardown(conn, committed, problems)
                self.settle_bitmaps(conn, self.vm_disks(), committed, problems)
            elif self.vm_disks():
                problems.append("QEMU is gone; its bitmaps are checked on the next snapshot")
        finally:
            self.release()
            self.close()
        if committed and problems:
            raise SourceError("snapshot committed, but QEMU clean-up failed: "
                              + "; ".join(problems))

    # -- bitmap management for `vmrepo bitmaps` ------------------------------

    def list_bitmaps(self) -> list[dict[str, Any]]:
        """Every vmrepo bitmap on the VM's qcow2 nodes."""
        conn = self.connect()
        out = []
        for n in list_nodes(conn):
            for b in bitmap_infos(n):
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
                remove_bitmap(conn, b["node"], b["name"])
                removed.append(b)
        return removed

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


