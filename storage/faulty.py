"""Fault injection: a wrapper that makes chosen backend calls fail.

``FaultyBackend(inner, {"put": "ok,ok,fail"})`` lets the first two ``put``
calls through and fails the third; a plan entry ending in ``*`` repeats its
last step (``"ok,fail*"`` fails every call after the first). Only calls
whose key starts with ``key_prefix`` count. Used by tests to interrupt
operations at chosen points.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from .base import Backend, Payload
from .errors import BackendUnavailable


class FaultyBackend(Backend):
    """Wrap ``inner`` and fail the calls the plan marks ``fail``."""

    def __init__(self, inner: Backend, plan: dict[str, str], key_prefix: str = "") -> None:
        self.inner = inner
        self.location = inner.location
        self.key_prefix = key_prefix
        self._plans = {op: self._parse(p) for op, p in plan.items()}
        self._calls: dict[str, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _parse(plan: str) -> tuple[list[bool], bool]:
        steps = [s.strip() for s in plan.split(",") if s.strip()]
        repeat = bool(steps) and steps[-1].endswith("*")
        return [s.rstrip("*") == "fail" for s in steps], repeat

    def _check(self, op: str, key: str) -> None:
        if op not in self._plans or not key.startswith(self.key_prefix):
            return
        with self._lock:
            n = self._calls.get(op, 0)
            self._calls[op] = n + 1
        steps, repeat = self._plans[op]
        if steps[n] if n < len(steps) else repeat and steps[-1]:
            raise BackendUnavailable(f"injected fault: {op} {key}", key=key)

    def put(self, key: str, data: Payload) -> None:
        self._check("put", key)
        self.inner.put(key, data)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        self._check("get", key)
        return self.inner.get(key, offset, length)

    def size(self, key: str) -> int:
        self._check("size", key)
        return self.inner.size(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        self._check("list", prefix)
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self._check("delete", key)
        self.inner.delete(key)
