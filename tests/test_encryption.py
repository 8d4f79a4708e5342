"""Encrypted repositories: nothing of a disk in any object, every flipped bit refused or
harmless and reported, keys managed by passphrases, copies that move sealed blobs, two
writers into one encrypted bucket, and one-line errors for missing or wrong passphrases."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmrepo import exitcodes
from vmrepo.cache import Cache
from vmrepo.format import pack_key
from vmrepo.repository import Repository
from vmrepo.storage.local import LocalBackend

from .helpers import run_cli, run_json, vmrepo_bin
from .s3server import moto_server, s3_bucket, s3_url  # noqa: F401 - fixtures

MiB = 1 << 20
BLOCK = 4096


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "pass").write_text("correct horse battery staple\n")
    monkeypatch.setenv("VMREPO_PASSWORD_FILE", str(tmp_path / "pass"))
    (tmp_path / "a.raw").write_bytes(random.Random(1).randbytes(4 * MiB))
    (tmp_path / "vmrepo.toml").write_text(
        'repository = "repo"\n[remote.offsite]\nrepository = "offsite"\n'
        '[vm.vm1]\nsource = "file"\ndisks = { disk0 = "a.raw" }\n')
    return tmp_path


def _objects(repo: Path) -> list[Path]:
    return sorted(p for p in repo.rglob("*") if p.is_file())


def _holds_blocks(repo: Path, content: bytes, samples: int = 64) -> int:
    """How many of a sample of the disk's 4 KiB blocks appear in some object."""
    blobs = b"".join(p.read_bytes() for p in _objects(repo))
    rnd = random.Random(3)
    starts = [rnd.randrange(0, len(content) // BLOCK) * BLOCK for _ in range(samples)]
    return sum(1 for s in starts if content[s:s + BLOCK] in blobs)


def test_no_block_of_the_disk_is_in_any_object(work: Path) -> None:
    created = run_json("init", "--encryption", "aes-256-gcm", cwd=work)
    assert created["encryption"] == "aes-256-gcm"
    run_cli("snapshot", "vm1", cwd=work)
    content = (work / "a.raw").read_bytes()
    assert _holds_blocks(work / "repo", content) == 0
    config = (work / "repo" / "config").read_bytes()
    assert b"blake3-keyed" in config  # the config is plain, and holds no key
    # The same disk in a repository without encryption: its blocks are there to be found.
    run_cli("-r", str(work / "plain"), "init", "--encryption", "none", cwd=work)
    run_cli("-r", str(work / "plain"), "snapshot", "vm1", cwd=work)
    assert _holds_blocks(work / "plain", content) > 32


@pytest.mark.parametrize("algorithm", ["aes-256-gcm", "chacha20-poly1305"])
def test_every_flipped_bit_is_refused_or_harmless_and_reported(work: Path,
                                                               algorithm: str) -> None:
    run_cli("init", "--encryption", algorithm, "--chunk-size", "64K", "--pack-size", "512K",
            cwd=work)
    snap = run_json("snapshot", "vm1", cwd=work)["id"]
    content = (work / "a.raw").read_bytes()
    rnd = random.Random(algorithm)
    objects = [p for p in _objects(work / "repo") if "locks" not in p.parts]
    assert {p.relative_to(work / "repo").parts[0] for p in objects} == \
        {"config", "keys", "snapshots", "index", "data"}
    for obj in objects:
        original = obj.read_bytes()
        damaged = bytearray(original)
        bit = rnd.randrange(len(damaged) * 8)
        damaged[bit // 8] ^= 1 << (bit % 8)
        obj.write_bytes(bytes(damaged))
        try:
            out = work / "out.raw"
            res = run_cli("restore", f"vm1@{snap[:8]}", "--disk", "disk0", "-o", str(out),
                          "--force", cwd=work, check=False)
            assert "Traceback" not in res.stderr, res.stderr
            if res.returncode == 0:  # the restore did not need the damaged bytes
                assert out.read_bytes() == content, obj
            else:
                # refused: the object fails its checks (a damaged record leaves no
                # snapshot to restore, and says why)
                assert res.returncode in (exitcodes.INTEGRITY, exitcodes.WRONG_PASSPHRASE,
                                          exitcodes.NO_SNAPSHOT), (obj, res.stderr)
                assert any(why in res.stderr for why in (
                    "authentication failed", "wrong passphrase", "damaged",
                    "does not match its id")), res.stderr
            ver = run_cli("verify", "--read-data", cwd=work, check=False)
            assert ver.returncode in (exitcodes.INTEGRITY, exitcodes.WRONG_PASSPHRASE), \
                (obj, ver.stdout, ver.stderr)
        finally:
            obj.write_bytes(original)
    assert run_cli("verify", "--read-data", cwd=work).returncode == 0


def test_tampering_is_detected(work: Path) -> None:
    run_cli("init", "--encryption", "aes-256-gcm", cwd=work)
    first = run_json("snapshot", "vm1", "--tag", "one", cwd=work)["id"]
    with open(work / "a.raw", "r+b") as f:
        f.write(b"x" * 100_000)
    second = run_json("snapshot", "vm1", cwd=work)["id"]
    records = work / "repo" / "snapshots"
    # Swapped records: each is sealed for its kind, but names its own id.
    a, b = (records / first).read_bytes(), (records / second).read_bytes()
    (records / first).write_bytes(b)
    (records / second).write_bytes(a)
    listed = run_cli("snapshots", cwd=work)
    assert "names another id" in listed.stderr and first[:8] not in listed.stdout
    (records / first).write_bytes(a)
    (records / second).write_bytes(b)
    # A plain record put there by someone without the key is refused.
    plain = work / "plain"
    run_cli("-r", str(plain), "init", "--encryption", "none", cwd=work)
    run_cli("-r", str(plain), "snapshot", "vm1", cwd=work)
    stray = next((plain / "snapshots").iterdir())
    (records / stray.name).write_bytes(stray.read_bytes())
    res = run_cli("snapshots", "--json", cwd=work)
    assert "not encrypted, in an encrypted repository" in res.stderr
    assert stray.name not in [s["id"] for s in json.loads(res.stdout)["snapshots"]]
    # Bytes of one blob moved into another: each blob's seal binds it to its id.
    packs = sorted((work / "repo" / "data").glob("*/*"))
    biggest = max(packs, key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[8:8 + 64], data[100_008:100_072] = data[100_008:100_072], data[8:8 + 64]
    biggest.write_bytes(bytes(data))
    assert run_cli("verify", "--read-data", cwd=work, check=False).returncode == \
        exitcodes.INTEGRITY


def test_keys_added_listed_replaced_removed_and_exported(work: Path) -> None:
    run_cli("init", "--encryption", "aes-256-gcm", cwd=work)
    run_cli("snapshot", "vm1", cwd=work)
    (work / "second").write_text("a second passphrase\n")
    run_cli("key", "add", "--label", "ops", cwd=work,
            env={"VMREPO_NEW_PASSWORD_FILE": str(work / "second")})
    listed = run_json("key", "list", cwd=work)["keys"]
    assert [k["label"] for k in listed] == ["init", "ops"] and listed[0]["current"]
    as_second = {"VMREPO_PASSWORD_FILE": str(work / "second")}
    assert len(run_json("snapshots", cwd=work, env=as_second)["snapshots"]) == 1
    # passwd replaces the key that was used; the old passphrase no longer opens.
    (work / "third").write_text("third\n")
    run_cli("key", "passwd", cwd=work, env={**as_second,
                                            "VMREPO_NEW_PASSWORD_FILE": str(work / "third")})
    res = run_cli("snapshots", cwd=work, env=as_second, check=False)
    assert res.returncode == exitcodes.WRONG_PASSPHRASE and "wrong passphrase" in res.stderr
    # Removing: neither the key in use nor the last one.
    keys = run_json("key", "list", cwd=work)["keys"]
    assert [k["current"] for k in keys] == [True, False]
    mine = run_cli("key", "remove", keys[0]["id"][:8], cwd=work, check=False)
    assert mine.returncode == exitcodes.USAGE and "opened the repository with" in mine.stderr
    run_cli("key", "remove", keys[1]["id"][:8], cwd=work)
    last = run_cli("key", "remove", keys[0]["id"][:8], cwd=work, check=False)
    assert last.returncode == exitcodes.USAGE and "only key" in last.stderr
    # Every passphrase forgotten: the exported master key, saved as the docs say
    # (`vmrepo key export > FILE`), restores access; a garbled one says why it is refused.
    export = run_cli("key", "export", cwd=work)
    assert export.stdout.startswith("vmrepo-key ") and "offline" in export.stderr
    (work / "paper").write_text(export.stdout)
    words = export.stdout.split()
    words[3] = "1" + words[3][1:]
    (work / "typo").write_text(" ".join(words) + "\n")
    misplaced = run_cli("key", "passwd", "--from-export", str(work / "paper"), cwd=work,
                        check=False)
    assert misplaced.returncode == exitcodes.USAGE
    assert "--from-export goes with `key add`, not `key passwd`" in misplaced.stderr
    typo = run_cli("key", "add", "--from-export", str(work / "typo"), cwd=work, check=False)
    assert typo.returncode == exitcodes.WRONG_PASSPHRASE and "base32" in typo.stderr
    (work / "pass").write_text("\n")
    empty = run_cli("snapshots", cwd=work, check=False)
    assert empty.returncode == exitcodes.NO_PASSPHRASE and "is empty" in empty.stderr
    (work / "pass").write_text("forgotten\n")
    assert run_cli("snapshots", cwd=work, check=False).returncode == \
        exitcodes.WRONG_PASSPHRASE
    (work / "fresh").write_text("fresh start\n")
    run_cli("key", "add", "--from-export", str(work / "paper"), cwd=work,
            env={"VMREPO_NEW_PASSWORD_FILE": str(work / "fresh")})
    assert len(run_json("snapshots", cwd=work,
                        env={"VMREPO_PASSWORD_FILE": str(work / "fresh")})["snapshots"]) == 1
    # A copy made with --copy-params-from shares the master key: the same export opens it
    # once it holds a snapshot to show that (an empty one proves nothing: refused).
    run_cli("-r", "offsite", "init", "--copy-params-from", "repo", cwd=work,
            env={"VMREPO_PASSWORD_FILE": str(work / "fresh")})
    (work / "offsite-new").write_text("a new passphrase for the copy\n")
    offsite = {"VMREPO_NEW_PASSWORD_FILE": str(work / "offsite-new"),
               "VMREPO_PASSWORD_FILE": str(work / "pass")}  # forgotten
    empty = run_cli("-r", "offsite", "key", "add", "--from-export", str(work / "paper"),
                    cwd=work, env=offsite, check=False)
    assert empty.returncode == exitcodes.WRONG_PASSPHRASE
    assert "holds no snapshot record to show that the key fits" in empty.stderr
    run_cli("copy", "--to", "offsite", cwd=work, env={"VMREPO_PASSWORD_FILE": str(work / "fresh")})
    run_cli("-r", "offsite", "key", "add", "--from-export", str(work / "paper"), cwd=work,
            env=offsite)
    assert len(run_json("-r", "offsite", "snapshots", cwd=work,
                        env={"VMREPO_PASSWORD_FILE": str(work / "fresh")})["snapshots"]) == 1


def test_a_passphrase_a_key_already_has_is_refused(work: Path) -> None:
    run_cli("init", "--encryption", "aes-256-gcm", cwd=work)
    same = {"VMREPO_NEW_PASSWORD_FILE": str(work / "pass")}
    for action in ("add", "passwd"):
        res = run_cli("key", action, cwd=work, env=same, check=False)
        assert res.returncode == exitcodes.USAGE, action
        assert "already has that passphrase: choose another" in res.stderr
    export = run_cli("key", "export", cwd=work).stdout
    (work / "paper").write_text(export)
    res = run_cli("key", "add", "--from-export", "paper", cwd=work, env=same, check=False)
    assert res.returncode == exitcodes.USAGE and "already has that passphrase" in res.stderr
    assert len(run_json("key", "list", cwd=work)["keys"]) == 1
    (work / "other").write_text("another passphrase\n")
    run_cli("key", "add", cwd=work, env={"VMREPO_NEW_PASSWORD_FILE": str(work / "other")})
    assert len(run_json("key", "list", cwd=work)["keys"]) == 2


def test_passphrase_errors_are_one_line(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMREPO_PASSWORD_FILE")
    res = subprocess.run([vmrepo_bin(), "init"], cwd=work, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == exitcodes.NO_PASSPHRASE
    assert "VMREPO_PASSWORD_FILE" in res.stderr and "--encryption none" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (work / "repo").exists()
    monkeypatch.setenv("VMREPO_PASSWORD_FILE", str(work / "pass"))
    run_cli("init", "--encryption", "aes-256-gcm", cwd=work)
    (work / "wrong").write_text("wrong\n")
    res = run_cli("snapshot", "vm1", cwd=work, env={"VMREPO_PASSWORD_FILE": str(work / "wrong")},
                  check=False)
    assert res.returncode == exitcodes.WRONG_PASSPHRASE
    assert res.stderr.strip() == f"vmrepo: error: wrong passphrase for {work / 'repo'}: no " \
                                 "key of this repository opens with it"
    res = run_cli("snapshots", cwd=work, env={"VMREPO_PASSWORD_FILE": "",
                                               "VMREPO_PASSWORD_COMMAND": "echo wrong"},
                  check=False)
    assert res.returncode == exitcodes.WRONG_PASSPHRASE
    res = run_cli("snapshots", cwd=work, env={"VMREPO_PASSWORD_FILE": str(work / "nofile")},
                  check=False)
    assert res.returncode == exitcodes.NO_PASSPHRASE and "nofile" in res.stderr


def test_copies_between_repositories_sharing_keys_move_sealed_packs(work: Path) -> None:
    run_cli("init", "--encryption", "aes-256-gcm", "--chunk-size", "64K", "--pack-size", "1M",
            cwd=work)
    snap = run_json("snapshot", "vm1", cwd=work)["id"]
    (work / "offsite-pass").write_text("the offsite's own\n")
    run_cli("-r", "offsite", "init", "--copy-params-from", "repo", cwd=work,
            env={"VMREPO_PASSWORD_FILE": str(work / "pass")})
    copied = run_json("copy", "--to", "offsite", cwd=work)
    assert copied["snapshots"] == 1 and not copied["transcoded"]
    # Every blob there holds the very bytes sealed here (re-sealing would take a new salt);
    # the packs' headers are the offsite's own, and it verifies clean.
    src, dst = (Repository.open(LocalBackend(work / name), cache=Cache(work / f"c-{name}"),
                                passphrase=lambda _rid: "correct horse battery staple")
                for name in ("repo", "offsite"))
    blobs = 0
    for pid in dst.existing_packs():
        for e in dst.store.pack_header(pid):
            there = dst.store.get_range(pack_key(pid), e.offset, e.length)
            loc = src.index.locations(e.id)[0]
            assert src.store.get_range(pack_key(loc.pack_id), loc.offset, loc.length) == there
            blobs += 1
    assert blobs == copied["blobs_sent"] > 0
    assert run_cli("-r", "offsite", "verify", "--read-data", cwd=work).returncode == 0
    out = work / "back.raw"
    run_cli("-r", "offsite", "restore", f"vm1@{snap[:8]}", "--disk", "disk0", "-o", str(out),
            cwd=work)
    assert out.read_bytes() == (work / "a.raw").read_bytes()


def test_two_writers_into_one_encrypted_bucket(tmp_path: Path, s3_bucket: str,  # noqa: F811
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pass").write_text("shared\n")
    monkeypatch.setenv("VMREPO_PASSWORD_FILE", str(tmp_path / "pass"))
    for name in ("a", "b"):
        (tmp_path / f"{name}.raw").write_bytes(random.Random(name).randbytes(6 * MiB))
    (tmp_path / "vmrepo.toml").write_text(
        f'repository = "{s3_url(s3_bucket)}"\n'
        '[vm.vm1]\nsource = "file"\ndisks = { disk0 = "a.raw" }\n'
        '[vm.vm2]\nsource = "file"\ndisks = { disk0 = "b.raw" }\n')
    run_cli("init", "--encryption", "chacha20-poly1305", "--chunk-size", "64K", "--pack-size", "1M",
            cwd=tmp_path)
    procs = [subprocess.Popen([vmrepo_bin(), "snapshot", vm, "--json"], cwd=tmp_path,
                              env={**os.environ,
                                   "VMREPO_CACHE_DIR": str(tmp_path / f"cache-{vm}")},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for vm in ("vm1", "vm2")]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    for vm, name in (("vm1", "a"), ("vm2", "b")):
        out = tmp_path / f"{vm}.out"
        run_cli("restore", f"{vm}@latest", "--disk", "disk0", "-o", str(out), cwd=tmp_path)
        assert out.read_bytes() == (tmp_path / f"{name}.raw").read_bytes()


def test_keys_list_in_the_order_they_were_added(monkeypatch: pytest.MonkeyPatch) -> None:
    """Within one second too (the records hold microseconds); records of older writers,
    in whole seconds, sort by their time as well."""
    from collections.abc import Iterator
    from datetime import UTC, datetime, timedelta, tzinfo

    from vmrepo import keys
    from vmrepo.codec import Codec, RecordKind
    from vmrepo.format import Hasher, key_key
    from vmrepo.keys import MasterKey, add_key, list_keys
    from vmrepo.storage.base import BackendWrapper, ObjectInfo
    from vmrepo.storage.memory import MemoryBackend
    from vmrepo.store import RepoStore

    ticks = iter(range(100))

    class OneSecond(datetime):  # every key is added within the same second
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> OneSecond:  # type: ignore[override]
            t = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=next(ticks))
            return cls.fromtimestamp(t.timestamp(), tz)

    class NewestFirst(BackendWrapper):  # a store that lists the newest object first
        def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
            return reversed(list(self.inner.list(prefix)))

    monkeypatch.setattr(keys, "datetime", OneSecond)
    store = RepoStore(NewestFirst(MemoryBackend()), Codec(), Hasher(b"k" * 32))
    master = MasterKey.new()
    added = [add_key(store, "r" * 32, master, f"pass {i}", f"k{i}").id for i in range(4)]
    old = {"v": 1, "id": "0" * 32, "created": "2020-01-01T00:00:00+00:00", "host": "h",
           "label": "old", "kdf": {"algorithm": "scrypt", "n": 2, "r": 1, "p": 1,
                                   "salt": bytes(16)}, "sealed": bytes(80)}
    store.put_record(RecordKind.KEY, key_key(old["id"]), old)
    assert [k.id for k in list_keys(store)] == [old["id"], *added]


# RFC 7914 §12 (the first 32 bytes of each: a key record's kek is 32 bytes long).
_SCRYPT_VECTORS = [
    ("password", b"NaCl", 1024, 8, 16,
     "fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b373162"),
    ("pleaseletmein", b"SodiumChloride", 16384, 8, 1,
     "7023bdcb3afd7348461c06cd81fd38ebfda8fbba904f8e3ea9b543f6545da1f2"),
]


@pytest.mark.parametrize(("passphrase", "salt", "n", "r", "p", "expected"), _SCRYPT_VECTORS)
def test_the_kdf_is_rfc_7914_scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int,
                                     expected: str) -> None:
    from vmrepo.passphrase import scrypt
    assert scrypt(passphrase, salt, n, r, p).hex() == expected


def test_the_kdf_without_libsodiums_scrypt_is_openssls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where PyNaCl's libsodium lacks scrypt (a minimal build), OpenSSL's gives the key."""
    from nacl import bindings
    from vmrepo.passphrase import scrypt
    monkeypatch.setattr(bindings, "has_crypto_pwhash_scryptsalsa208sha256", False)
    monkeypatch.setattr(bindings, "crypto_pwhash_scryptsalsa208sha256_ll", None)
    passphrase, salt, n, r, p, expected = _SCRYPT_VECTORS[1]
    assert scrypt(passphrase, salt, n, r, p).hex() == expected


@settings(max_examples=40, deadline=None)
@given(passphrase=st.text(min_size=1, max_size=40), salt=st.binary(min_size=16, max_size=16),
       log_n=st.integers(1, 10), r=st.integers(1, 8), p=st.integers(1, 3))
def test_the_kdf_agrees_with_openssl_scrypt(passphrase: str, salt: bytes, log_n: int, r: int,
                                            p: int) -> None:
    """Records written with OpenSSL's scrypt (every earlier vmrepo) open with libsodium's."""
    import hashlib

    from vmrepo.passphrase import scrypt
    assert scrypt(passphrase, salt, 1 << log_n, r, p) == hashlib.scrypt(
        passphrase.encode(), salt=salt, n=1 << log_n, r=r, p=p, dklen=32)


@pytest.mark.parametrize(("n", "r", "p"), [
    (3, 8, 1), (1, 8, 1), (-2, 8, 1), (1 << 16, 0, 1), (1 << 16, 8, 0), (1 << 16, -8, 1),
    (1 << 16, 8, -1), (2, 8, -2), (2, 1 << 31, -2), (2, 1 << 36, -2), (1 << 30, 8, 1),
    (1 << 20, 8, 1), (2, 1 << 20, 1 << 10)])
def test_a_records_impossible_or_huge_kdf_parameters_are_refused(n: int, r: int,
                                                                  p: int) -> None:
    """A damaged or hostile record's parameters raise ValueError (the record then opens
    nothing), checked before anything is allocated: no more than OpenSSL's scrypt was
    allowed (256 n r bytes below 2 GiB), and never a negative factor."""
    import resource

    from vmrepo.passphrase import scrypt
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError):
        scrypt("passphrase", bytes(16), n, r, p)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 << 10  # KiB


@pytest.mark.parametrize(("n", "r", "p"), [(4, 4097, 1), (2, 8192, 1), (1 << 19, 8, 1)])
def test_large_but_allowed_kdf_parameters_open_as_before(n: int, r: int, p: int) -> None:
    """Parameters OpenSSL's scrypt took (up to its bound) give the same key."""
    import hashlib

    from vmrepo.passphrase import scrypt
    assert scrypt("pass", b"s" * 16, n, r, p) == hashlib.scrypt(
        b"pass", salt=b"s" * 16, n=n, r=r, p=p, dklen=32, maxmem=256 * n * r + (1 << 20))


def test_a_damaged_record_does_not_stop_another_from_opening() -> None:
    """A record whose parameters are not scrypt's is passed over for the next one."""
    from vmrepo import keys
    from vmrepo.codec import Codec, RecordKind
    from vmrepo.format import Hasher, key_key
    from vmrepo.keys import MasterKey, add_key, unlock
    from vmrepo.storage.memory import MemoryBackend
    from vmrepo.store import RepoStore

    store = RepoStore(MemoryBackend(), Codec(), Hasher(b"k" * 32))
    master = MasterKey.new()
    good = add_key(store, "r" * 32, master, "right", "good")
    for i, (n, r, p) in enumerate([(1 << 16, 8, -1), (2, 1 << 31, -2), (3, 8, 1)]):
        bad = {"v": 1, "id": f"{i}" * 32, "created": "2020-01-01T00:00:00+00:00", "host": "h",
               "label": "bad", "kdf": {"algorithm": "scrypt", "n": n, "r": r, "p": p,
                                       "salt": bytes(16)}, "sealed": bytes(80)}
        store.put_record(RecordKind.KEY, key_key(bad["id"]), bad)
    assert [k.label for k in keys.list_keys(store)][:3] == ["bad"] * 3
    opened, info = unlock(store, "r" * 32, "right")
    assert info.id == good.id and opened.ids == master.ids
