"""Progress of long work on a terminal: bytes done of bytes to do, data rate, time left.

Only data counts: holes and zero chunks are not read, so they count neither
as work done nor in the rate. Nothing is shown when stderr is not a
terminal, with ``--json`` or with ``--no-progress``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .units import human_bytes

Advance = Callable[[int], None]


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60}:{s % 60:02d}"


def line(label: str, done: int, total: int, elapsed: float) -> str:
    """One progress line: ``label  done / total  pct  rate  ETA``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [label, f"{human_bytes(done)} / {human_bytes(total)}"]
    if total > 0:
        parts.append(f"{min(1.0, done / total):6.1%}")
    parts.append(f"{human_bytes(rate)}/s")
    if rate > 0 and total > done:
        parts.append(f"ETA {_clock((total - done) / rate)}")
    return "  ".join(parts)


@contextmanager
def progress_bar(total: int, label: str, enabled: bool) -> Iterator[Advance | None]:
    """Yield an ``advance(n_bytes)`` callback (thread-safe), or None when nothing is shown."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    done = 0
    last = 0.0
    start = time.monotonic()
    lock = threading.Lock()

    def draw(final: bool = False) -> None:
        text = line(label, done, total, time.monotonic() - start)
        sys.stderr.write("\r" + text.ljust(78) + ("\n" if final else ""))
        sys.stderr.flush()

    def advance(n: int) -> None:
        nonlocal done, last
        with lock:
            done += n
            now = time.monotonic()
            if now - last > 0.2:
                last = now
                draw()

    try:
        yield advance
    finally:
        draw(final=True)
