"""-v and VMREPO_LOG show what vmrepo does; stdout stays the command's output."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from vmrepo.logs import ignored, level_for

from .helpers import run_cli, write_sample_image


@pytest.fixture
def work(tmp_path: Path) -> Path:
    write_sample_image(tmp_path / "a.raw", 4 << 20, seed=3)
    (tmp_path / "vmrepo.toml").write_text(
        'repository = "repo"\n[vm.vm1]\nsource = "file"\ndisks = { disk0 = "a.raw" }\n')
    run_cli("init", "--chunk-size", "64K", cwd=tmp_path)
    run_cli("snapshot", "vm1", cwd=tmp_path)
    return tmp_path


def test_verbose_shows_info_before_or_after_the_command(work: Path) -> None:
    quiet = run_cli("snapshots", cwd=work)
    assert "info" not in quiet.stderr
    for args in (["-v", "restore", "vm1@latest", "-o", str(work), "--json"],
                 ["restore", "vm1@latest", "-o", str(work), "--json", "--force", "-v"]):
        res = run_cli(*args, cwd=work)
        assert "vmrepo: info: repository" in res.stderr
        assert "vmrepo: info: read" in res.stderr and "requests" in res.stderr
        json.loads(res.stdout)  # logging never reaches stdout


def test_vmrepo_log_debug_and_vv(work: Path) -> None:
    res = run_cli("snapshot", "vm1", cwd=work, env={"VMREPO_LOG": "debug"})
    assert "vmrepo: debug [vmrepo.locks]: took exclusive lock of vm:vm1" in res.stderr
    res = run_cli("-vv", "snapshot", "vm1", cwd=work)
    assert "vmrepo: debug [" in res.stderr


def test_levels() -> None:
    assert level_for(0, {}) == logging.WARNING
    assert level_for(1, {}) == logging.INFO
    assert level_for(2, {}) == logging.DEBUG
    assert level_for(0, {"VMREPO_LOG": "debug"}) == logging.DEBUG
    assert level_for(2, {"VMREPO_LOG": "warning"}) == logging.DEBUG


def test_ignored_errors_leave_a_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("vmrepo.test")
    with caplog.at_level(logging.DEBUG, logger="vmrepo.test"), \
            ignored(log, "removing a scratch file", OSError):
        raise FileNotFoundError(2, "No such file")
    assert "removing a scratch file: ignored FileNotFoundError" in caplog.text
