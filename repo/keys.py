"""Keys of an encrypted repository: a random master key, wrapped by passphrases (§15).

The *master key* is 64 random bytes: 32 encrypt objects (:mod:`vmrepo.crypto`), 32 key
the BLAKE3 ids (so ids reveal nothing either). It is never stored in the clear: each
``keys/<id>`` record holds it sealed (ChaCha20-Poly1305) with a key derived from one
passphrase by scrypt (memory-hard; its parameters are in the record). Any of the key
records opens the repository; ``vmrepo key add|list|remove|passwd`` manage them and
``vmrepo key export`` prints the master key for a paper or offline copy.

A *key file* (:class:`KeyFile`, ``vmrepo key add --key-file``) is for unattended hosts: 32
random bytes in a root-only file, whose key record seals the master key under them directly
(``kdf`` ``none``: a random secret needs no stretching), so a command run with
``VMREPO_KEY_FILE`` opens the repository without scrypt's time and memory. Like a
passphrase's record, it is listed, and removed to revoke the host.

Key records are plain records (they are read before anything can be decrypted); the
associated data of the sealed master key binds it to its repository id.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
import socket
import stat
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from vmrepo.storage.errors import ObjectNotFound
from vmrepo.storage.local import fsync_dir

from .codec import RecordKind
from .errors import (
    IncompatibleRepository,
    IntegrityError,
    KeyNotFound,
    WrongPassphrase,
)
from .format import KEY_PREFIX, KEY_VERSION, key_key, parse_hex_name
from .passphrase import record_params, scrypt, stop_ahead
from .store import RepoStore

#: scrypt cost: 2**16 x 128 x 8 bytes = 64 MiB of memory per attempt.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 16, 8, 1
#: The ``kdf`` algorithm of a key file's record: its 32-byte secret seals the master key.
KDF_NONE = "none"
KEY_FILE_MAGIC = "vmrepo-key-file"
_NONCE = bytes(12)


@dataclass(frozen=True)
class MasterKey:
    encryption: bytes
    ids: bytes

    @classmethod
    def new(cls) -> MasterKey:
        return cls(secrets.token_bytes(32), secrets.token_bytes(32))

    def raw(self) -> bytes:
        return self.encryption + self.ids

    @classmethod
    def from_raw(cls, raw: bytes) -> MasterKey:
        if len(raw) != 64:
            raise ValueError("a master key is 64 bytes")
        return cls(raw[:32], raw[32:])

    def export(self, repository_id: str) -> str:
        """A text form for paper: the repository id, the key, and a check sum."""
        raw = self.raw()
        body = base64.b32encode(raw).decode().rstrip("=")
        groups = " ".join(body[i:i + 8] for i in range(0, len(body), 8))
        return f"vmrepo-key {repository_id} {groups} {zlib.crc32(raw):08x}"

    @classmethod
    def parse_export(cls, text: str) -> tuple[str, MasterKey]:
        """The repository id and key of an export: its first line that starts with
        ``vmrepo-key`` (whatever else the file holds); ValueError saying what is wrong."""
        line = next((ln for ln in text.splitlines() if ln.strip().startswith("vmrepo-key")), "")
        parts = line.split()
        if len(parts) < 4:
            raise ValueError("not an exported vmrepo key (no line starts with 'vmrepo-key')")
        body = "".join(parts[2:-1]).upper()
        try:
            raw = base64.b32decode(body + "=" * (-len(body) % 8))
        except (binascii.Error, ValueError):
            raise ValueError("the exported key holds characters that are not base32 (A-Z, "
                             "2-7): a typo?") from None
        if f"{zlib.crc32(raw):08x}" != parts[-1].lower():
            raise ValueError("the exported key's check sum does not match (a typo?)")
        return parts[1], cls.from_raw(raw)


@dataclass(frozen=True)
class KeyInfo:
    id: str
    created: str
    host: str
    label: str
    #: What opens it: ``scrypt`` (a passphrase) or ``none`` (a key file).
    kdf: str = "scrypt"


class KeyFileError(ValueError):
    """A key file that cannot be read or is not one (its path and why)."""

    def __init__(self, path: str, why: str, readable: bool = True) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why
        #: False when the file could not be read at all (rather than read and refused).
        self.readable = readable


@dataclass(frozen=True)
class KeyFile:
    """The secret of a ``kdf: none`` key record, in a file of one line:
    ``vmrepo-key-file <repository id> <key id> <secret, 64 hex digits>``."""

    repository_id: str
    key_id: str
    secret: bytes = field(repr=False)
    path: str = ""
    #: The file's permission bits when it was read (None for a new one).
    mode: int | None = field(default=None, compare=False)

    @classmethod
    def new(cls, repository_id: str, path: str) -> KeyFile:
        return cls(repository_id, secrets.token_hex(16), secrets.token_bytes(32), path)

    def text(self) -> str:
        return f"{KEY_FILE_MAGIC} {self.repository_id} {self.key_id} {self.secret.hex()}\n"

    def create(self) -> None:
        """Write the file, readable by its owner only, and make it durable; refuse one that
        exists. Interrupted or failed, it leaves no file behind."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise KeyFileError(self.path, exc.strerror or str(exc)) from None
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(self.text())
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except BaseException as exc:
            self.remove()
            if isinstance(exc, OSError):
                raise KeyFileError(self.path, exc.strerror or str(exc)) from None
            raise

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    @classmethod
    def read(cls, path: str) -> KeyFile:
        """The key file at ``path``: KeyFileError (``readable`` False) if it cannot be read,
        KeyFileError if it is not a key file. Only its first ``vmrepo-key-file`` line counts;
        a file others may read is accepted (the caller may warn: :meth:`exposed`)."""
        try:
            # Non-blocking: a FIFO put there must not hang the command (nor a device lie).
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with open(fd, encoding="ascii", closefd=True) as f:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise KeyFileError(path, "cannot read it: not a regular file",
                                       readable=False)
                text = f.read(4096)
        except OSError as exc:
            raise KeyFileError(path, f"cannot read it: {exc.strerror or exc}",
                               readable=False) from None
        except UnicodeDecodeError:
            raise KeyFileError(path, "not a vmrepo key file (not text)") from None
        line = next((ln for ln in text.splitlines() if ln.startswith(KEY_FILE_MAGIC + " ")), "")
        parts = line.split()
        if len(parts) != 4:
            raise KeyFileError(path, "not a vmrepo key file (`vmrepo key add --key-file` "
                                     "writes one)")
        try:
            secret = bytes.fromhex(parts[3])
        except ValueError:
            secret = b""
        if len(secret) != 32:
            raise KeyFileError(path, "its secret is not 64 hex digits (damaged?)")
        for what, value in (("repository id", parts[1]), ("key id", parts[2])):
            if parse_hex_name(value, "", 32) is None:
                raise KeyFileError(path, f"its {what} is not 32 hex digits (damaged?)")
        return cls(parts[1], parts[2], secret, path, stat.S_IMODE(st.st_mode))

    def exposed(self) -> int | None:
        """The file's mode, as read, if users other than its owner may read or write it."""
        return self.mode if self.mode is not None and self.mode & 0o077 else None


def add_key(store: RepoStore, repository_id: str, master: MasterKey, passphrase: str,
            label: str = "") -> KeyInfo:
    """Store a new key record: ``master`` sealed under ``passphrase``."""
    if not passphrase:
        raise ValueError("an empty passphrase protects nothing")
    salt = secrets.token_bytes(16)
    kek = scrypt(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return _put_key(store, repository_id, master, kek, label,
                    {"algorithm": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
                     "salt": salt})


def inside(path: str, directory: str) -> bool:
    """Whether ``path`` lies inside ``directory``, symbolic links followed (not bind mounts
    or hard links): a key file kept inside a local repository would go with every copy of
    it, and open each."""
    root = os.path.realpath(directory)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def add_key_file(store: RepoStore, repository_id: str, master: MasterKey, path: str,
                 label: str = "") -> tuple[KeyInfo, KeyFile]:
    """Write a new key file at ``path`` (KeyFileError if it cannot be), then store the key
    record it opens: the master key sealed under its secret. Failed or interrupted, the
    file is removed unless the record is known to be stored (or its store cannot say); a
    record whose store answered too late may be left, which nothing opens and `key list`
    shows."""
    made = KeyFile.new(repository_id, path)
    made.create()
    try:
        info = _put_key(store, repository_id, master, made.secret, label,
                        {"algorithm": KDF_NONE}, key_id=made.key_id)
    except BaseException:
        stored: bool | None = None
        with contextlib.suppress(Exception):
            stored = store.exists(key_key(made.key_id))
        if stored is False:
            made.remove()
        raise
    return info, made


def _put_key(store: RepoStore, repository_id: str, master: MasterKey, kek: bytes, label: str,
             kdf: dict[str, Any], key_id: str | None = None) -> KeyInfo:
    sealed = ChaCha20Poly1305(kek).encrypt(_NONCE, master.raw(), _aad(repository_id))
    # Microseconds: keys added within one second still list in the order they were added.
    info = KeyInfo(key_id or secrets.token_hex(16),
                   datetime.now(UTC).isoformat(timespec="microseconds"),
                   socket.gethostname(), label, str(kdf["algorithm"]))
    store.put_record(RecordKind.KEY, key_key(info.id), {
        "v": KEY_VERSION, "id": info.id, "created": info.created, "host": info.host,
        "label": info.label, "kdf": kdf, "sealed": sealed})
    return info


def _aad(repository_id: str) -> bytes:
    return f"vmrepo master key {repository_id}".encode()


#: What reading a key record that is not one raises (besides ObjectNotFound).
_UNREADABLE = (IntegrityError, IncompatibleRepository, KeyError, TypeError, AttributeError)


def _info(rec: dict[str, Any]) -> KeyInfo:
    return KeyInfo(str(rec["id"]), str(rec["created"]), str(rec["host"]),
                   str(rec.get("label", "")), str(rec["kdf"].get("algorithm")))


def _records(store: RepoStore) -> list[tuple[KeyInfo, dict[str, Any]]]:
    out = []
    for obj in store.listing(KEY_PREFIX):
        try:
            rec = store.get_record(RecordKind.KEY, obj.key, KEY_VERSION)
            info = _info(rec)
        except ObjectNotFound:
            continue
        except _UNREADABLE as exc:
            why = f"its field {exc} is missing" if isinstance(exc, KeyError) else str(exc)
            store.problem(obj.key, f"damaged key record, ignored ({why})")
            continue
        out.append((info, rec))
    return out


def list_keys(store: RepoStore) -> list[KeyInfo]:
    return sorted((info for info, _ in _records(store)), key=lambda i: (_when(i.created), i.id))


def _when(created: str) -> datetime:
    """A key record's time, for ordering (records of older writers hold whole seconds)."""
    try:
        when = datetime.fromisoformat(created)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def unlock(store: RepoStore, repository_id: str, passphrase: str) -> tuple[MasterKey, KeyInfo]:
    """The master key, opened with ``passphrase`` by any key record; WrongPassphrase if none
    opens, KeyNotFound if there is no key record."""
    records = _records(store)
    if not records:
        raise IntegrityError(f"{store.backend.location} is encrypted but holds no readable key "
                             "record (keys/): it cannot be opened without the exported key "
                             "(`vmrepo key add --from-export`)", key="keys/")
    # By id (the record's name): the order in which the command line derives them ahead.
    for info, rec in sorted(records, key=lambda record: record[0].id):
        try:
            params = record_params(rec)
            if params is None:
                continue
            kek = scrypt(passphrase, *params)
            raw = ChaCha20Poly1305(kek).decrypt(_NONCE, bytes(rec["sealed"]),
                                               _aad(repository_id))
        except (InvalidTag, KeyError, TypeError, ValueError, OverflowError, AttributeError):
            continue  # a damaged or hostile record (n = inf, say) opens nothing
        stop_ahead()
        return MasterKey.from_raw(raw), info
    raise WrongPassphrase(f"wrong passphrase for {store.backend.location}: no key of this "
                          "repository opens with it")


def opened_by(store: RepoStore, repository_id: str, passphrase: str) -> KeyInfo | None:
    """The key that ``passphrase`` opens, if any (scrypt once per passphrase record)."""
    try:
        return unlock(store, repository_id, passphrase)[1]
    except (WrongPassphrase, IntegrityError):
        return None


def unlock_with_file(store: RepoStore, repository_id: str,
                     key_file: KeyFile) -> tuple[MasterKey, KeyInfo]:
    """The master key, opened by the record ``key_file`` names (one read, no scrypt);
    WrongPassphrase saying why if it does not open, IntegrityError if that record is
    damaged."""
    where = f"the key file {key_file.path}"
    if key_file.repository_id != repository_id:
        raise WrongPassphrase(f"{where} is of repository {key_file.repository_id}, not of "
                              f"{store.backend.location} ({repository_id})")
    key = key_key(key_file.key_id)
    try:
        rec = store.get_record(RecordKind.KEY, key, KEY_VERSION)
        info = _info(rec)
        sealed = bytes(rec["sealed"])
    except ObjectNotFound:
        raise WrongPassphrase(f"{where}: its key {key_file.key_id[:8]} is not in "
                              f"{store.backend.location} (removed with `vmrepo key remove`, "
                              "or never stored: `key add` interrupted)") from None
    except IncompatibleRepository:
        raise  # a newer writer's record: this vmrepo is too old for it (13), not damage
    except _UNREADABLE as exc:
        raise IntegrityError(f"the key record {key} that {where} names is damaged ({exc}); "
                             "a passphrase opens the repository by another record", key=key
                             ) from None
    if info.id != key_file.key_id:
        raise IntegrityError(f"the key record {key} that {where} names holds the id "
                             f"{info.id[:8]}: damaged or swapped", key=key)
    if info.kdf != KDF_NONE:
        raise WrongPassphrase(f"{where} names key {key_file.key_id[:8]} of "
                              f"{store.backend.location}, which is not a key file's "
                              f"(kdf {info.kdf})")
    try:
        raw = ChaCha20Poly1305(key_file.secret).decrypt(_NONCE, sealed, _aad(repository_id))
    except InvalidTag:
        raise WrongPassphrase(f"{where} does not open its key {key_file.key_id[:8]} of "
                              f"{store.backend.location} (a damaged copy of the file?)") from None
    return MasterKey.from_raw(raw), info


def remove_key(store: RepoStore, key_id: str) -> None:
    store.delete(key_key(key_id))


def find(store: RepoStore, prefix: str) -> KeyInfo:
    """The key whose id starts with ``prefix``; KeyNotFound otherwise."""
    matches = [k for k in list_keys(store) if k.id.startswith(prefix)]
    if len(matches) != 1:
        known = ", ".join(k.id[:8] for k in list_keys(store))
        raise KeyNotFound(f"{'no' if not matches else 'more than one'} key matches {prefix!r} "
                          f"(keys: {known})")
    return matches[0]
