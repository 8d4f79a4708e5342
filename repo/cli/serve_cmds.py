"""The serve command: a snapshot's disks as NBD exports (instant restore), until stopped."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from vmrepo.sources.nbd.errors import NbdConnectError
from vmrepo.sources.nbd.server import NbdServer

from .. import logs
from ..errors import LockLost, RestoreError
from ..memtune import limit_malloc_arenas
from ..serve import SnapshotExports
from ..spec import label
from ..units import human_bytes, parse_size
from .app import Context, command

log = logging.getLogger("vmrepo.cli")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT (e.g. 127.0.0.1:10809), not {text!r}",
                                 param_hint="--listen")
    return host, int(port)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _size(text: str, option: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


@command()
@click.argument("spec")
@click.option("--disk", "disks", multiple=True, metavar="NAME",
              help="Serve only this disk (repeat for several; default: every disk).")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), metavar="PATH",
              help="Listen on this unix socket (0600), made once the exports are ready (one a "
                   "killed server left is replaced).")
@click.option("--listen", metavar="HOST:PORT",
              help="Listen on TCP instead (NBD has no authentication: keep it on loopback).")
@click.option("--writable", "overlay", type=click.Path(path_type=Path), metavar="DIR",
              help="Accept writes, kept in DIR (DISK.overlay and DISK.map per disk; made if "
                   "missing), never in the repository. The same DIR continues the overlay.")
@click.option("--cache-size", default="256M", show_default=True,
              help="Memory for chunks read from the repository (shared by the disks).")
@click.option("--read-ahead", default="16M", show_default=True,
              help="How far sequential reads are fetched ahead (0: never).")
def serve(ctx: Context, spec: str, disks: tuple[str, ...], socket_path: Path | None,
          listen: str | None, overlay: Path | None, cache_size: str,
          read_ahead: str) -> None:
    """Export the disks of a snapshot (VM@WHEN) over NBD until SIGINT, SIGTERM or SIGHUP.

    One export per disk, named after it: nbd+unix:///DISK?socket=PATH or
    nbd://HOST:PORT/DISK. Read-only unless --writable.
    """
    if (socket_path is None) == (listen is None):
        raise click.UsageError("give one of --socket PATH and --listen HOST:PORT")
    address: str | tuple[str, int]
    if listen is not None:
        address = parse_listen(listen)
        if not _loopback(address[0]):
            ctx.warn(f"serving on {listen}: NBD has no authentication or encryption, anyone "
                     "who reaches it reads the snapshot")
    else:
        assert socket_path is not None
        address = str(socket_path.absolute())
    cache, ahead = _size(cache_size, "--cache-size"), _size(read_ahead, "--read-ahead")
    if logs.level_for(ctx.opts.verbose) > logging.DEBUG:  # a line per batch: only with -vv
        logging.getLogger("vmrepo.planner").setLevel(logging.WARNING)
    r = ctx.open_repo()
    snap = r.find_snapshot(spec)
    chosen = list(snap.disks)
    if disks:
        unknown = [d for d in disks if snap.disk(d) is None]
        if unknown:
            raise RestoreError(f"snapshot {snap.short_id} has no disk {unknown[0]!r} (has: "
                               f"{', '.join(d.name for d in snap.disks)})")
        chosen = [d for d in snap.disks if d.name in disks]
    limit_malloc_arenas()
    server = NbdServer(address, {}, structured_replies=True)
    with ctx.lock(r, f"serve {snap.vm}@{snap.short_id}", read_only=True) as lock:
        if isinstance(address, str):
            free_socket_path(Path(address))
        try:
            server.listen()  # a bad address fails before any overlay is made
            exports = SnapshotExports(r, snap, chosen, cache_size=cache, read_ahead=ahead,
                                      overlay_dir=overlay.absolute() if overlay else None)
            try:
                server.exports = dict(exports.exports)
                server.start()
                how = _serve_until_stopped(
                    ctx, lambda: _ready(ctx, snap_label=label(snap), snap_id=snap.id,
                                        vm=snap.vm, server=server, exports=exports,
                                        overlay=overlay),
                    lock.check if lock is not None else None)
            finally:
                server.stop()
                exports.close()
        except NbdConnectError as exc:
            raise RestoreError(str(exc), server.where()) from None
        finally:
            server.stop()
    st = exports.stats
    log.info("served %s in %d reads, %s in %d writes; %d chunks fetched with %d storage "
             "requests, %d cache hits", human_bytes(st.bytes_read), st.reads,
             human_bytes(st.bytes_written), st.writes, st.chunks_fetched,
             st.storage_requests, st.cache_hits)
    if not ctx.as_json:
        click.echo(f"vmrepo: stopped serving ({how})", err=True)


def _ready(ctx: Context, *, snap_label: str, snap_id: str, vm: str, server: NbdServer,
           exports: SnapshotExports, overlay: Path | None) -> None:
    """Say where the exports are: one line, or with --json one document."""
    items: list[dict[str, Any]] = []
    for name, export in exports.exports.items():
        ov = export.overlay
        items.append({"disk": name, "size": export.size, "url": server.url(name),
                      "overlay": str(ov.data_path) if ov else None,
                      "resumed": ov.resumed if ov else False})
        if ov is not None and ov.resumed:
            ctx.warn(f"disk {name}: continuing the overlay in {overlay} "
                     f"({ov.chunks_mapped} chunks written before)")
    listen: dict[str, Any] = {"socket": server.path} if server.path else \
        {"host": server.bound[0] if server.bound else None,
         "port": server.bound[1] if server.bound else None}
    doc = {"snapshot": snap_id, "vm": vm, "pid": os.getpid(), "listen": listen,
           "writable": overlay is not None, "exports": items}

    def human() -> None:
        names = ", ".join(f"{i['disk']} ({human_bytes(i['size'])})" for i in items)
        mode = f"writes kept in {overlay}" if overlay is not None else "read-only"
        click.echo(f"serving {snap_label} {mode}: {names} at {server.url('DISK')}; "
                   "SIGINT, SIGTERM or SIGHUP stops it")

    ctx.emit(doc, human)


def _serve_until_stopped(ctx: Context, ready: Callable[[], None],
                         check: Callable[[], None] | None) -> str:
    """Say it is ready, then serve until a signal (its name is returned); LockLost if our
    lock could not be kept."""
    signal.signal(signal.SIGHUP, _hangup)
    try:
        ready()
        while True:
            time.sleep(1.0)
            if check is not None:
                try:
                    check()
                except LockLost as exc:
                    exc.emitted = ctx.as_json  # type: ignore[attr-defined]
                    raise
    except KeyboardInterrupt as exc:
        return str(exc) or "SIGINT"
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # stop cleanly, whatever else arrives


def _hangup(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt("SIGHUP")


def free_socket_path(path: Path) -> None:
    """Remove the socket a killed server left at ``path``; RestoreError if a server still
    answers there or something else is in the way."""
    try:
        st = os.lstat(path)
    except OSError:
        return  # missing, or binding will say what is wrong
    if not stat.S_ISSOCK(st.st_mode):
        raise RestoreError(f"cannot listen on {path}: it exists and is not a socket",
                           str(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            log.info("removing %s, left by a server that is gone", path)
            os.unlink(path)
            return
        except OSError:
            return
    raise RestoreError(f"cannot listen on {path}: another server listens there", str(path))
