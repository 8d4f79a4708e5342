"""A repository: a backend plus its config, index and blob access."""

from __future__ import annotations

from vmrepo.storage.base import Backend
from vmrepo.storage.errors import ObjectNotFound

from .config import RepoConfig
from .errors import IntegrityError, RepositoryExists, RepositoryNotFound
from .format import CONFIG_KEY, ZERO_ID, BlobCodec, Hasher, pack_key
from .index import Index
from .manifest import Manifest, split_page
from .packer import Packer
from .snapshots import Snapshot, load_snapshots


class Repository:
    """An opened repository. Blob reads verify each blob against its id."""

    def __init__(self, backend: Backend, config: RepoConfig) -> None:
        self.backend = backend
        self.config = config
        self.hasher = Hasher(config.hash_key)
        self.codec = BlobCodec(config.compression_level)
        self.index = Index()
        self._zero_chunk = bytes(config.chunk_size)

    @classmethod
    def init(cls, backend: Backend, config: RepoConfig) -> Repository:
        """Write ``config`` to an empty location; refuse an existing repository."""
        if backend.exists(CONFIG_KEY):
            raise RepositoryExists(backend.location)
        backend.put(CONFIG_KEY, config.encode())
        return cls(backend, config)

    @classmethod
    def open(cls, backend: Backend, load_index: bool = True) -> Repository:
        try:
            raw = backend.get(CONFIG_KEY)
        except ObjectNotFound:
            raise RepositoryNotFound(backend.location) from None
        repo = cls(backend, RepoConfig.decode(raw))
        if load_index:
            repo.index.load(backend, repo.hasher)
        return repo

    def packer(self) -> Packer:
        return Packer(self.backend, self.index, self.hasher, self.codec, self.config.pack_size)

    def zero_chunk(self, length: int) -> bytes:
        return self._zero_chunk[:length] if length != self.config.chunk_size else self._zero_chunk

    def read_blob(self, blob_id: bytes) -> bytes:
        """Return a blob's plaintext; IntegrityError if missing or corrupt.

        Blobs are addressed by content alone: a page whose bytes equal a chunk's
        is the same blob, so the type recorded in the index is informational.
        """
        loc = self.index.get(blob_id)
        what = f"blob {blob_id.hex()[:16]}"
        if loc is None:
            raise IntegrityError(f"{what} is referenced but not in the index", key=what)
        key = pack_key(loc.pack_id)
        try:
            stored = self.backend.get(key, loc.offset, loc.length)
        except ObjectNotFound:
            raise IntegrityError(f"{what}: pack {key} is missing", key=key) from None
        data = self.codec.decode(stored, loc.raw_length, what)
        if self.hasher.id(data) != blob_id:
            raise IntegrityError(f"{what} in {key} does not match its id", key=key)
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
        m = Manifest.decode(self.read_blob(root_id), f"root {root_id.hex()[:16]}")
        if m.chunk_size != self.config.chunk_size:
            raise IntegrityError(f"root {root_id.hex()[:16]}: chunk size differs from config")
        return m

    def page(self, manifest: Manifest, page_no: int) -> bytes:
        pid = manifest.page_ids[page_no]
        data = self.read_blob(pid)
        split_page(data, manifest.page_span(page_no)[1], f"page {pid.hex()[:16]}")
        return data

    def snapshots(self, vm: str | None = None) -> list[Snapshot]:
        snaps = load_snapshots(self.backend)
        return [s for s in snaps if vm is None or s.vm == vm]
