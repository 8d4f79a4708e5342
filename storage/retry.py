"""Retries of transient storage failures: bounded exponential backoff with full jitter.

:class:`RetryingBackend` wraps any backend. A call that raises
:class:`~vmrepo.storage.errors.TransientError` is repeated after a random
delay between 0 and ``min(max_delay, base_delay * 2**attempt)`` seconds, at
most ``attempts`` times in all; every other error, and the last transient
one, goes to the caller. Requests whose first attempt may have taken effect
although its answer was lost are settled carefully:

* ``create`` that finds the object on a retry compares it with what it
  meant to write: the same bytes mean our own earlier attempt succeeded;
* ``list`` restarts after a failure and skips the names already yielded;
* ``get_spans`` asks again for the spans not yet given.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import TypeVar

from .base import Backend, BackendWrapper, Buffer, ObjectInfo, Payload, Span, payload_bytes
from .errors import ObjectExists, ObjectNotFound, TransientError

log = logging.getLogger(__name__)
T = TypeVar("T")


class RetryingBackend(BackendWrapper):
    """Retry transient failures of ``inner``."""

    def __init__(self, inner: Backend, attempts: int = 8, base_delay: float = 0.1,
                 max_delay: float = 10.0, sleep: Callable[[float], None] = time.sleep,
                 rand: Callable[[], float] = random.random) -> None:
        super().__init__(inner)
        self.attempts = max(1, attempts)
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep
        self._rand = rand
        self.retries = 0
        #: Requests made to the store, by operation (every attempt counts).
        self.requests: Counter[str] = Counter()
        self._count_lock = threading.Lock()

    def _count(self, op: str) -> None:
        with self._count_lock:
            self.requests[op] += 1

    def _backoff(self, attempt: int, what: str, exc: TransientError) -> None:
        delay = self._rand() * min(self.max_delay, self.base_delay * (2 ** attempt))
        self.retries += 1
        log.info("%s failed (%s); retry %d of %d in %.2f s", what, exc, attempt + 1,
                 self.attempts - 1, delay)
        self._sleep(delay)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        op = what.split(" ", 1)[0]
        for attempt in range(self.attempts):
            self._count(op)
            try:
                return fn()
            except TransientError as exc:
                if attempt + 1 >= self.attempts:
                    raise
                self._backoff(attempt, what, exc)
        raise AssertionError("unreachable")

    def _resumed(self, op: str, what: str, rest: Callable[[], Iterator[T]]) -> Iterator[T]:
        """What ``rest()`` yields; after a transient failure ``rest()`` is called again (it
        goes on from what was already yielded) until the attempts run out."""
        for attempt in range(self.attempts):
            self._count(op)
            try:
                yield from rest()
                return
            except TransientError as exc:
                if attempt + 1 >= self.attempts:
                    raise
                self._backoff(attempt, what, exc)

    def put(self, key: str, data: Payload) -> None:
        self._call(f"put {key}", lambda: self.inner.put(key, data))

    def create(self, key: str, data: Payload) -> None:
        failed_before = False
        for attempt in range(self.attempts):
            self._count("create")
            try:
                self.inner.create(key, data)
                return
            except ObjectExists:
                if failed_before and self._holds(key, data):
                    return  # our own earlier attempt went through
                raise
            except TransientError as exc:
                if attempt + 1 >= self.attempts:
                    raise
                failed_before = True
                self._backoff(attempt, f"create {key}", exc)

    def _holds(self, key: str, data: Payload) -> bool:
        try:
            return self._call(f"get {key}", lambda: self.inner.get(key)) == payload_bytes(data)
        except ObjectNotFound:
            return False

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._call(f"get {key}", lambda: self.inner.get(key, offset, length))

    @property
    def read_window(self) -> int:  # type: ignore[override]
        return self.inner.read_window

    def get_spans(self, key: str, spans: Sequence[Span]) -> Generator[Buffer, None, None]:
        done = 0

        def rest() -> Iterator[Buffer]:
            nonlocal done
            for piece in self.inner.get_spans(key, spans[done:]):
                done += 1
                yield piece

        yield from self._resumed("get", f"get {key}", rest)

    def stat(self, key: str) -> ObjectInfo:
        return self._call(f"stat {key}", lambda: self.inner.stat(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        seen: set[str] = set()

        def rest() -> Iterator[ObjectInfo]:
            for info in self.inner.list(prefix):
                if info.key not in seen:
                    seen.add(info.key)
                    yield info

        return self._resumed("list", f"list {prefix or '/'}", rest)

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self.inner.delete(key))
