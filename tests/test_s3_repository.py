"""Repositories on S3 (moto_server on loopback, reached through boto3 over HTTP): every command,
the cache, copies both ways, a fleet of concurrent writers, and faults on the way."""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmrepo import exitcodes

from .faultproxy import FaultProxy
from .helpers import run_cli, run_json, vmrepo_bin, write_sample_image
from .qemu import QemuVM
from .s3server import MotoServer, moto_server, s3_bucket, s3_url  # noqa: F401 - fixtures

MiB = 1 << 20


def _config(work: Path, repository: str, storage: str = "", extra: str = "") -> None:
    (work / "vmrepo.toml").write_text(
        f'repository = "{repository}"\n{storage}'
        '[vm.vm1]\nsource = "file"\ndisks = { disk0 = "a.raw" }\n' + extra)


@pytest.fixture
def work(tmp_path: Path, s3_bucket: str) -> Iterator[Path]:  # noqa: F811
    write_sample_image(tmp_path / "a.raw", 8 * MiB, seed=61)
    _config(tmp_path, s3_url(s3_bucket))
    yield tmp_path


def _change(path: Path, rnd: random.Random) -> None:
    with open(path, "r+b") as f:
        for _ in range(6):
            f.seek(rnd.randrange(0, path.stat().st_size - 9000))
            f.write(rnd.randbytes(9000))


def test_every_command_on_an_s3_repository(work: Path) -> None:
    created = run_json("init", "--chunk-size", "64K", "--pack-size", "1M", cwd=work)
    assert created["repository"].startswith("s3://")
    first = run_json("snapshot", "vm1", "--tag", "one", cwd=work)
    content1 = (work / "a.raw").read_bytes()
    _change(work / "a.raw", random.Random(1))
    second = run_json("snapshot", "vm1", cwd=work)
    assert second["totals"]["chunks_new"] < first["totals"]["chunks_new"]
    listed = run_json("snapshots", cwd=work)["snapshots"]
    assert [s["id"] for s in listed] == [first["id"], second["id"]]
    assert run_json("show", "vm1@latest", cwd=work)["id"] == second["id"]
    for snap, content in ((first, content1), (second, (work / "a.raw").read_bytes())):
        out = work / f"{snap['id'][:8]}.raw"
        res = run_json("restore", f"vm1@{snap['id'][:8]}", "--disk", "disk0", "-o", str(out),
                       cwd=work)
        assert out.read_bytes() == content
        assert res["disks"][0]["requests"] < res["disks"][0]["chunks_read"] / 4
    diff = run_json("diff", f"vm1@{first['id'][:8]}", "vm1@latest", cwd=work)
    assert diff["disks"][0]["state"] == "changed"
    assert run_json("stats", cwd=work)["snapshots"] == 2
    assert run_json("tag", "vm1@latest", "--add", "two", cwd=work)["tags"] == ["two"]
    assert run_json("locks", cwd=work)["locks"] == []
    qcow = work / "d.qcow2"
    run_cli("restore", "vm1@latest", "--disk", "disk0", "--format", "qcow2", "-o", str(qcow),
            cwd=work)
    cmp = subprocess.run(["qemu-img", "compare", str(qcow), str(work / "a.raw")],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout


def test_a_second_listing_reads_no_record_again(work: Path, moto_server: MotoServer,  # noqa: F811
                                                s3_bucket: str) -> None:  # noqa: F811
    run_cli("init", "--chunk-size", "64K", cwd=work)
    for _ in range(3):
        _change(work / "a.raw", random.Random(len(os.listdir(work))))
        run_cli("snapshot", "vm1", cwd=work)
    with FaultProxy(moto_server.port) as proxy:
        _config(work, s3_url(s3_bucket),
                f'[storage]\nendpoint = "{proxy.endpoint}"\naddressing_style = "path"\n')
        cache = work / "fresh-cache"
        env = {"VMREPO_CACHE_DIR": str(cache)}

        def record_gets() -> int:
            return sum(1 for r in proxy.requests if r.method == "GET"
                       and "/snapshots/" in r.target)

        assert len(run_json("snapshots", cwd=work, env=env)["snapshots"]) == 3
        first = record_gets()
        assert first == 3
        run_json("snapshots", cwd=work, env=env)
        assert record_gets() == first  # every record came from the cache
        run_cli("tag", "vm1@latest", "--add", "x", cwd=work, env=env)
        run_json("snapshots", cwd=work, env=env)
        assert record_gets() == first + 1  # only the replaced one


def test_qmp_push_and_nbd_pull_straight_into_s3(tmp_path: Path, s3_bucket: str) -> None:  # noqa: F811
    with QemuVM(tmp_path, {"disk0": 32 * MiB, "disk1": 32 * MiB}) as vm:
        for disk in ("disk0", "disk1"):
            vm.write(disk, "write -P 0x61 1M 3M")
            vm.write(disk, "write -P 0x62 20M 2M")
        (tmp_path / "vmrepo.toml").write_text(
            f'repository = "{s3_url(s3_bucket)}"\n'
            f'[vm.push]\nsource = "qmp"\nsocket = "{vm.qmp_path}"\ndisks = ["disk0"]\n'
            f'[vm.pull]\nsource = "nbd"\nsocket = "{vm.qmp_path}"\ndisks = ["disk1"]\n'
            f'scratch = "{tmp_path}"\nfleece_reserve = "64M"\n')
        run_cli("init", "--chunk-size", "64K", cwd=tmp_path)
        rnd = random.Random(4)
        for vmname, disk in (("push", "disk0"), ("pull", "disk1")) * 2:
            vm.write(disk, f"write -P {rnd.randrange(1, 250)} {rnd.randrange(0, 30) * MiB} 64k")
            snap = run_json("snapshot", vmname, cwd=tmp_path)
            ref = vm.reference(disk, tmp_path / "ref.raw")
            out = tmp_path / "out.raw"
            run_cli("restore", f"{vmname}@latest", "--disk", disk, "-o", str(out), "--force",
                    cwd=tmp_path)
            assert out.read_bytes() == ref.read_bytes(), vmname
        assert snap["disks"][0]["taken"] == "incremental"


def test_copy_local_to_s3_and_back_into_a_third(tmp_path: Path, s3_bucket: str) -> None:  # noqa: F811
    write_sample_image(tmp_path / "a.raw", 8 * MiB, seed=62)
    _config(tmp_path, "local", extra=f'[remote.offsite]\nrepository = "{s3_url(s3_bucket)}"\n')
    run_cli("init", "--chunk-size", "64K", "--pack-size", "1M", cwd=tmp_path)
    rnd = random.Random(3)
    contents = []
    for _ in range(3):
        _change(tmp_path / "a.raw", rnd)
        contents.append((run_json("snapshot", "vm1", cwd=tmp_path)["id"],
                         (tmp_path / "a.raw").read_bytes()))
    run_cli("-r", "offsite", "init", "--copy-params-from", "local", cwd=tmp_path)
    first = run_json("copy", "--to", "offsite", cwd=tmp_path)
    assert first["snapshots"] == 3 and first["bytes_sent"] > 0
    second = run_json("copy", "--to", "offsite", cwd=tmp_path)
    assert second["bytes_sent"] == 0 and second["snapshots"] == 0
    third = tmp_path / "third"
    run_cli("-r", str(third), "init", "--copy-params-from", "offsite", cwd=tmp_path)
    run_json("-r", "offsite", "copy", "--to", str(third), cwd=tmp_path)
    for repo in ("local", "offsite", str(third)):
        for sid, content in contents:
            out = tmp_path / "out.raw"
            run_cli("-r", repo, "restore", f"vm1@{sid[:8]}", "--disk", "disk0", "-o", str(out),
                    "--force", cwd=tmp_path)
            assert out.read_bytes() == content, (repo, sid[:8])


def test_a_fleet_of_four_writers_into_one_bucket(tmp_path: Path, s3_bucket: str) -> None:  # noqa: F811
    """Four hosts (processes with their own configs and caches) snapshot four VMs cloned from one
    base image at the same time, with no coordinator."""
    base = random.Random(9).randbytes(12 * MiB)
    url = s3_url(s3_bucket, "fleet")
    (tmp_path / "template.raw").write_bytes(base)
    (tmp_path / "vmrepo.toml").write_text(
        f'repository = "{url}"\n[vm.template]\nsource = "file"\n'
        'disks = { disk0 = "template.raw" }\n')
    run_cli("init", "--chunk-size", "64K", "--pack-size", "2M", cwd=tmp_path)
    run_cli("snapshot", "template", cwd=tmp_path)  # the golden image, as the first clone's
    stored_before = run_json("stats", cwd=tmp_path)["pack_bytes"]
    procs = []
    images = {}
    for n in range(4):
        host = tmp_path / f"host{n}"
        host.mkdir()
        image = bytearray(base)
        own = random.Random(100 + n).randbytes(2 * MiB)
        image[4 * MiB : 6 * MiB] = own  # each clone's own writes
        (host / "disk.raw").write_bytes(bytes(image))
        images[f"vm{n}"] = bytes(image)
        (host / "vmrepo.toml").write_text(
            f'repository = "{url}"\n[vm.vm{n}]\nsource = "file"\n'
            'disks = { disk0 = "disk.raw" }\n')
        procs.append(subprocess.Popen(
            [vmrepo_bin(), "snapshot", f"vm{n}", "--json"], cwd=host,
            env={**os.environ, "VMREPO_CACHE_DIR": str(host / "cache")},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err for _, err in results]
    listed = {s["vm"] for s in run_json("snapshots", cwd=tmp_path)["snapshots"]}
    assert listed == {"template", "vm0", "vm1", "vm2", "vm3"}
    for vm, content in images.items():
        out = tmp_path / f"{vm}.raw"
        run_cli("restore", f"{vm}@latest", "--disk", "disk0", "-o", str(out), cwd=tmp_path)
        assert out.read_bytes() == content, vm
    # The base was stored once: the four added about their own 2 MiB each, and no more.
    added = run_json("stats", cwd=tmp_path)["pack_bytes"] - stored_before
    assert 4 * 2 * MiB <= added < 4 * 2 * MiB + 2 * MiB, added


def _through(proxy: FaultProxy, work: Path, bucket: str) -> None:
    _config(work, s3_url(bucket),
            f'[storage]\nendpoint = "{proxy.endpoint}"\naddressing_style = "path"\n'
            'read_timeout = 1.0\nconnect_timeout = 1.0\nretries = 6\nretry_max_delay = 0.2\n',
            extra=f'[remote.offsite]\nrepository = "{work}/offsite"\n')


def test_faults_are_retried_or_end_in_one_line(work: Path, moto_server: MotoServer,  # noqa: F811
                                              s3_bucket: str) -> None:  # noqa: F811
    run_cli("init", "--chunk-size", "64K", "--pack-size", "1M", cwd=work)
    run_cli("-r", str(work / "offsite"), "init", "--copy-params-from", s3_url(s3_bucket),
            cwd=work)
    committed = run_json("snapshot", "vm1", cwd=work)["id"]
    before = (work / "a.raw").read_bytes()
    cycle = ["pass", "503", "pass", "drop", "pass", "500", "pass", "delay", "pass", "short",
             "pass", "lost"]
    with FaultProxy(moto_server.port, delay=3.0) as proxy:
        _through(proxy, work, s3_bucket)
        proxy.plan(lambda req: cycle[req.number % len(cycle)])
        _change(work / "a.raw", random.Random(7))
        snap = run_json("snapshot", "vm1", cwd=work)  # completes through retries
        out = work / "out.raw"
        run_cli("restore", f"vm1@{snap['id'][:8]}", "--disk", "disk0", "-o", str(out),
                cwd=work)
        assert out.read_bytes() == (work / "a.raw").read_bytes()
        assert run_json("copy", "--to", "offsite", cwd=work)["snapshots"] == 2
        assert sum(proxy.counts[a] for a in ("503", "drop", "500", "delay", "short", "lost")) > 6
        # A store that keeps failing: one line, the storage exit code, nothing lost.
        proxy.plan(lambda req: "503" if req.number > 10 else "pass")
        _change(work / "a.raw", random.Random(8))
        res = run_cli("snapshot", "vm1", cwd=work, check=False)
        assert res.returncode == exitcodes.STORAGE, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
        proxy.plan(["pass"] * 100000)
        res = run_cli("restore", f"vm1@{committed[:8]}", "--disk", "disk0", "-o",
                      str(work / "old.raw"), cwd=work)
        assert (work / "old.raw").read_bytes() == before
        again = run_json("snapshot", "vm1", cwd=work)  # the re-run completes
        out2 = work / "again.raw"
        run_cli("restore", f"vm1@{again['id'][:8]}", "--disk", "disk0", "-o", str(out2),
                cwd=work)
        assert out2.read_bytes() == (work / "a.raw").read_bytes()
        time.sleep(0)
