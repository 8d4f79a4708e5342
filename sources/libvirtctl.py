"""What the ``libvirt`` source needs besides its data path: the binding and its errors, a
handle on the domain (:class:`LibvirtDomain`), the XML exchanged with libvirt, the
checkpoint rules (pure functions), and what qemu-img tells of a shut-off domain's images.

The binding (``libvirt-python``) is an optional extra and is imported on first use; its
exceptions become source errors with libvirt's message on one line, and its default error
handler (which prints every error to stderr) is silenced.

Checkpoint rules. vmrepo names each checkpoint like its QEMU bitmaps,
``vmrepo-<repo16>-<snap32>``: the repository and the snapshot whose point in time the
checkpoint starts at. In libvirt 9.0 every checkpoint's bitmap keeps recording until the
checkpoint is deleted, and deleting one removes only its own bitmaps (no merge is needed:
its parent's bitmap has recorded the same writes and more), so a checkpoint made at snapshot
*H* records every write since *H*, whatever was deleted after it. A disk is therefore read
as changes from the newest usable checkpoint made at or before the snapshot it builds on
(the last snapshot for an incremental, the last full for a differential): what the bitmap
leaves out is unchanged since that snapshot. A shut-off domain gets no new checkpoint
(libvirt 9.0 refuses to create or delete checkpoints of an inactive domain); its snapshot
builds on the older one. After a commit, a disk keeps the newest checkpoint (incrementals)
and the newest one at or before its latest full (differentials); the repository's other
checkpoints are deleted. Checkpoints not named by vmrepo, or of another repository, are
never touched.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import signal
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .base import PriorSnapshot, Wanted
from .errors import DiskUnreadable, SourceConfigError, SourceError, SourceUnavailable, ignored
from .qemu.bitmaps import Plan, parse_name
from .units import human_bytes

log = logging.getLogger(__name__)

INSTALL_HINT = ("the libvirt source needs the libvirt Python binding: "
                "pip install 'vmrepo[libvirt]' (or install Debian's python3-libvirt)")

# libvirt's error codes (virErrorNumber) that the source acts on.
ERR_NO_DOMAIN = 42
ERR_NO_DOMAIN_CHECKPOINT = 103
ERR_NO_DOMAIN_BACKUP = 104
ERR_CHECKPOINT_INCONSISTENT = 109
#: Errors that mean libvirt or the domain cannot be reached (rather than a failed request).
_UNREACHABLE = frozenset({5, 38, 39, 45, ERR_NO_DOMAIN})  # no connect, system, rpc, auth


class LibvirtFailure(SourceError):
    """A libvirt request failed; ``operation`` says what vmrepo asked, ``code`` is
    libvirt's error number."""

    def __init__(self, message: str, operation: str, code: int, disk: str | None = None) -> None:
        super().__init__(message, disk)
        self.operation = operation
        self.code = code


class LibvirtUnreachable(SourceUnavailable):
    """libvirt, or the domain, cannot be reached."""

    def __init__(self, message: str, operation: str, code: int) -> None:
        super().__init__(message)
        self.operation = operation
        self.code = code


def _quiet(_ctx: object, err: object) -> None:
    log.debug("libvirt: %s", err)


def load_binding() -> Any:
    """The ``libvirt`` module, imported on first use, its stderr printing silenced."""
    try:
        import libvirt
    except ImportError:
        raise SourceConfigError(INSTALL_HINT) from None
    libvirt.registerErrorHandler(_quiet, None)
    return libvirt


def error_code(exc: BaseException) -> int:
    get = getattr(exc, "get_error_code", None)
    code = get() if get is not None else None
    return int(code) if code is not None else -1


def one_line(text: str) -> str:
    return " ".join(text.split())


@contextlib.contextmanager
def calls(lv: Any, operation: str, disk: str | None = None) -> Iterator[None]:
    """Turn libvirt's exceptions into source errors naming ``operation``."""
    try:
        yield
    except lv.libvirtError as exc:
        code = error_code(exc)
        message = f"libvirt: {operation}: {one_line(str(exc))}"
        if code in _UNREACHABLE:
            raise LibvirtUnreachable(message, operation, code) from None
        raise LibvirtFailure(message, operation, code, disk) from None


class LibvirtDomain:
    """A connection to libvirt and one of its domains, with the calls the source makes."""

    def __init__(self, uri: str, name: str) -> None:
        self.lv = load_binding()
        self.name = name
        with calls(self.lv, f"connecting to {uri}"):
            self.conn = self.lv.open(uri)
        try:
            with calls(self.lv, f"looking up domain {name!r}"):
                self.dom = self.conn.lookupByName(name)
        except SourceError:
            self.close()
            raise

    def state(self) -> tuple[bool, str]:
        """Whether the domain runs, and its XML (live when it runs)."""
        with calls(self.lv, f"reading domain {self.name}"):
            return bool(self.dom.isActive()), str(self.dom.XMLDesc(0))

    def checkpoint_names(self) -> list[str]:
        with calls(self.lv, "listing checkpoints"):
            return [str(cp.getName()) for cp in self.dom.listAllCheckpoints(0)]

    def checkpoint(self, name: str, sized: bool = False) -> Checkpoint:
        """A checkpoint; ``sized``: with the dirty bytes of each disk (running domains only)."""
        flags = self.lv.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN
        if sized:
            flags |= self.lv.VIR_DOMAIN_CHECKPOINT_XML_SIZE
        with calls(self.lv, f"reading checkpoint {name}"):
            return Checkpoint.parse(self.dom.checkpointLookupByName(name).getXMLDesc(flags))

    def delete_checkpoint(self, name: str) -> str | None:
        """Delete one checkpoint (libvirt removes its bitmaps); when libvirt cannot (a bitmap
        is missing), delete its metadata alone and say so."""
        try:
            with calls(self.lv, f"deleting checkpoint {name}"):
                self.dom.checkpointLookupByName(name).delete(0)
            return None
        except LibvirtFailure as exc:
            if exc.code == ERR_NO_DOMAIN_CHECKPOINT:
                return None
            with calls(self.lv, f"deleting checkpoint {name} (metadata only)"):
                self.dom.checkpointLookupByName(name).delete(
                    self.lv.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            return (f"{exc}; deleted its metadata only: its bitmap {name} may stay in the "
                    f"disk images (once the domain is shut off, `qemu-img bitmap --remove IMAGE "
                    f"{name}` removes it)")

    def job_xml(self) -> str | None:
        """The domain's backup job, or None."""
        try:
            with calls(self.lv, "reading the backup job"):
                return str(self.dom.backupGetXMLDesc(0))
        except LibvirtFailure as exc:
            if exc.code == ERR_NO_DOMAIN_BACKUP:
                return None
            raise

    def close(self) -> None:
        with ignored(log, "closing the libvirt connection", Exception):
            self.conn.close()


# -- domain XML ---------------------------------------------------------------------


@dataclass(frozen=True)
class DomainDisk:
    """A disk of the domain definition: its target (the disk's name), image and format."""

    target: str
    kind: str
    path: str | None
    fmt: str


def domain_disks(xml: str) -> list[DomainDisk]:
    """The domain's disks (``device='disk'``; CD-ROMs and floppies are not backed up)."""
    out = []
    for disk in ET.fromstring(xml).iterfind("devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        target = disk.find("target")
        if target is None or not target.get("dev"):
            continue
        source = disk.find("source")
        path = None
        if source is not None:
            path = source.get("file") or source.get("dev")
        driver = disk.find("driver")
        fmt = (driver.get("type") if driver is not None else None) or "raw"
        out.append(DomainDisk(str(target.get("dev")), disk.get("type", "file"), path, fmt))
    return out


def dac_owner(xml: str) -> tuple[int, int] | None:
    """The user and group QEMU runs as, from a running domain's DAC label (system mode)."""
    for label in ET.fromstring(xml).iterfind("seclabel"):
        if label.get("model") == "dac":
            text = (label.findtext("label") or "").replace("+", "")
            user, _, group = text.partition(":")
            if user.isdigit() and group.isdigit():
                return int(user), int(group)
    return None


# -- checkpoints and backup XML -----------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A libvirt checkpoint: per disk it tracks, the dirty bytes libvirt measured
    (``None`` when not measured, or when the disk's bitmap is missing or broken)."""

    name: str
    repository: str | None
    snapshot: str | None
    disks: dict[str, int | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, xml: str) -> Checkpoint:
        root = ET.fromstring(xml)
        name = root.findtext("name") or ""
        disks: dict[str, int | None] = {}
        for d in root.iterfind("disks/disk"):
            if d.get("checkpoint") == "bitmap" and d.get("name"):
                size = d.get("size")
                disks[str(d.get("name"))] = int(size) if size is not None else None
        parsed = parse_name(name)
        if parsed is None or parsed.temporary:
            return cls(name, None, None, disks)
        return cls(name, parsed.repository, parsed.snapshot, disks)


def checkpoint_xml(name: str, tracked: Sequence[str], untracked: Sequence[str],
                   description: str) -> str:
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "description").text = description
    disks = ET.SubElement(root, "disks")
    for target in tracked:
        ET.SubElement(disks, "disk", name=target, checkpoint="bitmap")
    for target in untracked:
        ET.SubElement(disks, "disk", name=target, checkpoint="no")
    return ET.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class BackupDisk:
    """One disk of a pull-mode backup job: full, or incremental from ``incremental``."""

    target: str
    scratch: str
    incremental: str | None = None


def backup_xml(socket: str, disks: Sequence[BackupDisk], skipped: Sequence[str]) -> str:
    root = ET.Element("domainbackup", mode="pull")
    ET.SubElement(root, "server", transport="unix", socket=socket)
    el = ET.SubElement(root, "disks")
    for d in disks:
        # type='file' and a scratch file are both needed (libvirt 9.0 fails without them).
        attrs = {"name": d.target, "backup": "yes", "type": "file"}
        if d.incremental is not None:
            attrs.update(backupmode="incremental", incremental=d.incremental)
        else:
            attrs["backupmode"] = "full"
        ET.SubElement(ET.SubElement(el, "disk", attrs), "scratch", file=d.scratch)
    for target in skipped:
        ET.SubElement(el, "disk", name=target, backup="no")
    return ET.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class JobExport:
    """How the running backup job exports one disk."""

    export: str
    bitmap: str | None


def job_socket(xml: str) -> str | None:
    server = ET.fromstring(xml).find("server")
    return server.get("socket") if server is not None else None


def job_exports(xml: str) -> dict[str, JobExport]:
    return {str(d.get("name")): JobExport(d.get("exportname") or str(d.get("name")),
                                          d.get("exportbitmap"))
            for d in ET.fromstring(xml).iterfind("disks/disk") if d.get("backup") == "yes"}


# -- planning (pure) ----------------------------------------------------------------


@dataclass(frozen=True)
class Tracking:
    """A checkpoint of this repository that covers one disk, usable or not (and why)."""

    name: str
    problem: str | None = None


def plan_disk(*, size: int, history: Sequence[PriorSnapshot], wanted: Wanted,
              tracking: Mapping[str, Tracking]) -> Plan:
    """Full or changes for one disk; ``tracking`` maps snapshot ids (32 digits) to the
    checkpoints made at them."""
    if wanted == "full":
        return Plan("full", "full snapshot requested")
    if not history:
        return Plan("full", "first snapshot of this disk")
    if wanted == "differential":
        start = next((i for i, h in enumerate(history) if h.full), None)
        if start is None:
            return Plan("full", "no full snapshot of this disk to build a differential on",
                        fallback=True)
        kind = "differential"
    else:
        start, kind = 0, "incremental"
    base = history[start]

    def fall(why: str) -> Plan:
        return Plan("full", f"full instead of {kind}: {why}", fallback=True)

    if base.size != size:
        return fall(f"disk resized from {human_bytes(base.size)} to {human_bytes(size)}")
    problems: list[Tracking] = []
    for h in history[start:]:
        t = tracking.get(h.snapshot_id[:32])
        if t is None:
            continue
        if t.problem is not None:
            problems.append(t)
            continue
        since = "" if h is base else f", recording since snapshot {h.snapshot_id[:8]}"
        return Plan("changes", f"changes since snapshot {base.snapshot_id[:8]} "
                    f"(checkpoint {t.name}{since})", t.name, base.snapshot_id)
    if problems:
        first, *older = problems
        why = f"checkpoint {first.name} {first.problem}"
        if older:
            why += (f"; older checkpoint{'s' * (len(older) > 1)}: "
                    + "; ".join(sorted({str(t.problem) for t in older})))
        return fall(why)
    return fall(f"no checkpoint of snapshot {base.snapshot_id[:8]} "
                "(or an older one) covers this disk")


def checkpoints_to_keep(history: Sequence[PriorSnapshot], usable: Collection[str]) -> set[str]:
    """Snapshot ids (32 digits) whose checkpoints one disk still needs after a commit:
    the newest, and the newest at or before the latest full. ``history`` is newest first
    and includes the snapshot just committed; ``usable`` holds the ids with a usable
    checkpoint on this disk."""
    ids = [h.snapshot_id[:32] for h in history]
    keep = set()
    newest = next((s for s in ids if s in usable), None)
    if newest is not None:
        keep.add(newest)
    start = next((i for i, h in enumerate(history) if h.full), None)
    if start is not None:
        older = next((s for s in ids[start:] if s in usable), None)
        if older is not None:
            keep.add(older)
    return keep


# -- shut-off domains: the images themselves ------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    """What qemu-img tells of an image: its size and its persistent bitmaps' problems
    (``None`` for a usable bitmap)."""

    size: int
    bitmaps: dict[str, str | None]


def stop_leftover_servers(directory: str) -> None:
    """Stop the qemu-nbd processes named by pid files in ``directory`` (left by a killed run:
    they would hold the images' locks and keep the domain from starting)."""
    for pid_file in glob.glob(os.path.join(glob.escape(directory), "*.pid")):
        with ignored(log, f"stopping the qemu-nbd of {pid_file}", OSError, ValueError):
            with open(pid_file) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f"--pid-file={pid_file}".encode() not in f.read().split(b"\0"):
                    continue  # the PID is another process's now
            os.kill(pid, signal.SIGTERM)


def image_info(disk: DomainDisk) -> ImageInfo:
    if disk.path is None or disk.kind not in ("file", "block"):
        raise DiskUnreadable(f"disk {disk.target}: a shut-off domain's {disk.kind} disk "
                             "cannot be read (only files and block devices)", disk.target)
    cmd = ["qemu-img", "info", "-U", "--output=json", "-f", disk.fmt, disk.path]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DiskUnreadable("qemu-img not found: install qemu-utils", disk.target) from None
    if res.returncode != 0:
        raise DiskUnreadable(f"disk {disk.target}: cannot read image {disk.path}: "
                             f"{one_line(res.stderr)}", disk.target)
    info = json.loads(res.stdout)
    bitmaps: dict[str, str | None] = {}
    for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", []):
        flags = b.get("flags", [])
        bitmaps[str(b.get("name"))] = (
            "is inconsistent in the image (QEMU stopped uncleanly)" if "in-use" in flags
            else "is disabled in the image and may have missed writes"
            if "auto" not in flags else None)
    return ImageInfo(int(info["virtual-size"]), bitmaps)
