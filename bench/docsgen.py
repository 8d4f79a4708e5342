"""What the benchmarks write into docs/benchmarks.md: the machine, the command, and a section
between markers that a later run replaces, leaving the rest of the document as it is."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
DEFAULT_DOCS = TOP / "docs" / "benchmarks.md"


def _first_line(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def tool_versions() -> dict[str, str]:
    """The versions of QEMU, borg and restic found on this machine (those installed)."""
    found = {}
    for name, cmd, pattern in (
            ("QEMU", ["qemu-system-x86_64", "--version"], r"version (\S+)"),
            ("borg", ["borg", "--version"], r"borg (\S+)"),
            ("restic", ["restic", "version"], r"restic (\S+)")):
        line = _first_line(cmd)
        m = re.search(pattern, line or "")
        if m:
            found[name] = m.group(1)
    return found


def machine() -> str:
    """One line naming the CPU, cores, memory, kernel and tool versions."""
    cpu = "unknown CPU"
    mem = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = " ".join(line.split(":", 1)[1].split())
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    tools = ", ".join(f"{k} {v}" for k, v in tool_versions().items())
    return (f"{cpu}, {os.cpu_count()} cores, {mem / (1 << 30):.1f} GiB RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}"
            + (f"; {tools}" if tools else ""))


def today() -> str:
    return datetime.date.today().isoformat()


def command(script: str) -> str:
    """The command that ran this benchmark, as one would type it from the project's top."""
    return shlex.join(["python", f"bench/{script}", *sys.argv[1:]])


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}: begin -->", f"<!-- {name}: end -->"


def write_section(path: Path, name: str, body: str, *, replaces: str | None = None,
                  after: str | None = None, after_heading: str | None = None) -> None:
    """Put ``body`` between the markers of ``name`` in the document at ``path``.

    The first time (no markers yet), the markers go around the section headed
    ``replaces`` (a ``## `` heading, up to the next heading or marker), whose
    text ``body`` replaces; without that heading, after the end marker of the
    section ``after``, else after the section headed ``after_heading``, else at
    the end. The rest of the document stays as it is.
    """
    begin, end = markers(name)
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body.strip()}\n{end}\n"
    lines = text.splitlines(keepends=True)

    def section(heading: str | None) -> tuple[int, int] | None:
        start = next((i for i, line in enumerate(lines)
                      if heading and line.rstrip() == f"## {heading}"), None)
        if start is None:
            return None
        stop = next((i for i in range(start + 1, len(lines))
                     if lines[i].startswith(("## ", "<!-- "))), len(lines))
        return start, stop

    def splice(head: str, tail: str) -> str:
        head = head.rstrip("\n") + "\n\n" if head.strip() else ""
        tail = tail.lstrip("\n")
        return head + block + ("\n" + tail if tail else "")

    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + ("\n" + tail.lstrip("\n") if tail.strip() else "")
    elif (at := section(replaces)) is not None:
        text = splice("".join(lines[:at[0]]), "".join(lines[at[1]:]))
    elif after and markers(after)[1] in text:
        head, tail = text.split(markers(after)[1], 1)
        text = splice(head + markers(after)[1], tail)
    elif (at := section(after_heading)) is not None:
        text = splice("".join(lines[:at[1]]), "".join(lines[at[1]:]))
    else:
        text = splice(text, "")
    path.write_text(text)


def para(text: str) -> str:
    """A paragraph wrapped like the hand-written ones (a number stays with its unit)."""
    text = re.sub(r"(\d) (?=(?:[KMGT]i?B|MB|s|writes)\b)", "\\1\u00a0", text)
    return textwrap.fill(text, 76, break_long_words=False,
                         break_on_hyphens=False).replace("\u00a0", " ")


def md_table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    """A markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default r)."""
    align = align.ljust(len(header), "r")
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(cells, widths, align, strict=True)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":" if a == "r" else ":" + "-" * (w + 1))
                          for w, a in zip(widths, align, strict=True)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
