"""Sizes for people: ``256K``, ``4M``, ``1GiB`` in, ``1.50 GiB`` out.

Shared by the sources (settings such as ``fleece_reserve``) and the core
(command-line options, reports); it imports nothing.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(i?b?)?", re.IGNORECASE)
_MULT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """``256K``, ``4M``, ``1GiB``, ``65536`` -> bytes (binary multiples); ValueError else."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.fullmatch(str(text).strip())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * _MULT[m.group(2).lower()]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")

