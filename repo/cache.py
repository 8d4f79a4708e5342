"""The local cache of a repository: immutable objects and the on-disk index.

One directory per repository id under ``$VMREPO_CACHE_DIR``, else
``$XDG_CACHE_HOME/vmrepo``, else ``~/.cache/vmrepo``. Where none of these
can be created (a user without a home, a read-only file system), a private
temporary directory is used and removed at exit.

Objects are cached as they are stored in the repository (so an encrypted
repository's cache holds no plaintext), each with a *tag*: the listing's
etag for objects that may be replaced (snapshot records, whose tags can be
edited), empty for content-addressed ones. A cached object is used only
when its tag matches. Deleting the cache loses nothing: it is rebuilt from
the repository.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)


def cache_base(env: Mapping[str, str] = os.environ) -> Path:
    """Where caches go, before falling back to a temporary directory."""
    if env.get("VMREPO_CACHE_DIR"):
        return Path(env["VMREPO_CACHE_DIR"])
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]) / "vmrepo"
    return Path(os.path.expanduser("~")) / ".cache" / "vmrepo"


def _usable(path: Path) -> bool:
    try:
        # The base directory too is private (mkdir's parents get the umask's mode); one
        # that exists is left as its owner made it.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        probe = path / f".probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        log.debug("cache directory %s is not usable: %s", path, exc)
        return False
    return True


_fallback: Path | None = None


def _temporary_base() -> Path:
    global _fallback
    if _fallback is None:
        _fallback = Path(tempfile.mkdtemp(prefix="vmrepo-cache-"))
        atexit.register(shutil.rmtree, _fallback, True)
        log.info("no usable cache directory; using %s for this run", _fallback)
    return _fallback


class ObjectCache:
    """Objects kept as files under ``root``, each with the tag it was cached under."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str, tag: str = "") -> bytes | None:
        try:
            raw = self._path(key).read_bytes()
        except OSError:
            self.misses += 1
            return None
        n = raw[0] if raw else 0
        if len(raw) < 1 + n or raw[1 : 1 + n] != tag.encode():
            self.misses += 1
            return None
        self.hits += 1
        return raw[1 + n :]

    def put(self, key: str, data: bytes, tag: str = "") -> None:
        path = self._path(key)
        raw_tag = tag.encode()[:255]
        tmp = path.with_name(f".tmp-{path.name}.{secrets.token_hex(4)}")
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(bytes([len(raw_tag)]) + raw_tag)
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("cannot cache %s: %s", key, exc)
            try:
                tmp.unlink()
            except OSError as again:
                log.debug("cannot remove %s: %s", tmp, again)

    def discard(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except OSError as exc:
            log.debug("cannot drop cached %s: %s", key, exc)

    def retain(self, prefix: str, keep: Iterable[str]) -> int:
        """Drop cached objects under ``prefix`` whose key is not in ``keep``; return how many."""
        wanted = set(keep)
        top = self.root / prefix
        dropped = 0
        if not top.is_dir():
            return 0
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                key = os.path.relpath(os.path.join(dirpath, name), self.root)
                if key not in wanted:
                    self.discard(key)
                    dropped += 1
        return dropped


class Cache:
    """The cache directory of one repository."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = ObjectCache(root / "objects")
        self.index_dir = root / "index"
        self.index_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    @classmethod
    def open(cls, repository_id: str, env: Mapping[str, str] = os.environ) -> Cache:
        base = cache_base(env)
        if not _usable(base / repository_id):
            base = _temporary_base()
        return cls(base / repository_id)
