"""Every field of a config with its value and the comment its config file gives it: what
`launch.py --config=FILE --help` lists. ml_collections keeps no comments, so they are read from
the source: a variant's own comment for the fields it sets, else the comment of the config it
builds on (a `from configs import NAME` import)."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import ml_collections

_ASSIGN = re.compile(r"^\s*config((?:\.\w+)+)\s*=")
_BASE = re.compile(r"^\s*from configs import (\w+)", re.MULTILINE)


def comments(path: Path) -> dict[str, str]:
    """{'optimizer.momentum': 'its comment', ...} of one config file: the comment lines right
    above an assignment to config.KEY, then the comment at the end of its line ('' if none)."""
    source = path.read_text()
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            trailing[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    found: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        match = _ASSIGN.match(line)
        if not match:
            continue
        above, k = [], number - 1
        while k >= 1 and lines[k - 1].strip().startswith("#"):
            above.insert(0, lines[k - 1].strip().lstrip("#").strip())
            k -= 1
        own = [trailing[number]] if number in trailing else []
        # Set without a comment: no comment, not the base's (which may not fit this value).
        found[match.group(1)[1:]] = " ".join(above + own).strip()
    return found


def all_comments(path: Path) -> dict[str, str]:
    """`comments` of a config and of the configs it builds on, its own taking precedence."""
    merged: dict[str, str] = {}
    for base in _BASE.findall(path.read_text()):
        merged |= all_comments(path.parent / f"{base}.py")
    return merged | comments(path)


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def describe(config: ml_collections.ConfigDict, path: Path) -> str:
    """One line per field: --config.KEY=VALUE and its comment."""
    notes = all_comments(path)
    rows = [(f"--config.{key}={value!r}", notes.get(key, "")) for key, value in _leaves(config)]
    width = max(len(flag) for flag, _ in rows)
    return "\n".join(f"  {flag:<{width}}  {note}".rstrip() for flag, note in rows)
