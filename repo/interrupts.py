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
from typing import NoReturn

SIGNALS = (signal.SIGINT, signal.SIGTERM)


Handlers = dict[int, object]


def _note_into(came: list[str]) -> Handlers:
    """Make SIGINT and SIGTERM append their names to ``came`` (the second one raises);
    return the handlers they had."""

    def note(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if came:  # asked twice: the operator insists
            raise KeyboardInterrupt(name)
        came.append(name)

    return {s: signal.signal(s, note) for s in SIGNALS}


def _restore(previous: Handlers) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)  # type: ignore[arg-type]


def raise_interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    """A signal handler: SIGTERM (or another) stops a command as Ctrl-C does."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def held() -> Iterator[list[str]]:
    """Within the block, SIGINT and SIGTERM are noted, not raised; the list given to the
    block then holds their names. Outside the main thread (where Python delivers no
    signal) it holds nothing back."""
    came: list[str] = []
    if not _main_thread():
        yield came
        return
    previous = _note_into(came)
    try:
        yield came
    finally:
        _restore(previous)


_holding: tuple[list[str], Handlers] | None = None


def came_while_committing(name: str) -> str:
    """What to say of a signal held back while a snapshot was being committed."""
    return f"{name} came while the snapshot was being committed: it was completed"


def hold() -> None:
    """Hold SIGINT and SIGTERM back from now until :func:`release` (the command line: once
    a snapshot is committed, its end, lock release and report included, must not be cut
    short). Blocks of :func:`held` inside note their own signals."""
    global _holding
    if _holding is None and _main_thread():
        came: list[str] = []
        _holding = (came, _note_into(came))


def release() -> list[str]:
    """Stop holding; the names of the signals held back since :func:`hold`."""
    global _holding
    if _holding is None:
        return []
    came, previous = _holding
    _holding = None
    _restore(previous)
    return came
