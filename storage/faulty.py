"""Fault injection: a wrapper that makes chosen backend calls fail.

``FaultyBackend(inner, {"put": "ok,ok,fail"})`` lets the first two ``put``
calls through and fails the third; a plan entry ending in ``*`` repeats its
last step (``"ok,fail*"`` fails every call after the first); with
``cycle=True`` the whole plan repeats (``"fail,ok"`` fails every other call). Only calls
whose key starts with ``key_prefix`` count. A failure raises ``error``
(default :class:`~vmrepo.storage.errors.BackendUnavailable`; pass
:class:`~vmrepo.storage.errors.TransientError` to exercise retries). Used by
tests to interrupt operations at chosen points.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from .base import Backend, BackendWrapper, ObjectInfo, Payload
from .errors import BackendUnavailable, StorageError


class FaultyBackend(BackendWrapper):
    """Wrap ``inner`` and fail the calls the plan marks ``fail``."""

    def __init__(self, inner: Backend, plan: dict[str, str], key_prefix: str = "",
                 error: type[StorageError] = BackendUnavailable, cycle: bool = False) -> None:
        super().__init__(inner)
        self.cycle = cycle
        self.key_prefix = key_prefix
        self.error = error
        self._plans = {op: self._parse(p) for op, p in plan.items()}
        self._calls: dict[str, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _parse(plan: str) -> tuple[list[bool], bool]:
        steps = [s.strip() for s in plan.split(",") if s.strip()]
        repeat = bool(steps) and steps[-1].endswith("*")
        return [s.rstrip("*") == "fail" for s in steps], repeat

    def calls(self, op: str) -> int:
        """How many calls of ``op`` (on matching keys) were made so far."""
        with self._lock:
            return self._calls.get(op, 0)

    def _check(self, op: str, key: str) -> None:
        if op not in self._plans or not key.startswith(self.key_prefix):
            return
        with self._lock:
            n = self._calls.get(op, 0)
            self._calls[op] = n + 1
        steps, repeat = self._plans[op]
        if self.cycle:
            n %= len(steps)
        if steps[n] if n < len(steps) else repeat and steps[-1]:
            raise self.error(f"injected fault: {op} {key}", key=key)

    def put(self, key: str, data: Payload) -> None:
        self._check("put", key)
        self.inner.put(key, data)

    def create(self, key: str, data: Payload) -> None:
        self._check("create", key)
        self.inner.create(key, data)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        self._check("get", key)
        return self.inner.get(key, offset, length)

    def stat(self, key: str) -> ObjectInfo:
        self._check("stat", key)
        return self.inner.stat(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._check("list", prefix)
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self._check("delete", key)
        self.inner.delete(key)
