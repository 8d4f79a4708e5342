"""Sizes and ratios for people (the size helpers are shared with the sources)."""

from __future__ import annotations

from vmrepo.sources.units import human_bytes, parse_size


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "inf"


__all__ = ["human_bytes", "parse_size", "ratio"]
