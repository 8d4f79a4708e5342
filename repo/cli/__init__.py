"""The ``vmrepo`` command line.

::

    app               global options, the command context, errors to exit codes, main()
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

from .app import cli, main

__all__ = ["cli", "main"]
