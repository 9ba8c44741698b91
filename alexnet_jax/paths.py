"""Paths that may be URLs (gs://...), and small files written whole or not at all."""

from __future__ import annotations

import os
from typing import Any

from alexnet_jax.errors import UsageError

BUCKETS = ("gs://", "s3://")  # the object stores etils.epath (and so Orbax and staging) reads


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store (gs://bucket/...) rather than a local file."""
    return "://" in os.fspath(path)


def local_or_url(path: str) -> str:
    """A URL as given, a local path with ~ expanded."""
    return path if is_url(path) else os.path.expanduser(path)


def data_path(path: str, field: str) -> str:
    """`path` (config field `field`) as the readers take it: a bucket URL as given, a local
    path (file:// dropped) with ~ expanded; one line for a scheme nothing here reads."""
    if path.startswith("file://"):
        path = path[len("file://") :]
    if is_url(path) and not path.startswith(BUCKETS):
        raise UsageError(
            f"{field}={path!r}: only local paths and buckets ({', '.join(BUCKETS)}) are read."
        )
    return local_or_url(path)


def write_whole(path: Any, data: str | bytes) -> None:
    """Write `data` to `path` (a pathlib or etils.epath path) under a temporary name and rename
    it into place: a reader, or a run killed mid-write, never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    tmp.replace(path)
