"""The documents that claim to describe the code agree with it."""

from __future__ import annotations

import re
from pathlib import Path

from vmrepo import exitcodes
from vmrepo.pack import PACK_MAGIC, TRAILER_MAGIC

DOCS = Path(__file__).parent.parent / "docs"


def test_exit_code_table_matches_the_code() -> None:
    text = (DOCS / "exit-codes.md").read_text()
    documented = {int(m) for m in re.findall(r"^\|\s*(\d+)\s*\|", text, re.M)}
    defined = {v for k, v in vars(exitcodes).items() if k.isupper() and isinstance(v, int)}
    assert documented == defined


def test_format_spec_names_the_magic_numbers() -> None:
    text = (DOCS / "format.md").read_text()
    assert PACK_MAGIC.decode() in text and TRAILER_MAGIC.decode() in text
