"""Logging for the command line: ``-v`` (info), ``-vv`` or ``VMREPO_LOG=debug`` (debug).

vmrepo's modules log through :mod:`logging` under the ``vmrepo`` logger;
every exception they deliberately suppress leaves a debug line. Without
``-v`` only warnings are shown, as ``vmrepo: warning: ...`` lines.
The helper :func:`ignored` (shared with the sources) suppresses an expected
error and leaves that debug line.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

from vmrepo.sources.errors import ignored

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and record.levelno <= logging.DEBUG:
            msg += "\n" + self.formatException(record.exc_info)
        where = f" [{record.name}]" if record.levelno <= logging.DEBUG else ""
        return f"vmrepo: {record.levelname.lower()}{where}: {msg}"


def level_for(verbose: int, env: Mapping[str, str] = os.environ) -> int:
    """The level ``-v`` (repeated ``verbose`` times) or ``$VMREPO_LOG`` asks for."""
    named = LEVELS.get(env.get("VMREPO_LOG", "").strip().lower())
    by_flag = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 \
        else logging.DEBUG
    return min(by_flag, named) if named is not None else by_flag


def setup(verbose: int, env: Mapping[str, str] = os.environ) -> None:
    """Send vmrepo's log records to stderr at the level asked for."""
    logger = logging.getLogger("vmrepo")
    level = level_for(verbose, env)
    logger.setLevel(level)
    if not any(getattr(h, "_vmrepo", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Format())
        handler._vmrepo = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


__all__ = ["LEVELS", "ignored", "level_for", "setup"]
