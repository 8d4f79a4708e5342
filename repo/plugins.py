"""Looks up storage backends and sources: the built-in ones, then entry-point groups."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol

from vmrepo.sources.base import Source
from vmrepo.sources.errors import SourceConfigError
from vmrepo.storage.base import Backend
from vmrepo.storage.errors import InvalidSetting, ObjectNotFound
from vmrepo.storage.retry import RetryingBackend

from .errors import ConfigError, RepositoryNotFound
from .settings import Settings, check_keys

#: The plugins vmrepo ships, as declared among the entry points in pyproject.toml (where
#: other packages declare theirs): loaded without scanning every installed package's
#: metadata, which costs each command some 40 ms.
BUILTIN: dict[str, dict[str, str]] = {
    "vmrepo.storage": {"file": "vmrepo.storage.local:LocalBackend",
                       "memory": "vmrepo.storage.memory:MemoryBackend",
                       "s3": "vmrepo.storage.s3:S3Backend"},
    "vmrepo.sources": {"file": "vmrepo.sources.file:FileSource",
                       "qmp": "vmrepo.sources.push:QmpSource",
                       "nbd": "vmrepo.sources.pull:NbdSource",
                       "libvirt": "vmrepo.sources.libvirt:LibvirtSource"},
}


def _names(group: str) -> list[str]:
    from importlib.metadata import entry_points
    return sorted({*BUILTIN[group], *(ep.name for ep in entry_points(group=group))})


def _plugin(group: str, name: str) -> Any:
    """The object a plugin ``name`` of ``group`` names (built in, else an installed entry
    point); None if there is none."""
    target = BUILTIN[group].get(name)
    if target is not None:
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)
    from importlib.metadata import entry_points
    found = entry_points(group=group, name=name)
    return next(iter(found)).load() if found else None


#: Storage settings the core takes itself: how transient failures are retried.
RETRY_KEYS = frozenset({"retries", "retry_max_delay"})


def open_backend(url: str, create: bool = False,
                 options: Mapping[str, Any] | None = None, table: str = "[storage]"
                 ) -> Backend:
    """The backend for a repository URL (``/path``, ``file:///path``, ``s3://...``,
    ``memory://``), wrapped so that transient failures are retried (``retries`` attempts
    in all, default 8, backing off up to ``retry_max_delay`` seconds, default 10).
    ``table`` names where ``options`` come from, for messages."""
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    cls: type[Backend] | None = _plugin("vmrepo.storage", scheme)
    if cls is None:
        raise ConfigError(f"no storage backend for {scheme}:// (have: "
                          f"{', '.join(_names('vmrepo.storage'))})")
    options = dict(options or {})
    check_keys(options, cls.option_keys | RETRY_KEYS, f"{table} for {scheme}://", None)
    retry = {k: options.pop(k) for k in RETRY_KEYS if k in options}
    try:
        attempts = int(retry.get("retries", 8))
        max_delay = float(retry.get("retry_max_delay", 10.0))
        if attempts < 1 or max_delay < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{table}: retries must be a positive number of attempts and "
                          "retry_max_delay a number of seconds") from None
    try:
        return RetryingBackend(cls.from_url(url, create=create, options=options),
                               attempts=attempts, max_delay=max_delay)
    except ObjectNotFound:
        raise RepositoryNotFound(url) from None
    except InvalidSetting as exc:
        raise InvalidSetting(f"{table} {exc}", exc.setting) from None


class SourceFactory(Protocol):
    """What a ``vmrepo.sources`` entry point provides: its settings and a builder."""

    settings_keys: frozenset[str]

    def from_config(self, vm: str, settings: Mapping[str, Any]) -> Source: ...


def source_class(name: str) -> SourceFactory:
    factory: SourceFactory | None = _plugin("vmrepo.sources", name)
    if factory is None:
        raise SourceConfigError(f"unknown source {name!r} (have: "
                                f"{', '.join(_names('vmrepo.sources'))})")
    return factory


def make_source(settings: Settings, vm: str) -> Source:
    """The source of VM ``vm``, its settings checked against what its plugin takes."""
    table = settings.vm(vm)
    factory = source_class(table["source"])
    settings.check_vm(vm, factory.settings_keys)
    return factory.from_config(vm, table)
