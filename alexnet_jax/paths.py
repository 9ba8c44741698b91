"""Paths that may be URLs (gs://...), and small files written whole or not at all."""

from __future__ import annotations

import os
from typing import Any


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store (gs://bucket/...) rather than a local file."""
    return "://" in os.fspath(path)


def local_or_url(path: str) -> str:
    """A URL as given, a local path with ~ expanded."""
    return path if is_url(path) else os.path.expanduser(path)


def write_whole(path: Any, data: str | bytes) -> None:
    """Write `data` to `path` (a pathlib or etils.epath path) under a temporary name and rename
    it into place: a reader, or a run killed mid-write, never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    tmp.replace(path)
