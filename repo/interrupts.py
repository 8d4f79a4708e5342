"""Holding SIGINT and SIGTERM back while a step must not be cut in two.

The command line turns both signals into :class:`KeyboardInterrupt`. Some
steps must run to their end once begun: a snapshot whose record is written
must also let QEMU finish its jobs and keep its new bitmaps, or the VM is
left with jobs and filter nodes that block other writers. :func:`held` notes
a signal that comes during such a step instead of raising it, and tells the
caller which one came; a second signal is raised at once (the operator
insists).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def held() -> Iterator[list[str]]:
    """Within the block, SIGINT and SIGTERM are noted, not raised; the list given to the
    block then holds their names. Outside the main thread (where Python delivers no
    signal) it holds nothing back."""
    came: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return

    def note(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if came:  # asked twice: the operator insists
            raise KeyboardInterrupt(name)
        came.append(name)

    previous = {s: signal.signal(s, note) for s in SIGNALS}
    try:
        yield came
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
