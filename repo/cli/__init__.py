"""The ``vmrepo`` command line.

::

    app               global options, the command context, errors to exit codes, main()
    ahead             scrypt for the named repository, started before the imports
    repository_cmds   init, upgrade, snapshots, show, locks, unlock
    backup_cmds       snapshot, bitmaps
    restore_cmds      restore
    serve_cmds        serve (snapshots as NBD exports)
    insight_cmds      stats, diff, tag
    copy_cmds         copy
    retention_cmds    forget, prune
    verify_cmds       verify, repair
    key_cmds          key (list, add, remove, passwd, export)

A command's module is imported when the command runs (``app.COMMANDS``).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, NoReturn

from ..interrupts import raise_interrupt
from . import ahead


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point (``app.main``); a Ctrl-C or SIGTERM while the program still loads is the
    same one line and exit code as later, not a traceback or death by the signal. scrypt
    for the repository the command line names starts first (:mod:`.ahead`), beside the
    imports."""
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        ahead.start(sys.argv[1:] if argv is None else argv, os.environ)
        from .app import main as run
    except KeyboardInterrupt as exc:
        from ..exitcodes import INTERRUPTED

        sys.stderr.write(f"vmrepo: error: interrupted by {str(exc) or 'SIGINT'}\n")
        sys.exit(INTERRUPTED)
    run(argv)


def __getattr__(name: str) -> Any:
    if name == "cli":
        from .app import cli
        return cli
    raise AttributeError(name)


__all__ = ["cli", "main"]
