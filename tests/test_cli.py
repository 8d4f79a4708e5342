"""End to end through the installed ``vmrepo`` command."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import msgpack
import pytest
from vmrepo import exitcodes

from .helpers import (
    pack_count,
    random_image_vm,
    run_cli,
    run_json,
    signal_when,
    write_sample_image,
)


@pytest.fixture
def setup(tmp_path: Path) -> Path:
    """A work dir with a config naming repo/ and a VM with two raw disks."""
    write_sample_image(tmp_path / "a.raw", 24 << 20, seed=1)
    write_sample_image(tmp_path / "b.raw", 5 << 20, seed=2)
    (tmp_path / "vmrepo.toml").write_text(
        'repository = "repo"\n[vm.vm1]\nsource = "file"\n'
        'disks = { disk0 = "a.raw", disk1 = "b.raw" }\n'
        '[vm.broken]\nsource = "file"\ndisks = { disk0 = "missing.raw" }\n'
        '[vm.dirdisk]\nsource = "file"\ndisks = { disk0 = "." }\n'
        '[vm.nosource]\nsource = "teleport"\n'
    )
    run_cli("init", "--chunk-size", "64K", "--pack-size", "2M", cwd=tmp_path)
    return tmp_path


def qemu_img_compare(a: Path, b: Path) -> None:
    res = subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_snapshot_restore_roundtrip(setup: Path) -> None:
    snap = run_json("snapshot", "vm1", "--tag", "first", cwd=setup)
    assert [d["name"] for d in snap["disks"]] == ["disk0", "disk1"]
    assert snap["tags"] == ["first"] and snap["totals"]["bytes_stored"] > 0
    listed = run_json("snapshots", "vm1", cwd=setup)["snapshots"]
    assert [s["id"] for s in listed] == [snap["id"]]
    shown = run_json("show", f"vm1@{snap['id'][:6]}", cwd=setup)
    assert shown["id"] == snap["id"]
    out = setup / "out"
    out.mkdir()
    res = run_json("restore", "vm1@latest", "-o", str(out), cwd=setup)
    assert [d["path"] for d in res["disks"]] == [str(out / "disk0.raw"), str(out / "disk1.raw")]
    assert (out / "disk0.raw").read_bytes() == (setup / "a.raw").read_bytes()
    assert (out / "disk1.raw").read_bytes() == (setup / "b.raw").read_bytes()
    # Sparse: the restored file allocates no more than the source.
    assert os.stat(out / "disk0.raw").st_blocks <= os.stat(setup / "a.raw").st_blocks + 64
    # One image already there: refused before any disk is written.
    again = setup / "again"
    again.mkdir()
    (again / "disk1.raw").write_bytes(b"keep")
    refused = run_cli("restore", "vm1@latest", "-o", str(again), cwd=setup, check=False)
    assert refused.returncode == exitcodes.RESTORE
    assert f"{again / 'disk1.raw'} exists (use --force to replace it)" in refused.stderr
    assert sorted(p.name for p in again.iterdir()) == ["disk1.raw"]
    assert (again / "disk1.raw").read_bytes() == b"keep"
    (again / "disk1.raw").unlink()
    (again / "disk1.raw").symlink_to(again / "nowhere")  # a link to nothing is refused too
    dangling = run_cli("restore", "vm1@latest", "-o", str(again), cwd=setup, check=False)
    assert dangling.returncode == exitcodes.RESTORE and "a link to nothing" in dangling.stderr
    assert (again / "disk1.raw").is_symlink()


def test_human_output_and_env_repository(setup: Path) -> None:
    res = run_cli("snapshot", "vm1", cwd=setup)
    assert "disk0: full" in res.stdout and "total: read" in res.stdout
    other = setup / "elsewhere"
    other.mkdir()
    listed = run_cli("snapshots", cwd=other, env={"VMREPO_REPOSITORY": str(setup / "repo")})
    assert "vm1" in listed.stdout


def test_second_snapshot_adds_only_changes(setup: Path) -> None:
    first = run_json("snapshot", "vm1", cwd=setup)
    rnd = random.Random(3)
    with open(setup / "a.raw", "r+b") as f:
        for block in (5, 77, 300):
            f.seek(block * 65536)
            f.write(rnd.randbytes(4096))
    second = run_json("snapshot", "vm1", cwd=setup)
    d0 = second["disks"][0]["stats"]
    assert d0["chunks_new"] == 3 and d0["bytes_new"] == 3 * 65536
    assert second["disks"][1]["stats"]["chunks_new"] == 0
    assert second["disks"][1]["stats"]["pages_new"] == 0
    out = setup / "o"
    out.mkdir()
    run_cli("restore", f"vm1@{first['id'][:8]}", "--disk", "disk0", "-o", str(out / "first.raw"),
            cwd=setup)
    run_cli("restore", f"vm1@{second['id'][:8]}", "--disk", "disk0", "-o", str(out / "2.raw"),
            cwd=setup)
    assert (out / "2.raw").read_bytes() == (setup / "a.raw").read_bytes()
    assert (out / "first.raw").read_bytes() != (out / "2.raw").read_bytes()


def test_qcow2_and_differential_restore(setup: Path) -> None:
    first = run_json("snapshot", "vm1", cwd=setup)["id"][:8]
    with open(setup / "a.raw", "r+b") as f:
        f.seek(3 << 20)
        f.write(os.urandom(100_000))
        f.seek(10 << 20)
        f.write(bytes(1 << 20))  # data that became zeros
    second = run_json("snapshot", "vm1", cwd=setup)["id"][:8]
    out = setup / "q"
    out.mkdir()
    run_cli("restore", f"vm1@{first}", "--format", "qcow2", "-o", str(out), cwd=setup)
    (out / "d").mkdir()
    res = run_json("restore", f"vm1@{second}", "--since", f"vm1@{first}", "--format", "qcow2",
                   "--backing", str(out / "{disk}.qcow2"), "-o", str(out / "d"), cwd=setup)
    d0 = res["disks"][0]
    assert d0["chunks_read"] >= 2 and d0["chunks_zero"] >= 1
    assert res["disks"][1]["bytes_written"] == 0  # disk1 did not change
    qemu_img_compare(out / "d" / "disk0.qcow2", setup / "a.raw")
    qemu_img_compare(out / "d" / "disk1.qcow2", setup / "b.raw")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json",
                                      str(out / "d" / "disk0.qcow2")],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["backing-filename"].endswith("disk0.qcow2")
    # The overlay holds only the changes, far less than the disk.
    assert info["actual-size"] < 4 << 20


@pytest.mark.parametrize(("args", "code", "message"), [
    (["snapshot", "nosuchvm"], exitcodes.CONFIG, "unknown VM 'nosuchvm'"),
    (["snapshot", "broken"], exitcodes.SOURCE, "cannot open"),
    (["snapshot", "dirdisk"], exitcodes.SOURCE, "not a file or block device"),
    (["snapshot", "nosource"], exitcodes.CONFIG, "unknown source 'teleport'"),
    (["restore", "vm1@latest"], exitcodes.USAGE, "--output"),
    (["restore", "vm1@latest", "-o", "x"], exitcodes.NO_SNAPSHOT, "no snapshot matches"),
    (["restore", "vm1@yesterday", "-o", "x"], exitcodes.USAGE, "invalid snapshot spec"),
    (["show", "vm1"], exitcodes.USAGE, "expected VM@WHEN"),
    (["init"], exitcodes.REPOSITORY_EXISTS, "already exists"),
    (["init", "--chunk-size", "100K", "-r", "other"], exitcodes.USAGE, "power of two"),
    (["snapshots", "-r", "/nonexistent/repo"], exitcodes.NO_REPOSITORY, "no repository at"),
    (["snapshots", "--config", "/nonexistent.toml"], exitcodes.CONFIG, "does not exist"),
])
def test_errors_are_one_line_with_their_exit_code(setup: Path, args: list[str], code: int,
                                                  message: str) -> None:
    res = run_cli(*args, cwd=setup, check=False)
    assert res.returncode == code, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_minute_spec_with_two_snapshots(setup: Path) -> None:
    a = run_json("snapshot", "vm1", cwd=setup)
    b = run_json("snapshot", "vm1", cwd=setup)
    minutes = set()
    for snap in (a, b):
        local = datetime.fromisoformat(snap["time"]).astimezone()
        minutes.add(local.strftime("%Y-%m-%dT%H:%M"))
    for minute in minutes:
        res = run_cli("show", f"vm1@{minute}", cwd=setup, check=False)
        if len(minutes) == 1:
            assert res.returncode == exitcodes.NO_SNAPSHOT
            assert "matches several" in res.stderr
            assert a["id"][:8] in res.stderr and b["id"][:8] in res.stderr
        else:
            assert res.returncode == 0


def test_newer_format_is_refused(setup: Path) -> None:
    cfg_path = setup / "repo" / "config"
    rec = msgpack.unpackb(cfg_path.read_bytes()[1:])
    rec["v"] = 99
    cfg_path.write_bytes(b"\x00" + msgpack.packb(rec))
    res = run_cli("snapshots", cwd=setup, check=False)
    assert res.returncode == exitcodes.INCOMPATIBLE
    assert "newer" in res.stderr


def test_exclusive_lock_blocks_snapshot(setup: Path) -> None:
    from vmrepo.locks import acquire
    from vmrepo.repository import Repository
    from vmrepo.storage.local import LocalBackend

    repo = Repository.open(LocalBackend(setup / "repo"))
    lock = acquire(repo.store, "maintenance", exclusive=True)
    try:
        res = run_cli("snapshot", "vm1", cwd=setup, check=False)
        assert res.returncode == exitcodes.LOCKED
        assert "exclusive lock" in res.stderr and str(os.getpid()) in res.stderr
    finally:
        lock.release()
    run_cli("snapshot", "vm1", cwd=setup)


def test_sigkill_mid_snapshot_leaves_no_record(tmp_path: Path) -> None:
    big = random_image_vm(tmp_path, 192)
    signal_when(["snapshot", "vm1"], tmp_path, lambda: pack_count(tmp_path / "repo") > 0,
                signal.SIGKILL)
    assert list((tmp_path / "repo").glob("data/*/*")), "no pack was written before the kill"
    assert not list((tmp_path / "repo" / "snapshots").glob("*"))
    assert run_json("snapshots", cwd=tmp_path)["snapshots"] == []
    locks = run_json("locks", cwd=tmp_path)["locks"]
    assert len(locks) == 1 and "gone" in locks[0]["stale"]
    # The next snapshot is not blocked by the stale lock and is complete.
    res = run_cli("snapshot", "vm1", cwd=tmp_path)
    assert "stale" in res.stderr
    out = tmp_path / "out.raw"
    run_cli("restore", "vm1@latest", "--disk", "disk0", "-o", str(out), cwd=tmp_path)
    assert subprocess.run(["cmp", str(out), str(big)]).returncode == 0
    assert "removed" in run_cli("unlock", cwd=tmp_path).stdout


def test_sigterm_mid_snapshot_exits_130_without_record(tmp_path: Path) -> None:
    random_image_vm(tmp_path, 192)
    code, err = signal_when(["snapshot", "vm1"], tmp_path,
                            lambda: pack_count(tmp_path / "repo") > 0, signal.SIGTERM)
    assert code == exitcodes.INTERRUPTED, err
    assert err == "vmrepo: error: interrupted by SIGTERM\n"  # one line: no blank one first
    assert not list((tmp_path / "repo" / "snapshots").glob("*"))
    assert run_json("locks", cwd=tmp_path)["locks"] == []  # released on the way out


def test_the_command_table_names_every_command_where_it_is_defined() -> None:
    """``vmrepo`` imports a command's module when the command runs: its table must name
    each command of each module, and nothing else."""
    import importlib

    from vmrepo.cli.app import COMMANDS, cli

    modules = sorted(set(COMMANDS.values()))
    for module in modules:
        importlib.import_module(f"vmrepo.cli.{module}")
    defined = {name: cmd.callback.__module__.rsplit(".", 1)[1]  # type: ignore[union-attr]
               for name, cmd in cli.commands.items()}
    assert defined == COMMANDS


def test_help_lists_every_command_and_a_command_loads_only_its_module(tmp_path: Path) -> None:
    from vmrepo.cli.app import COMMANDS

    out = run_cli("--help", cwd=tmp_path).stdout
    listed = {line.split()[0] for line in out.split("Commands:", 1)[1].splitlines()
              if line.strip()}
    assert listed == set(COMMANDS)
    probe = ("import sys; from vmrepo.cli import main\n"
             "try:\n    main(['snapshots', '--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in sys.modules if m.startswith('vmrepo.cli.')))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    loaded = res.stdout.strip().splitlines()[-1]
    assert "vmrepo.cli.repository_cmds" in loaded
    assert "restore_cmds" not in loaded and "serve_cmds" not in loaded, loaded


@pytest.mark.parametrize(("arrives", "name"), [
    ("raise KeyboardInterrupt", "SIGINT"),
    ("os.kill(os.getpid(), signal.SIGTERM)", "SIGTERM"),
])
def test_a_signal_while_the_program_loads_is_one_line(tmp_path: Path, arrives: str,
                                                      name: str) -> None:
    """A Ctrl-C or SIGTERM that lands while the modules are still imported (made certain
    here by an import that raises or sends it) ends with the usual line and exit code, not
    a traceback or death by the signal."""
    probe = ("import builtins, os, signal\nreal = builtins.__import__\n"
             "def imp(name, *a, **k):\n"
             "    if name == 'app' or name.endswith('cli.app'):\n"
             f"        {arrives}\n"
             "    return real(name, *a, **k)\n"
             "builtins.__import__ = imp\n"
             "from vmrepo.cli import main\nmain(['snapshots'])\n")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode == exitcodes.INTERRUPTED
    assert res.stderr == f"vmrepo: error: interrupted by {name}\n"


def test_the_builtin_plugins_are_the_declared_entry_points() -> None:
    """Built-in plugins load without a metadata scan (repo/plugins.py); pyproject.toml
    declares the same ones as entry points, where other packages add theirs."""
    import tomllib
    from importlib.metadata import entry_points

    from vmrepo.plugins import BUILTIN, _plugin

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert project["project"]["entry-points"] == BUILTIN
    for group, table in BUILTIN.items():
        assert {ep.name: ep.value for ep in entry_points(group=group)} == table
        for name in table:
            assert _plugin(group, name) is not None
        assert _plugin(group, "no-such-plugin") is None


@pytest.mark.parametrize("url", ["file://", "file://host/x", "s3:///p"])
def test_a_location_naming_no_store_is_a_configuration_error(tmp_path: Path, url: str) -> None:
    res = run_cli("-r", url, "init", cwd=tmp_path, check=False)
    assert res.returncode == exitcodes.CONFIG, res.stderr
    assert res.stderr.startswith("vmrepo: error: not a") and url in res.stderr
    assert not list(tmp_path.iterdir())  # nothing made


def test_vmrepo_alone_shows_its_help() -> None:
    """``vmrepo`` with no command prints the help as laid out (not folded into one error
    line) and exits as a usage error."""
    res = run_cli(check=False)
    assert res.returncode == exitcodes.USAGE
    lines = res.stderr.splitlines()
    assert lines[0] == "Usage: vmrepo [OPTIONS] COMMAND [ARGS]..." and "error" not in lines[0]
    assert any(line.split()[:1] == ["snapshot"] for line in lines), res.stderr
