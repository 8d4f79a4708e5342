"""Runs the command blocks of a document as written, in a sandbox that looks like the host the
document describes.

From a Markdown document this takes its ``toml`` blocks (together: the
``vmrepo.toml`` of the sandbox) and its ``sh`` blocks (the commands, in
order); a ``toml`` or ``sh`` block right after ``<!-- docs test: not run
(why) -->`` is left out. It then writes one shell script that, inside private mount and PID
namespaces:

* mounts fresh tmpfs file systems on ``/run`` and ``/srv``, so that the
  paths the document uses (``/run/qemu/*.qmp``, ``/srv/images/...``,
  ``/srv/backup/repo``) exist without touching the host;
* creates every image a ``file`` VM names, starts a QEMU (no guest OS, qcow2
  disks with data) for every VM with a QMP ``socket``, a qemu-nbd for every
  ``nbd+unix`` export a VM names (with its bitmap), and gives
  ``/srv/devices/*`` paths a loop device;
* starts an S3 endpoint (moto_server) on loopback when the document uses
  ``s3://`` repositories, and points the AWS environment at it;
* runs each command with the clock at 2024-05-01 10:00 UTC (libfaketime) so
  that the document's dates exist, and reports each exit code.

Everything it starts dies with the PID namespace, whatever happens.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SKIP = re.compile(r"<!--\s*docs test: not run")
FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


@dataclass
class Document:
    config: str
    commands: list[str]


def parse(markdown: str) -> Document:
    lines = markdown.splitlines()
    config: list[str] = []
    commands: list[str] = []
    i = 0
    skip_next = False
    while i < len(lines):
        line = lines[i]
        if SKIP.search(line):
            skip_next = True
        m = re.fullmatch(r"```(\w+)", line.strip())
        if m:
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            if m.group(1) == "toml" and not skip_next:
                config += body
            elif m.group(1) == "sh" and not skip_next:
                commands += _commands(body)
            skip_next = False
        i += 1
    return Document("\n".join(config) + "\n", commands)


def _commands(body: list[str]) -> list[str]:
    out: list[str] = []
    pending = ""
    for line in body:
        if not line.strip() and not pending:
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        out.append(pending.strip())
        pending = ""
    return out


def _vm_setup(name: str, table: dict[str, Any]) -> list[str]:
    """Shell lines that make VM ``name`` of the config exist."""
    sh: list[str] = []
    if table.get("source") == "file":
        for path in dict(table.get("disks", {})).values():
            q = shlex.quote(path)
            if path.startswith("/dev/"):
                continue
            sh.append(f"mkdir -p $(dirname {q})")
            if path.endswith(".qcow2"):
                sh += [f"qemu-img create -q -f qcow2 {q} 24M",
                       f"qemu-io -f qcow2 -c 'write -P 0x5a 1M 3M' -c 'write -P 0x11 9M 1M' {q}"]
            else:
                sh += [f"truncate -s 24M {q}",
                       f"dd if=/dev/urandom of={q} bs=1M count=4 seek=2 conv=notrunc "
                       "status=none"]
    elif str(table.get("url", "")).startswith("nbd+unix://"):
        # An export someone else set up (libvirt's pull backup): qemu-nbd with a bitmap.
        url = urllib.parse.urlsplit(table["url"])
        sock = urllib.parse.parse_qs(url.query)["socket"][0]
        export = url.path.lstrip("/")
        img = f"/srv/images/{name}-export.qcow2"
        sh += [f"mkdir -p $(dirname {shlex.quote(sock)})",
               f"qemu-img create -q -f qcow2 {img} 32M",
               f"qemu-io -f qcow2 -c 'write -P 0x77 2M 2M' {img}"]
        bitmap = table.get("bitmap")
        if bitmap:
            sh.append(f"qemu-img bitmap --add {img} {shlex.quote(bitmap)}")
        sh.append(f"qemu-nbd -f qcow2 -x {shlex.quote(export)} --socket={shlex.quote(sock)} -t "
                  + (f"-B {shlex.quote(bitmap)} " if bitmap else "") + f"{img} "
                  "</dev/null >/dev/null 2>&1 &")
        sh.append(f"for i in $(seq 300); do [ -S {shlex.quote(sock)} ] && break; sleep 0.05; "
                  "done")
    elif isinstance(table.get("socket"), str) and table["socket"].startswith("/"):
        sock = table["socket"]
        disks = table.get("disks") or ["disk0", "disk1"]
        args = ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
                "-accel", "kvm", "-accel", "tcg", "-qmp", f"unix:{sock},server=on,wait=off"]
        sh.append(f"mkdir -p $(dirname {shlex.quote(sock)}) /srv/images")
        blockdevs = []
        for disk in disks:
            img = f"/srv/images/{name}-{disk}.qcow2"
            sh += [f"qemu-img create -q -f qcow2 {img} 32M",
                   f"qemu-io -f qcow2 -c 'write -P 0x3c 4M 6M' {img}"]
            blockdevs += ["-blockdev", f"driver=qcow2,node-name={disk},file.driver=file,"
                                       f"file.filename={img}"]
        sh.append(" ".join(shlex.quote(a) for a in args + blockdevs)
                  + " </dev/null >/dev/null 2>&1 &")
        sh.append(f"for i in $(seq 300); do [ -S {shlex.quote(sock)} ] && break; sleep 0.05; "
                  "done")
    return sh


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def script(doc: Document, work: Path, bindir: str) -> str:
    settings = tomllib.loads(doc.config)
    sh = ["set -u", "mount -t tmpfs tmpfs /run", "mount -t tmpfs tmpfs /srv",
          f"cd {shlex.quote(str(work))}", "mkdir -p /srv/images /srv/devices"]
    for name, table in settings.get("vm", {}).items():
        sh += _vm_setup(name, table)
    if "s3://" in doc.config or any("s3://" in c for c in doc.commands):
        # An S3 endpoint on loopback; the commands find it through the AWS environment.
        port = _free_port()
        sh += [f"{shlex.quote(bindir)}/moto_server -H 127.0.0.1 -p {port} >/dev/null 2>&1 &",
               f"for i in $(seq 300); do (echo > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && "
               "break; sleep 0.05; done",
               f"export AWS_ENDPOINT_URL=http://127.0.0.1:{port} AWS_ACCESS_KEY_ID=docs "
               "AWS_SECRET_ACCESS_KEY=docs-secret AWS_DEFAULT_REGION=us-east-1 "
               "AWS_EC2_METADATA_DISABLED=true"]
    devices = sorted({p for c in doc.commands for p in re.findall(r"/srv/devices/[\w.-]+", c)})
    for dev in devices:
        sh += [f"truncate -s 64M {dev}.img",
               f"ln -s $(losetup --find --show {dev}.img) {dev}"]
    # Repositories are encrypted by default: the documents' commands find the passphrase
    # where an operator's scripts would.
    sh += ["echo 'docs sandbox passphrase' > /run/vmrepo-passphrase",
           "export VMREPO_PASSWORD_FILE=/run/vmrepo-passphrase"]
    sh += [f"export PATH={shlex.quote(bindir)}:$PATH TZ=UTC",
           f"export LD_PRELOAD={FAKETIME} FAKETIME='@2024-05-01 10:00:00'"]
    for n, cmd in enumerate(doc.commands):
        sh += [f"echo '=== CMD {n}'", "(", cmd, ") 2>&1", f"echo \"=== RC {n} $?\""]
    sh += ["unset LD_PRELOAD FAKETIME"]
    sh += [f"losetup -d $(readlink {dev})" for dev in devices]
    return "\n".join(sh) + "\n"


def run(markdown: Path, work: Path) -> list[tuple[str, int, str]]:
    """Run the document's commands; return ``(command, exit code, output)`` for each."""
    doc = parse(markdown.read_text())
    (work / "vmrepo.toml").write_text(doc.config)
    text = script(doc, work, str(Path(sys.executable).parent))
    (work / "sandbox.sh").write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("VMREPO_REPOSITORY",
                                                            "VMREPO_CONFIG")}
    res = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--mount-proc",
                          "--propagation", "private", "bash", str(work / "sandbox.sh")],
                         cwd=work, env=env, capture_output=True, text=True, timeout=900,
                         check=False)
    results = []
    for n, cmd in enumerate(doc.commands):
        m = re.search(rf"=== CMD {n}\n(.*?)=== RC {n} (\d+)\n", res.stdout, re.S)
        if m is None:
            results.append((cmd, -1, res.stdout[-2000:] + res.stderr[-2000:]))
        else:
            results.append((cmd, int(m.group(2)), m.group(1)))
    return results
