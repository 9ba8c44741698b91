"""A dataset kept in a bucket (`input.data_dir=gs://...`), read from a local copy.

array_record's reader opens local files only, so each host copies the dataset's directory to
`input.stage_dir` once: file by file, each under a temporary name and renamed when its size
matches the bucket's, so a copy cut short resumes with the files it lacks. The processes of a
host take turns (a lock file beside the copy): the first copies, the others then find every
file there. The dataset's metadata (`dataset_info.json`, which marks a dataset finished) is
copied last.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from absl import logging
from etils import epath

from alexnet_jax import paths
from alexnet_jax.errors import UsageError

FINISHED = "dataset_info.json"  # TFDS's metadata: written last, copied last
CHUNK = 64 << 20  # bytes per read from the bucket
LOG_EVERY_S = 30.0


def local_dataset(
    data_dir: str, relative: str, stage_dir: str, not_prepared: Callable[[], UsageError]
) -> Path:
    """data_dir/relative as a local directory: itself for a local data_dir, else its copy under
    stage_dir, made or finished here. Raises `not_prepared()` when the dataset has no metadata."""
    if not paths.is_url(data_dir):
        directory = Path(os.path.expanduser(data_dir)) / relative
        if not (directory / FINISHED).exists():
            raise not_prepared()
        return directory
    remote = epath.Path(data_dir) / relative
    if not (remote / FINISHED).exists():
        raise not_prepared()
    scheme, rest = data_dir.split("://", 1)
    local = Path(os.path.expanduser(stage_dir)) / scheme / rest.strip("/") / relative
    try:
        stage(remote, local)
    except OSError as e:  # the bucket's side fails otherwise (sources.bucket_read names it)
        if e.filename is not None and paths.is_url(str(e.filename)):
            raise
        full = e.errno == errno.ENOSPC
        why = "the disk is full" if full else e.strerror
        raise UsageError(
            f"input.stage_dir={stage_dir}: the copy of {remote} could not be written to "
            f"{local} ({why}). Point --config.input.stage_dir at a writable local disk with "
            "room for the dataset (about 37 GB for ImageNet); the files copied so far are kept."
        ) from None
    return local


def stage(remote: epath.Path, local: Path) -> int:
    """Copy the files of `remote` (not its sub-directories: the reader needs none) that `local`
    lacks or holds at another size, the metadata last; returns the bytes copied."""
    stats = {p.name: (p, p.stat()) for p in remote.iterdir() if p.name != FINISHED}
    files = [p for name, (p, s) in sorted(stats.items()) if not s.is_directory]
    sizes = {p.name: stats[p.name][1].length for p in files}
    if (local / FINISHED).exists() and all(_holds(local / n, s) for n, s in sizes.items()):
        return 0
    local.mkdir(parents=True, exist_ok=True)
    with open(local.with_name(local.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return _copy_missing(remote, local, files, sizes)


def _copy_missing(
    remote: epath.Path, local: Path, files: list[epath.Path], sizes: dict[str, int]
) -> int:
    todo = [p for p in files if not _holds(local / p.name, sizes[p.name])]
    if not todo and (local / FINISHED).exists():  # another process of this host copied it
        return 0
    total = sum(sizes[p.name] for p in todo)
    logging.info(
        "copying %d of the %d files of %s (%.2f GB) to %s, once per host",
        len(todo),
        len(files),
        remote,
        total / 1e9,
        local,
    )
    start = last = time.time()
    copied = 0
    for i, src in enumerate(todo, 1):
        copied += _copy(src, local / src.name, sizes[src.name])
        if time.time() - last > LOG_EVERY_S or i == len(todo):
            last, rate = time.time(), copied / max(time.time() - start, 1e-9)
            logging.info(
                "copied %d/%d files, %.2f of %.2f GB, %.0f MB/s, %.0f s left",
                i,
                len(todo),
                copied / 1e9,
                total / 1e9,
                rate / 1e6,
                (total - copied) / max(rate, 1e-9),
            )
    _copy(remote / FINISHED, local / FINISHED, (remote / FINISHED).stat().length)
    return copied


def _holds(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _copy(src: epath.Path, dst: Path, size: int) -> int:
    """`src` to `dst` (unless a process that held the lock before did it); the bytes copied."""
    if _holds(dst, size):
        return 0
    part = dst.with_name(f"{dst.name}.part-{uuid.uuid4().hex[:8]}")
    try:
        with src.open("rb") as f, open(part, "wb") as out:
            while chunk := f.read(CHUNK):
                out.write(chunk)
        got = part.stat().st_size
        if got != size:
            raise UsageError(
                f"copying {src} to {dst} gave {got} bytes, the bucket lists {size}: the object "
                "changed or the copy was cut short. Run the same command again."
            )
        part.replace(dst)
    finally:
        part.unlink(missing_ok=True)
    return size
