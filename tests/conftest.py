from __future__ import annotations

from pathlib import Path

import pytest
from vmrepo.config import RepoConfig
from vmrepo.repository import Repository
from vmrepo.storage.local import LocalBackend
from vmrepo.storage.memory import MemoryBackend


@pytest.fixture
def mem_repo() -> Repository:
    cfg = RepoConfig.new(chunk_size=64 << 10, pack_size=1 << 20)
    return Repository.init(MemoryBackend(), cfg)


@pytest.fixture
def local_repo(tmp_path: Path) -> Repository:
    cfg = RepoConfig.new(chunk_size=64 << 10, pack_size=1 << 20)
    return Repository.init(LocalBackend(tmp_path / "repo", create=True), cfg)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory,
                  monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own vmrepo cache (the CLI inherits it through the environment),
    and no key file from the environment it runs in."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("VMREPO_CACHE_DIR", str(path))
    monkeypatch.delenv("VMREPO_KEY_FILE", raising=False)  # a developer's own would leak in
    return path
