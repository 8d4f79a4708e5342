"""Looks up storage backends and sources through their entry-point groups."""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, Protocol

from vmrepo.sources.base import Source
from vmrepo.sources.errors import SourceConfigError
from vmrepo.storage.base import Backend
from vmrepo.storage.errors import ObjectNotFound
from vmrepo.storage.retry import RetryingBackend

from .errors import ConfigError, RepositoryNotFound
from .settings import Settings, check_keys


def _names(group: str) -> list[str]:
    return sorted(ep.name for ep in entry_points(group=group))


def open_backend(url: str, create: bool = False,
                 options: Mapping[str, Any] | None = None) -> Backend:
    """The backend for a repository URL (``/path``, ``file:///path``, ``memory://``, ...),
    wrapped so that transient failures are retried."""
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    found = entry_points(group="vmrepo.storage", name=scheme)
    if not found:
        raise ConfigError(f"no storage backend for {scheme}:// (have: "
                          f"{', '.join(_names('vmrepo.storage'))})")
    cls: type[Backend] = next(iter(found)).load()
    check_keys(options or {}, cls.option_keys, f"[storage] for {scheme}://", None)
    try:
        return RetryingBackend(cls.from_url(url, create=create, options=options))
    except ObjectNotFound:
        raise RepositoryNotFound(url) from None


class SourceFactory(Protocol):
    """What a ``vmrepo.sources`` entry point provides: its settings and a builder."""

    settings_keys: frozenset[str]

    def from_config(self, vm: str, settings: Mapping[str, Any]) -> Source: ...


def source_class(name: str) -> SourceFactory:
    found = entry_points(group="vmrepo.sources", name=name)
    if not found:
        raise SourceConfigError(f"unknown source {name!r} (have: "
                                f"{', '.join(_names('vmrepo.sources'))})")
    factory: SourceFactory = next(iter(found)).load()
    return factory


def make_source(settings: Settings, vm: str) -> Source:
    """The source of VM ``vm``, its settings checked against what its plugin takes."""
    table = settings.vm(vm)
    factory = source_class(table["source"])
    settings.check_vm(vm, factory.settings_keys)
    return factory.from_config(vm, table)
