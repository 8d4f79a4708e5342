"""A repository: its config, its store (the one door to the backend), its index and blob reads."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from vmrepo.storage.base import Backend
from vmrepo.storage.errors import ObjectNotFound, StorageError

from . import damage, keys, marks
from .cache import Cache
from .codec import Codec
from .config import RepoConfig
from .crypto import Cipher
from .errors import (
    IncompatibleRepository,
    IntegrityError,
    NoPassphrase,
    RepositoryExists,
    RepositoryNotFound,
    SnapshotNotFound,
)
from .format import (
    CONFIG_KEY,
    FORMAT_VERSION,
    PACK_PREFIX,
    SNAPSHOT_PREFIX,
    ZERO_ID,
    Hasher,
    pack_key,
    parse_pack_key,
)
from .immutability import apply_object_lock
from .index import Index
from .keys import MasterKey
from .manifest import Manifest, split_page
from .session import WriteSession
from .snapshots import Snapshot, load_snapshots
from .spec import parse_spec, resolve
from .store import Reporter, RepoStore, log_problem

log = logging.getLogger(__name__)


class Repository:
    """An opened repository. Blob reads verify each blob against its id."""

    def __init__(self, backend: Backend, config: RepoConfig, cache: Cache | None = None,
                 report: Reporter = log_problem, master: MasterKey | None = None) -> None:
        if config.encrypted and master is None:
            raise NoPassphrase(f"{backend.location} is encrypted: its key is needed")
        self.config = config
        #: The master key of an encrypted repository (None: not encrypted).
        self.master = master if config.encrypted else None
        #: The key record that opened it (with a passphrase).
        self.key_used: keys.KeyInfo | None = None
        self.hasher = Hasher(self.master.ids if self.master else config.hash_key)
        cipher = Cipher(config.encryption, self.master.encryption) if self.master else None
        self.codec = Codec(config.codec_level, cipher, config.repository_id,
                           config.chunk_size)
        self.cache = cache if cache is not None else Cache.open(config.repository_id)
        self.store = RepoStore(backend, self.codec, self.hasher, self.cache, report)
        #: The store's object lock, in a repository that requires one.
        self.object_lock = apply_object_lock(backend, config)
        self._index: Index | None = None
        self._packs: dict[bytes, int] | None = None
        #: Packs a prune condemned (read by :meth:`only_usable_packs`).
        self.condemned: frozenset[bytes] = frozenset()
        self._zero_chunk = bytes(config.chunk_size)

    @property
    def backend(self) -> Backend:
        return self.store.backend

    @classmethod
    def init(cls, backend: Backend, config: RepoConfig, passphrase: str | None = None,
             master: MasterKey | None = None, **kw: Any) -> Repository:
        """Write ``config`` to an empty location; refuse an existing repository and a
        location that holds anything else. An encrypted repository gets ``master`` (or a
        new master key) sealed under ``passphrase``."""
        if config.encrypted and not passphrase:
            raise NoPassphrase("an encrypted repository needs a passphrase")
        if backend.exists(CONFIG_KEY):
            raise RepositoryExists(backend.location)
        present = []
        for info in backend.list(""):
            present.append(info.key)
            if len(present) == 3:
                break
        if present:
            raise RepositoryExists(backend.location, not_empty=present)
        apply_object_lock(backend, config, enable=True)
        try:
            backend.create(CONFIG_KEY, config.encode())
        except StorageError as exc:
            if backend.exists(CONFIG_KEY):
                raise RepositoryExists(backend.location) from None
            raise exc
        if config.encrypted:
            assert passphrase is not None
            master = master or MasterKey.new()
            repo = cls(backend, config, master=master, **kw)
            keys.add_key(repo.store, config.repository_id, master, passphrase, "init")
            return repo
        return cls(backend, config, **kw)

    @classmethod
    def open(cls, backend: Backend,
             passphrase: Callable[[str], str | keys.KeyFile] | None = None,
             **kw: Any) -> Repository:
        """Open the repository at ``backend``; an encrypted one is unlocked with the
        passphrase or key file ``passphrase(repository_id)`` gives (asked only then)."""
        try:
            raw = backend.get(CONFIG_KEY)
        except ObjectNotFound:
            raise RepositoryNotFound(backend.location) from None
        config = RepoConfig.decode(raw)
        if config.encrypted and "master" not in kw:
            if passphrase is None:
                raise NoPassphrase(f"{backend.location} is encrypted: a passphrase is needed "
                                   "(VMREPO_PASSWORD_FILE, VMREPO_PASSWORD_COMMAND or a "
                                   "terminal)")
            plain = RepoStore(backend, Codec(), Hasher(bytes(32)), None)
            secret = passphrase(config.repository_id)
            kw["master"], used = (
                keys.unlock_with_file(plain, config.repository_id, secret)
                if isinstance(secret, keys.KeyFile)
                else keys.unlock(plain, config.repository_id, secret))
            repo = cls(backend, config, **kw)
            repo.key_used = used
        else:
            repo = cls(backend, config, **kw)
        log.info("repository %s at %s (format %d)", repo.config.repository_id,
                 backend.location, repo.config.version)
        return repo

    def require_current_format(self, what: str) -> None:
        """Refuse to write into an older format (older readers must keep working on it)."""
        if self.config.version < FORMAT_VERSION:
            raise IncompatibleRepository(
                f"{what} needs repository format {FORMAT_VERSION}; this repository is format "
                f"{self.config.version}: run `vmrepo upgrade` (in place, keeps every snapshot)",
                version=self.config.version)

    def upgrade(self) -> bool:
        """Rewrite the config at the current format version; False if it was current."""
        if self.config.version >= FORMAT_VERSION:
            return False
        self.config = self.config.upgraded()
        self.store.put(CONFIG_KEY, self.config.encode())
        return True

    # -- index ---------------------------------------------------------------

    @property
    def index(self) -> Index:
        """The index, brought up to date with the repository on first use."""
        if self._index is None:
            index = Index(self.cache.index_dir)
            index.sync(self.store)
            self._index = index
        return self._index

    def existing_packs(self) -> dict[bytes, int]:
        """Every pack in the store with its size (one listing, kept for this process)."""
        if self._packs is None:
            packs = {}
            for info in self.store.listing(PACK_PREFIX, lambda k: parse_pack_key(k) is not None):
                pid = parse_pack_key(info.key)
                assert pid is not None
                packs[pid] = info.size
            self._packs = packs
        return self._packs

    def note_pack(self, pack_id: bytes, size: int) -> None:
        """A pack this process has just stored (keeps the pack listing current)."""
        if self._packs is not None:
            self._packs[pack_id] = size

    def forget_pack_listing(self) -> None:
        """List the packs again on next use (another process may have added or deleted some)."""
        self._packs = None

    def only_usable_packs(self) -> None:
        """Let lookups skip entries in packs that are missing, that a prune condemned or that
        verify found damaged (and blob copies verify found damaged): a snapshot must build
        neither on missing or damaged data nor on data about to be deleted, and its new packs
        must not take a condemned pack's id. Call it after taking the lock: a
        prune lists the locks after writing its mark (docs/format.md §13). Costs a listing
        of the packs and of the marks. Packs named by segments that appear later (other
        writers') are accepted: a segment is written after its packs."""
        # Marks first, then the packs: a mark is deleted only after its packs, so packs seen
        # without their mark are seen gone.
        self.condemned = frozenset(marks.condemned(marks.load_marks(self.store, writer=True)))
        bad = damage.load(self.store)
        self.forget_pack_listing()
        existing = self.existing_packs()
        missing = {pid for pid in self.index.packs() if pid not in existing}
        if missing:
            log.info("%d packs the index names are missing: their blobs will be stored again",
                     len(missing))
        if self.condemned:
            log.info("%d packs are condemned by a prune: their blobs will be stored again if "
                     "needed", len(self.condemned))
        if bad:
            log.info("verify found %d packs and %d blob copies damaged: what they hold will be "
                     "stored again if needed", len(bad.packs), len(bad.copies))
        unusable = missing | self.condemned | bad.packs
        self.index.set_pack_filter(lambda pid: pid not in unusable, frozenset(bad.copies))

    def session(self, check: Callable[[], None] | None = None, **kw: Any) -> WriteSession:
        self.require_current_format("writing")
        return WriteSession(self, check=check, **kw)

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None
        self.backend.close()

    # -- blobs ---------------------------------------------------------------

    def zero_chunk(self, length: int) -> bytes:
        return self._zero_chunk[:length] if length != self.config.chunk_size else self._zero_chunk

    def read_blob(self, blob_id: bytes, cache: bool = False) -> bytes:
        """A blob's plaintext, from any copy that passes its checks; IntegrityError naming
        the blob and every copy's problem otherwise. ``cache`` keeps small immutable blobs
        (manifest pages and roots) in the local cache of a remote repository."""
        objects = self.store.objects if cache else None
        ckey = f"blobs/{blob_id.hex()}"
        what = f"blob {blob_id.hex()[:16]}"
        if objects is not None:
            cached = objects.get(ckey)
            if cached is not None and len(cached) > 4:
                try:
                    return self.check_blob(blob_id, cached[4:],
                                           int.from_bytes(cached[:4], "little"), what)
                except IntegrityError:
                    objects.discard(ckey)
        locations = self.index.locations(blob_id)
        if not locations:
            raise IntegrityError(f"{what} is referenced but not in the index", key=what)
        errors = []
        for loc in locations:
            key = pack_key(loc.pack_id)
            try:
                stored = self.store.get_range(key, loc.offset, loc.length)
                data = self.check_blob(blob_id, stored, loc.raw_length, f"{what} in {key}")
            except ObjectNotFound:
                errors.append(f"pack {key} is missing")
                continue
            except IntegrityError as exc:
                errors.append(str(exc))
                continue
            except StorageError as exc:
                errors.append(f"{key}: {exc}")
                continue
            if objects is not None:
                objects.put(ckey, loc.raw_length.to_bytes(4, "little") + stored)
            return data
        raise IntegrityError(f"{what}: no readable copy ({'; '.join(errors)})", key=what)

    def check_blob(self, blob_id: bytes, stored: bytes | bytearray | memoryview, raw_length: int,
                   what: str) -> bytes:
        """Decode a stored blob and check it against its id."""
        data = self.codec.decode_blob(blob_id, stored, raw_length, what)
        if self.hasher.id(data) != blob_id:
            raise IntegrityError(f"{what} does not match its id", key=what)
        return data

    def read_chunk(self, chunk_id: bytes, length: int) -> bytes:
        """A chunk's bytes; zeros for the zero id."""
        if chunk_id == ZERO_ID:
            return self.zero_chunk(length)
        data = self.read_blob(chunk_id)
        if len(data) != length:
            raise IntegrityError(f"chunk {chunk_id.hex()[:16]} is {len(data)} bytes, "
                                 f"expected {length}")
        return data

    def manifest(self, root_id: bytes) -> Manifest:
        m = Manifest.decode(self.read_blob(root_id, cache=True), f"root {root_id.hex()[:16]}")
        if m.chunk_size != self.config.chunk_size:
            raise IntegrityError(f"root {root_id.hex()[:16]}: chunk size differs from config")
        return m

    def page(self, manifest: Manifest, page_no: int) -> bytes:
        pid = manifest.page_ids[page_no]
        data = self.read_blob(pid, cache=True)
        split_page(data, manifest.page_span(page_no)[1], f"page {pid.hex()[:16]}")
        return data

    # -- snapshots -----------------------------------------------------------

    def snapshots(self, vm: str | None = None) -> list[Snapshot]:
        """Committed snapshots (of one VM), oldest first; damaged records are reported and
        left out."""
        snaps = load_snapshots(self.store)
        return [s for s in snaps if vm is None or s.vm == vm]

    def find_snapshot(self, text: str, snaps: Sequence[Snapshot] | None = None) -> Snapshot:
        """The snapshot ``VM@WHEN`` names among ``snaps`` (default: every readable one). An
        id prefix that only a damaged record has is an IntegrityError naming that record,
        not a snapshot that does not exist."""
        spec = parse_spec(text)
        if snaps is None:
            snaps = self.snapshots()
        try:
            return resolve(spec, snaps)
        except SnapshotNotFound:
            if spec.kind == "id":
                for p in self.store.problems:
                    if p.kind == "damaged" and p.key.startswith(SNAPSHOT_PREFIX + spec.when):
                        raise IntegrityError(f"{p.key}, the record of {text}, is damaged "
                                             f"({p.message}): `vmrepo repair snapshots` sets "
                                             "it aside, a copy may still hold it",
                                             key=p.key) from None
            raise

