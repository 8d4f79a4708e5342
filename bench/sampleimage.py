"""The benchmark image: a third random data, a third text-like data, a third holes."""

from __future__ import annotations

import random
from pathlib import Path

TEXT = bytes(b" etaoinshrdlucmfwypvbgkqjxz\n"[i % 28] for i in range(256))
STEP = 64 << 20


def sample_data(rnd: random.Random, size: int, text: bool) -> bytes:
    """``size`` bytes of the image's data: random, or text-like (random over 28 symbols)."""
    data = rnd.randbytes(size)
    return data.translate(TEXT) if text else data


def make_image(path: Path, size: int, rnd: random.Random) -> None:
    """Write the image sparse: data in the first two thirds, the last third a hole."""
    third = size // 3 // STEP * STEP
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(third // STEP):
            f.write(sample_data(rnd, STEP, False))
        for _ in range(third // STEP):
            f.write(sample_data(rnd, STEP, True))
