"""A progress bar on a terminal, nothing when piped or printing JSON."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .units import human_bytes


@contextmanager
def progress_bar(total: int, label: str, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """Yield an ``advance(n_bytes)`` callback, or None when no bar is shown."""
    if not enabled or not sys.stderr.isatty() or total <= 0:
        yield None
        return
    done = 0
    last = 0.0
    start = time.monotonic()

    def draw(final: bool = False) -> None:
        frac = min(1.0, done / total)
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = done / max(time.monotonic() - start, 1e-6)
        sys.stderr.write(f"\r{label} [{bar}] {frac:6.1%} {human_bytes(rate)}/s ")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def advance(n: int) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last > 0.1:
            last = now
            draw()

    try:
        yield advance
    finally:
        draw(final=True)
