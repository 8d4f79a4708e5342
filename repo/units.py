"""Sizes and ratios for people (the size helpers are shared with the sources)."""

from __future__ import annotations

from vmrepo.sources.units import human_bytes, parse_size


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, in the plural unless ``n`` is 1 (nouns whose plural adds "s")."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "inf"


__all__ = ["counted", "human_bytes", "parse_size", "ratio"]
