"""Run the vmrepo command line in this process and signal it at a chosen storage call.

Usage: ``python killpoint.py OPERATION PREFIX N WHEN[:SIGNAL] -- VMREPO ARGS...``:
the process sends itself SIGNAL (SIGKILL unless named) at the N-th
``put``/``create``/``delete`` of a local repository key starting with
PREFIX, ``before`` or ``after`` the call. Crash tests use it to stop a
command exactly between two of its writes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from vmrepo.cli import main
from vmrepo.storage.local import LocalBackend


def arm(operation: str, prefix: str, nth: int, when: str,
        signum: signal.Signals = signal.SIGKILL) -> None:
    original = getattr(LocalBackend, operation)
    seen = 0
    lock = threading.Lock()

    def hooked(self: LocalBackend, key: str, *args: Any, **kw: Any) -> Any:
        nonlocal seen
        hit = key.startswith(prefix)
        with lock:  # calls come from several threads (two pack writers)
            if hit:
                seen += 1
            mine = seen if hit else 0
        if mine == nth and when == "before":
            os.kill(os.getpid(), signum)
        result = original(self, key, *args, **kw)
        if mine == nth and when == "after":
            os.kill(os.getpid(), signum)
        return result

    setattr(LocalBackend, operation, hooked)


if __name__ == "__main__":
    op, pre, n, at, sep, *rest = sys.argv[1:]
    at, _, sig = at.partition(":")
    assert sep == "--" and at in ("before", "after"), __doc__
    arm(op, pre, int(n), at, signal.Signals[sig or "SIGKILL"])
    main(rest)
